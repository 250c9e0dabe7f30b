"""The whole path, as users run it: raw text -> shards -> checkpoints -> evaluated ledger and report,
on local disk (the README's first command, shrunk) and with every location on gs://."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import TINY_MODEL
from tests.gcs import BUCKET

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL_MODEL = " ".join(m for m in TINY_MODEL if not m.startswith(("wandb", "train.log_every")))
SMALL_EVAL = ("perplexity.max_tokens=3000 perplexity.time_samples=2 sampling.num_samples=2 "
              "sampling.gen_length=32 sampling.block_length=16 sampling.steps=16")


def check_outputs(read_text, list_dir, data_dir: str, run_dir: str, steps: list[int],
                  evaluated: list[int] | None = None) -> None:
    """The contents a user relies on, through `read_text(path)` / `list_dir(path)` (local or gs://):
    checkpoints at `steps`, ledger lines at `evaluated` (default: every one of them)."""
    manifest = json.loads(read_text(f"{data_dir}/manifest.json"))
    shard_files = {s["file"] for split in ("train", "validation") for s in manifest["splits"][split]["shards"]}
    assert shard_files <= set(list_dir(data_dir))
    assert sum(s["num_records"] for s in manifest["splits"]["train"]["shards"]) > 0
    ledger = [json.loads(line) for line in read_text(f"{run_dir}/evals/ledger.jsonl").splitlines()]
    assert sorted(r["step"] for r in ledger) == (evaluated or steps)  # one line per evaluated step
    assert sorted(int(name) for name in list_dir(f"{run_dir}/checkpoints") if name.isdigit()) == steps
    bounds = [r["perplexity"]["ppl_bound"] for r in sorted(ledger, key=lambda r: r["step"])]
    assert all(np.isfinite(bounds)) and (len(bounds) == 1 or bounds[-1] < bounds[0])
    samples = ledger[-1]["samples"]
    assert samples and all(isinstance(s, str) and len(s.split()) >= 3 for s in samples)
    page = read_text(f"{run_dir}/evals/report.html")
    assert "<svg" in page and "Draft and polish" in page


@pytest.mark.slow
def test_readme_first_command_end_to_end(tmp_path):
    run = tmp_path / "quickstart"
    env = {**os.environ, "RUN": str(run), "STORIES": "400", "BASE_STEPS": "40", "JUDGE_STEPS": "20", "PROMPTS": "24",
           "OPUT_STEPS": "10", "TRAJ_VALIDATION": "0", "PYTHON": sys.executable,
           "TRAIN_ARGS": SMALL_MODEL + " optim.warmup_steps=5",
           "TRAJ_ARGS": "sampling.gen_length=24 batch_size=8 rows_per_part=16",
           "EVAL_ARGS": SMALL_EVAL, "WANDB_MODE": "offline",
           "HARNESS_ARGS": "harness.tasks=tinystories_cloze harness.limit=100"}  # the quickstart runs none by default
    result = subprocess.run(["bash", str(ROOT / "quickstart.sh")], env=env, capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in range(1, 4):
        assert f"== {stage}/3" in result.stdout
    for stage in range(1, 7):
        assert f"== recipe {stage}/6" in result.stdout
    assert f"open {run}/oput/evals/report.html" in result.stdout
    # The recipe evaluates each run's last checkpoint (evals --latest).
    check_outputs(lambda p: pathlib.Path(p).read_text(), os.listdir, f"{run}/data", f"{run}/base", [20, 40], [40])
    assert list((run / "base" / "wandb").glob("offline-run-*"))  # offline wandb logging happened
    base = json.loads((run / "base" / "evals" / "ledger.jsonl").read_text().splitlines()[-1])
    assert base["objective"] == "bd3lm" and base["quality_reference"]["sampler"] == "one_token"
    assert list(base["samplers"]) == ["one_token", "threshold", "spd", "spd_cached"]
    assert all(np.isfinite(m["gen_ppl"]) and m["matched"] for m in base["samplers"].values())
    sidecar = json.loads((run / "trajectories" / "trajectories.json").read_text())
    assert sidecar["model"]["step"] == 40 and sidecar["rows"] == 24
    oput = [json.loads(line) for line in (run / "oput" / "evals" / "ledger.jsonl").read_text().splitlines()]
    assert [r["step"] for r in oput] == [10] and oput[-1]["objective"] == "oput"
    assert oput[-1]["settings"]["sampling"]["revise"] == "yes"  # OPUT models revise their drafts
    assert oput[-1]["samples"][0].split()[:3] == base["samples"][0].split()[:3]  # the same prompts
    assert (run / "oput" / "evals" / "report.html").exists()
    reference = oput[-1]["quality_reference"]  # OPUT's quality is measured against the base's one-token decoding
    assert reference["run_dir"] == f"{run}/base" and reference["step"] == 40 and reference["sampler"] == "one_token"
    assert reference["gen_ppl"] == base["samplers"]["one_token"]["gen_ppl"]
    # The printed summary: exact correctness per decoder against the base's, the data's own figures,
    # and the AR twin's stories at its budget.
    assert f"{run}/oput step 10 (oput)" in result.stdout and "reference quality" in result.stdout
    assert "real continuations" in result.stdout and f"{run}/judge step 20 (ar)" in result.stdout
    assert all(0 <= m["story_correctness"] <= 1 for m in base["samplers"].values())
    cloze = base["harness"]["scores"]["tinystories_cloze"]  # one harness task on the checkpoint, in the report
    assert 0 <= cloze["acc,none"] <= 1 and "tinystories_cloze" in (run / "base" / "evals" / "report.html").read_text()


@pytest.mark.slow
def test_end_to_end_on_gcs(gcs_emulator, story_file):
    data, run = f"gs://{BUCKET}/e2e/data", f"gs://{BUCKET}/e2e/run"
    gcs_emulator.python(
        "import sys\nfrom apache_beam.io.filesystems import FileSystems\n"
        "with FileSystems.create(sys.argv[2]) as f: f.write(open(sys.argv[1], 'rb').read())",
        str(story_file), f"gs://{BUCKET}/e2e/raw/stories.txt")
    commands = [
        ["-m", "pipelines.preprocess", "--dataset", "tinystories", "--input", f"gs://{BUCKET}/e2e/raw/*.txt",
         "--output", data, "--vocab_size", "320", "--num_shards", "2"],
        ["-m", "trainer", f"data.path={data}", f"run_dir={run}", *SMALL_MODEL.split(), "train.steps=30",
         "train.checkpoint_every=10", "wandb.mode=disabled", "optim.warmup_steps=5"],
        ["-m", "evals", "--run_dir", run, "--once", "wandb_mode=disabled", *SMALL_EVAL.split()],
        # an export in shards, then one replacing it whole: no shard of the first may stay
        ["-m", "trainer.export", "--run_dir", run, "--output", f"gs://{BUCKET}/e2e/export", "--max_shard_mb", "0"],
        ["-m", "trainer.export", "--run_dir", run, "--output", f"gs://{BUCKET}/e2e/export", "--overwrite"],
    ]
    for command in commands:
        result = subprocess.run([sys.executable, *command], env=gcs_emulator.env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, (command[1], result.stderr[-3000:])
    reader = (
        "import json, sys\nfrom etils import epath\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    q = epath.Path(p)\n"
        "    out[p] = sorted(x.name for x in q.iterdir()) if q.is_dir() else q.read_text()\n"
        "print(json.dumps(out))"
    )
    paths = [f"{data}/manifest.json", data, f"{run}/evals/ledger.jsonl", f"{run}/checkpoints",
             f"{run}/evals/report.html", f"{run}/metrics.jsonl", f"gs://{BUCKET}/e2e/export", f"gs://{BUCKET}/e2e"]
    files = json.loads(gcs_emulator.python(reader, *paths).strip().splitlines()[-1])
    assert files[f"gs://{BUCKET}/e2e/export"] == ["config.json", "config.yaml", "model.safetensors", "tokenizer.json"]
    assert not [name for name in files[f"gs://{BUCKET}/e2e"] if "partial" in name]
    check_outputs(files.__getitem__, files.__getitem__, data, run, [10, 20, 30])
    logged = [json.loads(line)["step"] for line in files[f"{run}/metrics.jsonl"].splitlines()]
    assert logged == [10, 20, 30]  # GCS cannot append: the file is rewritten whole, losing no line
    verify = subprocess.run([sys.executable, "-m", "pipelines.manifest", data], env=gcs_emulator.env,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stderr


    resumed = subprocess.run([sys.executable, *commands[1][:-4], "train.steps=40", "train.checkpoint_every=10",
                              "wandb.mode=disabled", "optim.warmup_steps=5"], env=gcs_emulator.env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 30" in resumed.stdout  # restored from gs://, not retrained
    files = json.loads(gcs_emulator.python(reader, f"{run}/metrics.jsonl", run).strip().splitlines()[-1])
    assert [json.loads(x)["step"] for x in files[f"{run}/metrics.jsonl"].splitlines()] == [10, 20, 30, 40]
    assert ".lock" not in files[run] and "config.yaml" in files[run]  # the run lock was released


@pytest.mark.parametrize("judge", ["", "elsewhere/judge"])
def test_the_recipe_trains_its_judge_unless_given_one(tmp_path, judge):
    """Every stage's command, recorded by a stand-in Python: with JUDGE the recipe trains no judge
    and every eval is judged by that run; without it, by the judge it trained."""
    log, stub = tmp_path / "calls.txt", tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    stub.chmod(0o755)
    env = {**os.environ, "DATA": "data", "RUN": "run", "PYTHON": str(stub), "JUDGE": judge}
    result = subprocess.run(["bash", str(ROOT / "recipes" / "dmax.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    used = judge or "run/judge"
    assert any(c.startswith("-m trainer") and "run_dir=run/judge" in c for c in calls) == (not judge)
    evals = [c for c in calls if c.startswith("-m evals --run_dir")]
    judged = [c for c in evals if "samplers=causal" not in c]
    assert len(judged) == 2 and all(f"gen_ppl_run_dir={used} " in c for c in judged)
    # The AR twin's own stories are evaluated (and summarised) only when the recipe trained it.
    assert [c.split()[3] for c in evals if "samplers=causal" in c] == ([] if judge else ["run/judge"])
    assert any(c.startswith("-m evals.summary") and c.endswith(" run/judge") for c in calls) == (not judge)
