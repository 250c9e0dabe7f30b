"""The trainer on a device mesh: 4 simulated CPU devices in several layouts give the single-device
losses, parameters are sharded as the rules say, and a run resumes onto another mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import TINY_MODEL
from trainer.config import ConfigError, MeshConfig
from trainer.sharding import mesh_shape, parse_rules

LAYOUTS = {
    "data4": ["mesh.data=4", "mesh.fsdp=1"],
    "fsdp4": ["mesh.fsdp=4"],
    "data2_fsdp2": ["mesh.data=2", "mesh.fsdp=2"],
    "fsdp2_tensor2": ["mesh.fsdp=2", "mesh.tensor=2"],
}
SPECS = """
import json, sys
import jax
from trainer import config, sharding, state as state_lib
cfg = config.load(None, sys.argv[1:])
cfg.model.vocab_size = 64
mesh, rules = sharding.make_mesh(cfg.mesh), sharding.parse_rules(cfg.mesh.rules)
tx, _ = state_lib.make_optimizer(cfg.optim, 10)
state, _ = state_lib.sharded_init(cfg, tx, mesh, rules)
block, mu = state["params"]["blocks"], state["opt_state"][1][0].mu["blocks"]
if not cfg.model.scan_layers:
    block, mu = block[0], mu[0]
out = {name: list(array.sharding.spec) for name, array in {
    "embedding": state["params"]["embed"]["embedding"], "q": block["attn"]["q"]["kernel"],
    "down": block["mlp"]["down"]["kernel"], "scale": block["attn_norm"]["scale"],
    "mu_q": mu["attn"]["q"]["kernel"], "step": state["step"]}.items()}
out["shards_of_q"] = len(block["attn"]["q"]["kernel"].addressable_shards)
print(json.dumps(out))
"""


def four_devices() -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def run_trainer(overrides, env=None) -> str:
    """Runs a trainer to completion; returns its stdout."""
    result = subprocess.run([sys.executable, "-m", "trainer", *overrides], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_device_losses(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run_trainer([f"data.path={tiny_dataset}", f"run_dir={run_dir}", *TINY_MODEL, "train.steps=6",
                 "train.checkpoint_every=3"])
    return losses(run_dir)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_four_device_layouts_match_one_device(layout, tiny_dataset, tmp_path, single_device_losses):
    run_dir = tmp_path / layout
    run_trainer([f"data.path={tiny_dataset}", f"run_dir={run_dir}", *TINY_MODEL, "train.steps=6",
                 "train.checkpoint_every=3", *LAYOUTS[layout]], env=four_devices())
    np.testing.assert_allclose(losses(run_dir), single_device_losses, rtol=2e-4)


EXPECTED = {  # hidden 32, mlp 64, vocab 64 under the default rules
    "data4": {"embedding": [None, None], "q": [None, None], "down": [None, None], "scale": [None]},
    "fsdp4": {"embedding": [None, "fsdp"], "q": ["fsdp", None], "down": [None, "fsdp"], "scale": ["fsdp"]},
    "data2_fsdp2": {"embedding": [None, "fsdp"], "q": ["fsdp", None], "down": [None, "fsdp"],
                    "scale": ["fsdp"]},
    "fsdp2_tensor2": {"embedding": ["tensor", "fsdp"], "q": ["fsdp", "tensor"], "down": ["tensor", "fsdp"],
                      "scale": ["fsdp"]},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parameters_and_optimizer_state_are_sharded_by_the_rules(layout):
    result = subprocess.run([sys.executable, "-c", SPECS, *TINY_MODEL, *LAYOUTS[layout], "run_dir=x",
                             "data.path=x"], env=four_devices(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    specs = json.loads(result.stdout.strip().splitlines()[-1])
    for name, expected in EXPECTED[layout].items():
        assert specs[name] == expected, (name, specs[name])
    assert specs["mu_q"] == specs["q"]  # Adam moments live where their parameters do
    assert specs["step"] == [] and specs["shards_of_q"] == 4


def test_scanned_layers_shard_their_stacked_params_and_train(tiny_dataset, tmp_path):
    result = subprocess.run([sys.executable, "-c", SPECS, *TINY_MODEL, *LAYOUTS["fsdp2_tensor2"], "run_dir=x",
                             "data.path=x", "model.scan_layers=true"], env=four_devices(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    specs = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {name: [None, *spec] for name, spec in EXPECTED["fsdp2_tensor2"].items() if name != "embedding"}
    assert {name: specs[name] for name in expected} == expected  # the layer axis whole, the rest by the rules
    run_dir = tmp_path / "scanned"  # scanned == unrolled is proven in test_trainer; here: it trains sharded
    run_trainer([f"data.path={tiny_dataset}", f"run_dir={run_dir}", *TINY_MODEL, "train.steps=4",
                 "train.checkpoint_every=2", "model.scan_layers=true", *LAYOUTS["fsdp2_tensor2"]], env=four_devices())
    assert len(losses(run_dir)) == 4 and np.isfinite(losses(run_dir)).all()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


@pytest.mark.slow
def test_resume_onto_another_mesh_continues_the_run(tiny_dataset, tmp_path, single_device_losses):
    run_dir = tmp_path / "moved"
    common = [f"data.path={tiny_dataset}", f"run_dir={run_dir}", *TINY_MODEL, "train.checkpoint_every=3"]
    run_trainer([*common, "train.steps=3", "mesh.fsdp=4"], env=four_devices())
    moved = run_trainer([*common, "train.steps=6", "mesh.fsdp=2", "mesh.tensor=2"], env=four_devices())
    assert "resuming at step 3" in moved  # restored onto the new mesh, not retrained
    last = run_trainer([*common, "train.steps=6"])  # nothing left to do on one device: restores and stops
    assert "resuming at step 6" in last
    np.testing.assert_allclose(losses(run_dir), single_device_losses, rtol=2e-4)


@pytest.mark.parametrize("record, refusal", [
    ('{"process_count": 2, "data_order": 2}', "trained by 2 process(es)"),
    ('{"process_count": 1}', "trained under data order 1 and this trainer reads data order 2"),  # an older run
])
def test_resuming_with_another_process_count_or_data_order_is_refused(tiny_dataset, tmp_path, capsys, record,
                                                                        refusal):
    from trainer import __main__ as cli

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "processes.json").write_text(record)
    assert cli.main([f"data.path={tiny_dataset}", f"run_dir={run_dir}", *TINY_MODEL, "train.steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and refusal in err and len(err.splitlines()) == 1


def test_mesh_config_errors():
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=1), 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ConfigError, match="multiply to 6"):
        mesh_shape(MeshConfig(data=3, fsdp=2, tensor=1), 4)
    with pytest.raises(ConfigError, match="at most one -1"):
        mesh_shape(MeshConfig(data=-1, fsdp=-1), 4)
    with pytest.raises(ConfigError, match="mesh.rules entry"):
        parse_rules("vocab=pipeline")


def test_two_processes_read_disjoint_records_that_make_the_global_batch(tiny_dataset):
    from trainer import config as config_lib
    from trainer import data

    cfg = config_lib.load(None, [f"data.path={tiny_dataset}", "run_dir=x", *TINY_MODEL, "data.streams=2"])
    manifest = data.load_manifest(str(tiny_dataset))
    whole = data.train_iterator(cfg, manifest, 0, 1)
    halves = [data.train_iterator(cfg, manifest, p, 2) for p in (0, 1)]
    for _ in range(3):
        expected = next(whole)
        parts = [next(h) for h in halves]
        for key in expected:
            assert np.array_equal(np.concatenate([p[key] for p in parts]), expected[key])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_localhost_train_like_one(tiny_dataset, tmp_path):
    common = [f"data.path={tiny_dataset}", *TINY_MODEL, "train.steps=4", "train.checkpoint_every=2", "data.streams=2"]
    run_trainer([*common, f"run_dir={tmp_path / 'one'}"], env=four_devices())
    port = _free_port()
    jobs = []
    for process in (0, 1):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(process)}
        jobs.append(subprocess.Popen([sys.executable, "-m", "trainer", *common, f"run_dir={tmp_path / 'two'}"],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        for job in jobs:
            _, err = job.communicate(timeout=600)
            assert job.returncode == 0, err[-3000:]
    finally:
        for job in jobs:
            job.kill()
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=2e-4)
    steps = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["2", "4"]
