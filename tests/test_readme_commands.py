"""Every command of the README's code blocks runs as written, at tiny size: in README order, in one
working directory, as a new user would, with small overrides appended (a later key=value wins) and
stand-ins for what the commands read that only the real world has (TinyStories, DMax's rows, the
quickstart's runs, Qwen3-0.6B, a GCS bucket). A command the suite runs elsewhere is named below; one
that cannot run here says so beside it in the README."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys
from typing import NamedTuple

import pytest

from tests.conftest import TINY_MODEL
from tests.gcs import BUCKET

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOT_RUN = "not run by the README test"  # the README's own note, in a comment line above the commands
# Commands the suite runs elsewhere, by a piece of their text: never run twice.
ELSEWHERE = {
    "bash quickstart.sh": "tests/test_end_to_end.py runs the README's first command",
    "bash recipes/dmax.sh": "tests/test_end_to_end.py: the quickstart runs this recipe",
    "-m pytest -q": ".ci/run: the suite this test belongs to",
    "pip install -c constraints.txt -e '.[harness]'": ".ci/run installs the dev extra, which holds the harness's",
}
# Appended to each entry point's commands: tiny sizes.
TINY_TRAIN = [m for m in TINY_MODEL if not m.startswith("train.log_every")] + [
    "train.steps=2", "train.checkpoint_every=1", "optim.warmup_steps=1"]
TINY = {
    "-m trainer ": TINY_TRAIN,
    "-m evals ": ["perplexity.max_tokens=500", "perplexity.time_samples=1", "sampling.num_samples=1",
                  "sampling.gen_length=8", "sampling.block_length=8", "sampling.steps=8"],
    "-m evals.harness ": ["--limit", "4", "--gen_kwargs", "max_gen_toks=16"],
    "-m evals.generate ": ["gen_length=8"],
    "-m evals.trajectories ": ["num_prompts=6", "prompt_tokens=6", "batch_size=4", "rows_per_part=3",
                               "sampling.gen_length=16", "keep_unfinished=true"],
}


class Command(NamedTuple):
    text: str  # as the README writes it (continuations joined, trailing comment dropped)
    run: bool  # False: the README says beside it that this test does not run it


def readme_commands(readme: str) -> list[Command]:
    commands = []
    for indent, language, body in re.findall(r"^( *)```(bash|cron)\n(.*?)^\1```", readme, re.M | re.S):
        run = True
        for line in re.sub(r"\\\n\s*", "", body).splitlines():
            line = line.strip()
            if line.startswith("#"):
                run = run and NOT_RUN not in line  # a note covers the commands below it in its block
            elif line:
                line = re.sub(r"\s+#.*$", "", line)
                commands.append(Command(line.split(maxsplit=5)[5] if language == "cron" else line, run))
    return commands


def as_run_here(command: str, workdir: pathlib.Path) -> str:
    """The command with this interpreter for `python`, the test's bucket for `gs://B`, the working
    directory for the cron line's, and its entry point's tiny overrides before any redirection."""
    command = re.sub(r"^((?:\w+=\S*\s+)*)(python3?|\.venv/bin/python) ", rf"\g<1>{sys.executable} ", command)
    command = command.replace("&& .venv/bin/python ", f"&& {sys.executable} ")
    command = command.replace("cd /srv/dlm", f"cd {workdir}").replace("gs://B/", f"gs://{BUCKET}/")
    extra = next((args for entry, args in TINY.items() if entry in f"{command} "), [])
    body, redirect = re.match(r"(.*?)(\s*>>.*)?$", command).groups()
    return " ".join([body, *extra]) + (redirect or "")


def test_the_readme_commands_are_extracted_as_written():
    commands = readme_commands((ROOT / "README.md").read_text())
    texts = [c.text for c in commands]
    assert ("python -m trainer --config configs/tinystories_tiny.yaml data.path=runs/quickstart/data "
            "run_dir=runs/tiny train.steps=300 objective.noise_schedule=cosine") in texts  # continuations joined
    assert "cd /srv/dlm && .venv/bin/python -m evals --run_dir gs://B/runs/tiny --once >> evals.log 2>&1" in texts
    assert not [c for c in commands if not c.run and not ("Dataflow" in c.text or "benchmarks/" in c.text)]
    for piece in ELSEWHERE:  # each exemption names a command the README still has
        assert any(piece in t for t in texts), piece


# ------------------------------------------------------------------------------------------ stand-ins

def _qwen3_shaped(directory: pathlib.Path, tokenizer_json: pathlib.Path) -> None:
    """A randomly initialised Qwen3-shaped checkpoint in the tiny model's shape, with the dataset's
    tokenizer plus a reserved special token for the mask (as Qwen3's `<|fim_pad|>`), and an
    embedding padded past the tokenizer (as Qwen3's 151,936 rows for 151,669 tokens)."""
    from flax import nnx
    from tokenizers import Tokenizer

    from trainer import hf
    from trainer.config import ModelConfig
    from trainer.model import Transformer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.add_special_tokens(["<|fim_pad|>"])
    directory.mkdir(parents=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size() + 8, hidden=32, layers=2, heads=2, kv_heads=1, head_dim=16,
                      mlp_hidden=64, max_seq_len=64, qk_norm=True)
    params = nnx.to_pure_dict(nnx.split(Transformer(cfg, nnx.Rngs(1)))[1])
    hf.export(params, cfg, str(directory), {"eos_token_id": tokenizer.token_to_id("<|endoftext|>")})
    assert json.loads((directory / "config.json").read_text())["model_type"] == "qwen3"


def _stand_ins(workdir: pathlib.Path, story_file, tiny_dataset) -> None:
    """What the commands read that only the real world has, where the README says it is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer import config as config_lib
    from trainer import train

    for shipped in ("configs", "recipes", "quickstart.sh"):
        (workdir / shipped).symlink_to(ROOT / shipped)
    (workdir / "data").mkdir()
    shutil.copy(story_file, workdir / "data" / "TinyStoriesV2-GPT4-train.txt")
    quickstart = workdir / "runs" / "quickstart"
    shutil.copytree(tiny_dataset, quickstart / "data")
    base = config_lib.load(str(ROOT / "configs" / "tinystories_tiny_bd3lm.yaml"), [
        f"data.path={quickstart / 'data'}", f"run_dir={quickstart / 'base'}", *TINY_TRAIN, "wandb.mode=disabled"])
    assert train.run(base) == 0  # the quickstart's block-diffusion model, at tiny size
    judge = config_lib.load(str(ROOT / "configs" / "tinystories_tiny_ar.yaml"), [
        f"data.path={quickstart / 'data'}", f"run_dir={quickstart / 'judge'}", *TINY_TRAIN, "wandb.mode=disabled"])
    assert train.run(judge) == 0  # and its AR judge
    rows = [{"question": f"Tom has {a} apples and gets {b} more. How many?", "answer": f"He has {a + b} apples."}
            for a in range(2, 14) for b in range(2, 14)]
    (workdir / "trajectories").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), workdir / "trajectories" / "train-00000.parquet")
    dmax = workdir.parent / "shared" / "data" / "dmax"  # ../shared beside the checkout, as in this repository
    dmax.mkdir(parents=True)
    (dmax / "trajectories-sample.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    _qwen3_shaped(workdir / "hf" / "Qwen3-0.6B", tiny_dataset / "tokenizer.json")


def _upload(gcs_emulator, local: pathlib.Path, remote: str) -> None:
    gcs_emulator.python(
        "import pathlib, sys\nfrom etils import epath\nroot = pathlib.Path(sys.argv[1])\n"
        "for path in (p for p in root.rglob('*') if p.is_file() and 'evals' not in p.parts):\n"
        "    target = epath.Path(sys.argv[2]) / str(path.relative_to(root))\n"
        "    target.write_bytes(path.read_bytes())\n", str(local), remote)


@pytest.mark.slow
def test_every_readme_command_runs_as_written(story_file, tiny_dataset, gcs_emulator, tmp_path):
    workdir = tmp_path / "user"
    workdir.mkdir()
    _stand_ins(workdir, story_file, tiny_dataset)
    env = {**gcs_emulator.env, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    ran, failed = [], []
    for command in readme_commands((ROOT / "README.md").read_text()):
        if not command.run or any(piece in command.text for piece in ELSEWHERE):
            continue
        if "gs://B/runs/tiny" in command.text:  # the cron line reads the run (not its evals) from a bucket
            _upload(gcs_emulator, workdir / "runs" / "tiny", f"gs://{BUCKET}/runs/tiny")
        result = subprocess.run(["bash", "-c", as_run_here(command.text, workdir)], cwd=workdir, env=env,
                                capture_output=True, text=True, timeout=600)
        ran.append(command.text)
        if result.returncode:  # the rest still runs: one test run names every command that fails
            failed.append(f"{command.text}\n  -> exit {result.returncode}: {result.stderr.strip()[-1500:]}")
    assert not failed, "\n".join(failed)
    assert len(ran) >= 14
    assert (workdir / "runs" / "dmax" / "oput" / "checkpoints").is_dir()  # OPUT from the quickstart's model
    assert (workdir / "runs" / "init_from_hf" / "checkpoints").is_dir()  # trained from the Qwen3-shaped weights
    ledger = (workdir / "runs" / "tiny" / "evals" / "ledger.jsonl").read_text()
    forced = [json.loads(line) for line in ledger.splitlines()]
    assert len({r["settings_hash"] for r in forced}) == 2  # --force recorded the new settings beside
    assert "step 2: ppl" in (workdir / "evals.log").read_text()  # the cron line evaluated the bucket's run
