"""Nothing lost, nothing silently wrong: concurrent evaluators, damaged lines, preemption right
after a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evals.ledger import Ledger
from trainer import config as config_lib
from trainer import train

APPEND_STEPS = """
import sys

import pytest
from evals.ledger import Ledger
ledger = Ledger(sys.argv[1])
for step in range(int(sys.argv[2]), int(sys.argv[3])):
    ledger.append({"step": step, "perplexity": {}, "payload": "x" * 2000})
"""


def test_concurrent_evaluators_lose_no_ledger_line(tmp_path):
    workers = [subprocess.Popen([sys.executable, "-c", APPEND_STEPS, str(tmp_path), str(i * 50), str(i * 50 + 50)])
               for i in range(4)]
    assert all(w.wait(timeout=300) == 0 for w in workers)
    lines = [json.loads(line) for line in (tmp_path / "evals" / "ledger.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(200))  # every step once, in order
    assert Ledger(str(tmp_path)).steps() == set(range(200))


def test_a_damaged_ledger_entry_is_skipped_with_a_warning(tmp_path, capsys):
    ledger = Ledger(str(tmp_path))
    ledger.append({"step": 10, "perplexity": {}})
    with (tmp_path / "evals" / "ledger.jsonl").open("a") as f:
        f.write('{"step": 20, "perplex\n')  # a torn line
    (tmp_path / "evals" / "steps" / "000000000030.json").write_text("garbage")
    assert ledger.steps() == {10}
    assert capsys.readouterr().out.count("warning: skipped a damaged ledger entry") == 2
    ledger.append({"step": 20, "perplexity": {}})  # the step is evaluated again and recorded
    assert [json.loads(x)["step"] for x in (tmp_path / "evals" / "ledger.jsonl").read_text().splitlines()] == [10, 20]


def test_a_damaged_metrics_line_does_not_stop_a_resume(tiny_overrides, tmp_path, capsys):
    cfg = config_lib.load(None, [*tiny_overrides, "train.steps=2", "train.checkpoint_every=2"])
    assert train.run(cfg) == 0
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-write
    resumed = config_lib.load(None, [*tiny_overrides, "train.steps=4", "train.checkpoint_every=2"])
    assert train.run(resumed) == 0
    assert "dropped a damaged line" in capsys.readouterr().out
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_sigterm_right_after_a_checkpoint_exits_143_with_it(tiny_overrides, tmp_path, monkeypatch):
    class AfterTheCheckpoint:  # SIGTERM arrives as the step after checkpoint 2 begins
        def __init__(self):
            self.polls = 0

        @property
        def requested(self):
            self.polls += 1
            return self.polls == 3

    monkeypatch.setattr(train, "_Preemption", AfterTheCheckpoint)
    cfg = config_lib.load(None, [*tiny_overrides, "train.steps=6", "train.checkpoint_every=2"])
    assert train.run(cfg) == train.PREEMPTED_EXIT_CODE
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_a_shard_with_flipped_bytes_is_caught_by_its_sha256(tiny_dataset, tiny_overrides, tmp_path, capsys):
    import shutil

    from pipelines import manifest
    from trainer import __main__ as cli

    damaged = tmp_path / "data"
    shutil.copytree(tiny_dataset, damaged)
    shard = damaged / "train-00001-of-00002.array_record"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, same record count
    shard.write_bytes(bytes(raw))
    assert manifest.verify(str(damaged), full=False) == []  # the quick check cannot see it
    assert manifest.main([str(damaged)]) == 1
    assert "train-00001-of-00002.array_record does not match the manifest's sha256" in capsys.readouterr().err
    assert cli.main([*tiny_overrides, f"data.path={damaged}", "train.steps=1"]) == 2
    assert "does not match the manifest's sha256" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.slow
def test_one_trainer_per_run_directory_and_a_dead_holder_is_taken_over(tiny_dataset, tmp_path, capsys):
    import os
    import signal
    import time

    from tests.conftest import TINY_MODEL
    from trainer import __main__ as cli

    args = [f"data.path={tiny_dataset}", f"run_dir={tmp_path / 'run'}", *TINY_MODEL]
    holder = subprocess.Popen([sys.executable, "-m", "trainer", *args, "train.steps=100000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "config.yaml").exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        err = cli_error(capsys, *args, "train.steps=2")
        assert f"is in use by the trainer with pid {holder.pid}" in err
        assert holder.poll() is None  # the holder is untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = json.loads((tmp_path / "run" / ".lock").read_text())  # left behind by kill -9
    assert lock["pid"] == holder.pid and not os.path.exists(f"/proc/{holder.pid}")
    assert cli.main([*args, "train.steps=2"]) == 0  # a dead holder's lock is taken over
    assert "taking over the run lock" in capsys.readouterr().out
    assert not (tmp_path / "run" / ".lock").exists()  # released at the end


def cli_error(capsys, *argv) -> str:
    from trainer import __main__ as cli

    capsys.readouterr()
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_a_damaged_latest_checkpoint_is_recorded_by_evals_and_the_trainer_falls_back(tiny_overrides, tmp_path,
                                                                                      capsys):
    from evals import __main__ as evals_cli

    cfg = config_lib.load(None, [*tiny_overrides, "train.steps=4", "train.checkpoint_every=2"])
    assert train.run(cfg) == 0
    before = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    files = [p for p in (tmp_path / "run" / "checkpoints" / "4" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # a torn file

    small = ["perplexity.max_tokens=500", "perplexity.time_samples=1", "sampling.num_samples=1",
             "sampling.gen_length=8", "sampling.block_length=8", "samplers=remask", "wandb_mode=disabled"]
    assert evals_cli.main(["--run_dir", str(tmp_path / "run"), "--once", *small]) == 0
    assert "step 4: not evaluated, unreadable checkpoint" in capsys.readouterr().out
    ledger = [json.loads(x) for x in (tmp_path / "run" / "evals" / "ledger.jsonl").read_text().splitlines()]
    assert [(r["step"], "error" in r) for r in ledger] == [(2, False), (4, True)]
    assert "Steps not evaluated" in (tmp_path / "run" / "evals" / "report.html").read_text()

    resumed = config_lib.load(None, [*tiny_overrides, "train.steps=6", "train.checkpoint_every=2"])
    assert train.run(resumed) == 0
    out = capsys.readouterr().out
    assert "checkpoint step 4 is unreadable" in out and "resuming at step 2" in out
    after = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in after[:4]] == [r["loss"] for r in before]  # steps 3-4 re-run bit for bit
    again = config_lib.load(None, [*tiny_overrides, "train.steps=6", "train.checkpoint_every=2"])
    assert train.run(again) == 0 and "resuming at step 6" in capsys.readouterr().out  # step 4 was replaced


def test_an_empty_train_or_validation_split_is_one_line(tiny_dataset, tiny_overrides, tmp_path, capsys):
    import shutil

    from evals import __main__ as evals_cli
    from trainer import __main__ as cli

    for split, (kind, entry) in {"train": ("trainer", cli), "validation": ("evals", evals_cli)}.items():
        data = tmp_path / f"no_{split}"
        shutil.copytree(tiny_dataset, data)
        manifest = json.loads((data / "manifest.json").read_text())
        manifest["splits"][split] = {"num_records": 0, "num_tokens": 0, "shards": []}
        (data / "manifest.json").write_text(json.dumps(manifest))
        if kind == "trainer":
            err = cli_error(capsys, *tiny_overrides, f"data.path={data}")
        else:
            assert cli.main([*tiny_overrides, "train.steps=1", "train.checkpoint_every=1"]) == 0
            capsys.readouterr()
            assert evals_cli.main(["--run_dir", str(tmp_path / "run"), "--once", f"data_path={data}",
                                   "sampling.gen_length=16", "sampling.block_length=8", "wandb_mode=disabled"]) == 2
            err = capsys.readouterr().err.strip()
        assert f"the {split} split of {data} holds no records" in err, err
