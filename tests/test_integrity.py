"""Nothing lost, nothing silently wrong: concurrent evaluators, damaged lines, preemption right
after a checkpoint; and every piece of state read back is checked against what wrote it (the
fault matrix of round two: state vs writer, tokenizer ids, one writer per output, atomic JSON,
signals, settings in the ledger, one-line errors)."""

from __future__ import annotations

import json
import shutil
import signal
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


def test_a_key_added_after_a_record_was_made_counts_as_its_default(tmp_path):
    import dataclasses

    from evals.config import EvalConfig

    settings = dataclasses.asdict(EvalConfig())
    older = {k: v for k, v in settings.items() if k != "harness"}  # recorded before the harness existed
    ledger = Ledger(str(tmp_path))
    ledger.append({"step": 10, "perplexity": {}, "settings": older})
    assert ledger.steps(settings) == {10}  # the default harness (no tasks) is what it ran with
    with_tasks = {**settings, "harness": {**settings["harness"], "tasks": "tinystories_cloze"}}
    assert ledger.steps(with_tasks) == set()  # asking for tasks: the step is not done under these


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
            return signal.SIGTERM if self.polls == 3 else 0

        def restore(self):
            pass

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


# --------------------------------------------------------------------------- round two

SMALL_EVAL = ["perplexity.max_tokens=500", "perplexity.time_samples=1", "sampling.num_samples=1",
              "sampling.gen_length=8", "sampling.block_length=8", "samplers=remask", "wandb_mode=disabled"]


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """A tiny MDLM run with checkpoints at steps 2 and 4; tests change copies of it."""
    from tests.conftest import TINY_MODEL

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = config_lib.load(None, [f"data.path={tiny_dataset}", f"run_dir={run_dir}", *TINY_MODEL, "train.steps=4",
                                 "train.checkpoint_every=2"])
    assert train.run(cfg) == 0
    return run_dir


def copy_of(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def error_line(capsys, status: int, expected: int = 2) -> str:
    """The one `error: ` line an entry point printed (and no traceback), with its exit status."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == expected and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def evals_once(run, *overrides) -> int:
    from evals import __main__ as evals_cli

    return evals_cli.main(["--run_dir", str(run), "--once", *SMALL_EVAL, *overrides])


@pytest.fixture
def no_sigterm_kill():
    """SIGTERM raises here unless the code under test handles it: a missing handler fails the test
    instead of killing the test session."""
    def unhandled(signum, frame):
        raise AssertionError("SIGTERM was not handled")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


# State vs writer -----------------------------------------------------------------------------

def test_evals_refuses_a_config_that_does_not_describe_the_checkpoints(trained, tmp_path, capsys):
    run = copy_of(trained, tmp_path)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("mlp_hidden: 64", "mlp_hidden: 96"))  # a model key edited
    err = error_line(capsys, evals_once(run))
    assert "holds params blocks.0.mlp" in err and "config.yaml does not describe the run's checkpoints" in err
    assert not (run / "evals").exists()  # a configuration problem is no property of a step: nothing recorded
    (run / "config.yaml").write_text(config)
    assert evals_once(run) == 0 and Ledger(str(run)).steps() == {2, 4}  # restored: every step is evaluated


def test_a_resume_is_checked_against_the_iterator_state_it_restores(trained, tiny_dataset, tmp_path, capsys):
    from tests.conftest import TINY_MODEL
    from trainer import __main__ as cli

    run = copy_of(trained, tmp_path)
    args = [f"data.path={tiny_dataset}", f"run_dir={run}", *TINY_MODEL, "train.steps=6", "train.checkpoint_every=2"]
    config = (run / "config.yaml").read_text()
    err = cli_error(capsys, *args, "train.global_batch=4")
    assert "its data-iterator state was saved with train.global_batch=8, this run has 4" in err
    err = cli_error(capsys, *args, "data.eos_fill=true")  # the rows would change under the saved position
    assert "its data-iterator state was saved with data.eos_fill=False, this run has True" in err
    assert (run / "config.yaml").read_text() == config  # refused before the run's files changed
    (run / "checkpoints" / "processes.json").write_text('{"process_co')  # torn by some other tool
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "processes.json is damaged" in out and "resuming at step 4" in out
    assert json.loads((run / "checkpoints" / "processes.json").read_text()) == {"process_count": 1, "data_order": 2}


def test_a_batch_without_a_token_carrying_loss_is_refused_not_trained_on(tiny_overrides, tmp_path, capsys,
                                                                          monkeypatch):
    import numpy as np

    from trainer import __main__ as cli
    from trainer import data

    real = data.train_iterator

    class PaddingOnly:  # what a damaged iterator state or shard set can hand the loop
        def __init__(self, iterator):
            self._iterator = iterator

        def __next__(self):
            return {key: np.zeros_like(value) for key, value in next(self._iterator).items()}

    monkeypatch.setattr(data, "train_iterator", lambda *a, **k: PaddingOnly(real(*a, **k)))
    err = error_line(capsys, cli.main([*tiny_overrides, "train.steps=2", "train.checkpoint_every=1"]))
    assert "step 1: the batch holds no token that carries loss, so it was not trained on" in err
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]


def test_trajectory_parts_are_checked_against_their_index_and_one_job_writes_an_output(bd3lm_run, tmp_path):
    from evals import trajectories
    from evals.trajectories import TrajectoriesConfig
    from trainer import runlock

    out = tmp_path / "trajectories"

    def make(*overrides):
        cfg = config_lib.load_into(TrajectoriesConfig(), None, [
            "num_prompts=6", "prompt_tokens=6", "batch_size=4", "rows_per_part=3", "sampling.gen_length=16",
            "keep_unfinished=true", *overrides])
        return trajectories.generate_trajectories(str(bd3lm_run), str(out), cfg)

    first = make()
    parts = sorted(out.glob("part-*"))
    original = {p.name: p.read_bytes() for p in parts}
    parts[0].write_bytes(parts[0].read_bytes() + b'{"question": "q", "answer": "appended"}\n')
    parts[1].unlink()
    assert make() == first  # both parts made again, the index rewritten as it was
    assert {p.name: p.read_bytes() for p in out.glob("part-*")} == original
    (out / "trajectories.json").write_text("")  # an emptied index
    assert make() == first
    holder = runlock.RunLock(str(out), holder="a trajectories job", option="--output")
    holder.acquire()  # another job (alive: this process) writes the output
    try:
        with pytest.raises(runlock.RunLocked, match="is in use by a trajectories job"):
            make("sampling.threshold=0.5")
    finally:
        holder.release()
    assert {p.name for p in out.glob("part-*")} == set(original)


def test_model_init_from_is_checked_against_the_run_tokenizer_and_block_size(bd3lm_run, tiny_dataset,
                                                                             trajectory_dataset, tmp_path, capsys):
    from tests.conftest import TINY_MODEL
    from trainer import export as export_cli

    weights = tmp_path / "weights"
    assert export_cli.main(["--run_dir", str(bd3lm_run), "--output", str(weights)]) == 0
    common = [*TINY_MODEL, f"model.init_from={weights}", "objective.name=bd3lm", "train.steps=1"]
    err = cli_error(capsys, *common, f"data.path={tiny_dataset}", f"run_dir={tmp_path / 'a'}",
                    "objective.block_size=16")
    assert f"model.init_from {weights} was trained with objective.block_size=8, this run has 16" in err
    err = cli_error(capsys, *common, f"data.path={trajectory_dataset}", f"run_dir={tmp_path / 'b'}",
                    "objective.block_size=8")
    assert f"model.init_from {weights} has another tokenizer than {trajectory_dataset}" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any write


# Tokenizer ids -------------------------------------------------------------------------------

def test_a_tokenizer_with_a_gap_in_its_ids_sizes_the_vocabulary_by_its_largest_id(story_file, tmp_path, capsys):
    from tokenizers import Tokenizer

    from pipelines import manifest, preprocess, tokenizer
    from tests.conftest import TINY_MODEL

    spec = json.loads(tokenizer.train_bpe([story_file.read_text()[:50_000]], 300))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|pad|>"]
    del spec["model"]["vocab"]["<|pad|>"]  # one special token removed: id 0 is a gap
    (tmp_path / "gap.json").write_text(json.dumps(spec))
    largest = max(Tokenizer.from_file(str(tmp_path / "gap.json")).get_vocab(with_added_tokens=True).values())
    out = tmp_path / "data"
    assert preprocess.main(["--dataset", "tinystories", "--input", str(story_file), "--output", str(out),
                            "--tokenizer", str(tmp_path / "gap.json"), "--num_shards", "1"]) == 0
    described = manifest.load(str(out))
    assert described["tokenizer"]["vocab_size"] == largest + 1
    assert manifest.main([str(out)]) == 0
    described["tokenizer"]["vocab_size"] = 100  # a manifest whose vocabulary is too small for its ids
    (out / "manifest.json").write_text(json.dumps(described))
    capsys.readouterr()
    assert manifest.main([str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"tokenizer.json has ids up to {largest} but the manifest's vocab_size is 100: re-run preprocess"
    assert err[1].startswith("train-00000-of-00001.array_record holds token id ") and len(err) == 3
    err = cli_error(capsys, f"data.path={out}", f"run_dir={tmp_path / 'run'}", *TINY_MODEL)
    assert f"has token ids up to {largest} but the manifest's vocab_size is 100" in err


def test_a_stored_id_past_the_vocabulary_is_one_line_naming_the_shard(tiny_dataset, tmp_path, capsys):
    import hashlib

    import numpy as np
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    from pipelines import manifest
    from tests.conftest import TINY_MODEL
    from trainer import __main__ as cli

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    name = "train-00000-of-00002.array_record"
    reader = ArrayRecordReader(str(data / name))
    records = [bytearray(r) for r in reader.read_all()]
    reader.close()
    for record in records:  # a tool that wrote ids the tokenizer has not: each record's BOS becomes 9999
        record[4:6] = np.uint16(9999).tobytes()
    (data / name).unlink()
    writer = ArrayRecordWriter(str(data / name), "group_size:1,uncompressed")
    for record in records:
        writer.write(bytes(record))
    writer.close()
    described = manifest.load(str(data))  # the manifest describes the new bytes: only the ids are wrong
    shard = next(s for s in described["splits"]["train"]["shards"] if s["file"] == name)
    shard.update(num_bytes=(data / name).stat().st_size, sha256=hashlib.sha256((data / name).read_bytes()).hexdigest())
    (data / "manifest.json").write_text(json.dumps(described))
    assert manifest.main([str(data)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{name} holds token id 9999, not below the manifest's vocab_size 320: re-run preprocess"]
    err = error_line(capsys, cli.main([f"data.path={data}", f"run_dir={tmp_path / 'run'}", *TINY_MODEL,
                                       "train.steps=2"]))
    assert f"shard {data / name} holds token id 9999, past the manifest's vocab_size 320" in err


# One writer per output -----------------------------------------------------------------------

def test_a_killed_overwrite_leaves_no_staging_folder_and_a_running_one_is_refused(story_file, tmp_path, capsys):
    import fcntl
    import os

    from pipelines import preprocess

    args = ["--dataset", "tinystories", "--input", str(story_file), "--output", str(tmp_path / "o"),
            "--vocab_size", "300", "--num_shards", "1"]
    assert preprocess.main(args) == 0
    killed = tmp_path / "o.staging-0000dead"  # what kill -9 leaves: no process holds its .owner lock
    killed.mkdir()
    (killed / ".owner").touch()
    (killed / "train-00000-of-00001.array_record").write_bytes(b"half a shard")
    running = tmp_path / "o.staging-1111live"
    running.mkdir()
    fd = os.open(running / ".owner", os.O_CREAT | os.O_WRONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a job still writing it
    try:
        capsys.readouterr()
        err = error_line(capsys, preprocess.main([*args, "--overwrite"]))
        assert f"another preprocess job is replacing {tmp_path / 'o'}" in err
    finally:
        os.close(fd)
    assert preprocess.main([*args, "--overwrite"]) == 0
    assert not list(tmp_path.glob("o.staging-*")) and (tmp_path / "o" / "manifest.json").exists()
    assert not (tmp_path / "o" / ".owner").exists()


# Atomic JSON ---------------------------------------------------------------------------------

# Every direct file write in the three packages, by (file, function): the rest go through
# trainer/files.write_whole or pipelines/storage.write_bytes_atomic. A new direct write fails here.
DIRECT_WRITES = {
    ("trainer/files.py", "write_whole"): "the trainer's and evals' helper itself",
    ("pipelines/storage.py", "write_bytes_atomic"): "the preprocess job's helper itself",
    ("pipelines/storage.py", "copy_local_file_atomic"): "the preprocess job's helper for shards",
    ("trainer/runlock.py", "_create"): "creates the lock exclusively (O_EXCL); renewed through write_whole",
    ("trainer/observe.py", "write"): "appends metrics.jsonl lines (a torn last line is dropped on resume)",
    ("evals/ledger.py", "_locked"): "opens the ledger's flock file, never writes it",
    ("pipelines/output.py", "_claim"): "opens a staging folder's flock file, never writes it",
    ("pipelines/spill.py", "write"): "a job's scratch files, never read after it",
    ("pipelines/steps.py", "process"): "ArrayRecordWriter to a local temporary file, then copied atomically",
    ("pipelines/corpus.py", "write_tinystories_layout"): "a generated input corpus, rewritten whole by each run",
}


def direct_writes() -> set[tuple[str, str]]:
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    writers = {"write_text", "write_bytes", "save_file", "fdopen", "ArrayRecordWriter", "create"}
    found = set()
    for path in sorted(p for package in ("trainer", "evals", "pipelines") for p in (root / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if isinstance(node, ast.Constant) and node.value in writers:  # getattr(path, "write_text")
                    found.add((str(path.relative_to(root)), function.name))
                if not isinstance(node, ast.Call):
                    continue
                method = isinstance(node.func, ast.Attribute)
                name = node.func.attr if method else getattr(node.func, "id", "")
                mode = next((a.value for a in node.args[0 if method else 1:][:1] if isinstance(a, ast.Constant)), "")
                os_open = method and getattr(node.func.value, "id", "") == "os"
                if name in writers or name == "open" and (os_open or isinstance(mode, str) and set(mode) & set("wax+")):
                    found.add((str(path.relative_to(root)), function.name))
    return found


def test_every_file_the_stack_rewrites_goes_through_the_atomic_helpers():
    # Scanned in a fresh interpreter: CPython 3.11's ast.parse shares a recursion counter across
    # threads (gh-106905), and threads that earlier tests leave running can make it fail spuriously.
    scan = ("import json, sys; sys.path.insert(0, 'tests'); from test_integrity import direct_writes; "
            "print(json.dumps(sorted(direct_writes())))")
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", scan], cwd=root, capture_output=True, text=True, check=True).stdout
    assert {tuple(pair) for pair in json.loads(out)} == set(DIRECT_WRITES)


# Signals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_evals_with_its_exit_status_and_keeps_the_finished_steps(trained, tmp_path, monkeypatch,
                                                                                no_sigterm_kill, signum):
    from evals import run as run_lib

    run = copy_of(trained, tmp_path)
    real = run_lib.Evaluator.evaluate

    def stopped_at_step_4(self, step):
        if step == 4:
            signal.raise_signal(signum)
        return real(self, step)

    monkeypatch.setattr(run_lib.Evaluator, "evaluate", stopped_at_step_4)
    assert evals_once(run) == 128 + signum  # 130 / 143: a scheduler never reads it as a success
    assert Ledger(str(run)).steps() == {2}
    monkeypatch.setattr(run_lib.Evaluator, "evaluate", real)
    assert evals_once(run) == 0 and Ledger(str(run)).steps() == {2, 4}


def test_sigint_stops_the_trainer_with_a_checkpoint_and_130(tiny_overrides, tmp_path, monkeypatch):
    from trainer import __main__ as cli

    def unhandled(signum, frame):
        raise AssertionError("SIGINT was not handled")

    previous = signal.signal(signal.SIGINT, unhandled)
    real, calls = train.real_tokens, []

    def interrupted_in_step_3(batch):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real(batch)

    monkeypatch.setattr(train, "real_tokens", interrupted_in_step_3)
    try:
        assert cli.main([*tiny_overrides, "train.steps=6", "train.checkpoint_every=100"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()] == ["3"]


def test_sigterm_stops_preprocess_with_143_and_keeps_the_finished_dataset(story_file, tmp_path, monkeypatch,
                                                                          no_sigterm_kill):
    from pipelines import preprocess

    args = ["--dataset", "tinystories", "--input", str(story_file), "--output", str(tmp_path / "o"),
            "--vocab_size", "300", "--num_shards", "1"]
    assert preprocess.main(args) == 0
    finished = (tmp_path / "o" / "manifest.json").read_bytes()

    def terminated(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(preprocess, "write_manifest", terminated)
    assert preprocess.main([*args, "--overwrite"]) == 143
    assert (tmp_path / "o" / "manifest.json").read_bytes() == finished and not list(tmp_path.glob("o.staging-*"))


# Settings in the ledger ----------------------------------------------------------------------

def test_evaluating_again_under_other_settings_is_refused_or_recorded_beside(trained, tmp_path, capsys):
    run = copy_of(trained, tmp_path)
    assert evals_once(run) == 0
    capsys.readouterr()
    err = error_line(capsys, evals_once(run, "sampling.seed=1"))
    assert "step(s) [2, 4]" in err and "under other settings (sampling.seed 0 -> 1)" in err and "--force" in err
    assert len(Ledger(str(run)).records()) == 2  # nothing evaluated, nothing lost
    assert evals_once(run, "sampling.seed=1", "--force") == 0
    records = Ledger(str(run)).records()
    assert sorted((r["step"], r["settings"]["sampling"]["seed"]) for r in records) == [(2, 0), (2, 1), (4, 0), (4, 1)]
    assert len((run / "evals" / "ledger.jsonl").read_text().splitlines()) == 4
    assert len({r["settings_hash"] for r in records}) == 2
    capsys.readouterr()
    assert evals_once(run, "sampling.seed=1") == 0  # both settings are recorded: nothing left to do
    assert "every committed checkpoint is evaluated (2)" in capsys.readouterr().out


# One-line errors -----------------------------------------------------------------------------

def test_damaged_records_are_one_line_naming_the_shard(trained, tiny_dataset, tmp_path, capsys):
    from pipelines import manifest
    from tests.conftest import TINY_MODEL
    from trainer import __main__ as cli

    damaged = tmp_path / "data"
    shutil.copytree(tiny_dataset, damaged)

    def damage(name):
        raw = bytearray((damaged / name).read_bytes())
        for i in range(200, len(raw) // 2, 501):  # records' chunks
            raw[i] ^= 0xFF
        (damaged / name).write_bytes(bytes(raw))

    damage("train-00001-of-00002.array_record")
    err = error_line(capsys, cli.main([f"data.path={damaged}", f"run_dir={tmp_path / 'run2'}", *TINY_MODEL,
                                       "data.verify=quick", "train.steps=2"]))
    assert f"shard {damaged}/train-00001-of-00002.array_record is damaged" in err
    assert f"python -m pipelines.manifest {damaged}" in err
    damage("validation-00000-of-00001.array_record")
    run = copy_of(trained, tmp_path)
    err = error_line(capsys, evals_once(run, f"data_path={damaged}"))
    assert f"shard {damaged}/validation-00000-of-00001.array_record is damaged" in err
    assert f"python -m pipelines.manifest {damaged}" in err and not (run / "evals").exists()
    assert manifest.main([str(damaged)]) == 1
    assert len(capsys.readouterr().err.splitlines()) == 2  # one line per damaged shard


def test_disk_full_while_saving_a_checkpoint_is_one_line_with_the_path_and_bytes(tiny_overrides, tmp_path, capsys,
                                                                                 monkeypatch):
    import orbax.checkpoint as ocp

    from trainer import __main__ as cli

    def no_space(self, step, *args, **kwargs):  # what orbax raises when tensorstore hits ENOSPC
        raise ValueError(f"RESOURCE_EXHAUSTED: Error writing {self.directory}/{step}: Failed to write 1024 bytes: "
                         f"No space left on device [os_error_code='28']")

    monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
    err = error_line(capsys, cli.main([*tiny_overrides, "train.steps=2", "train.checkpoint_every=2"]))
    assert f"no space left on the device saving a checkpoint to {tmp_path / 'run' / 'checkpoints'} (" in err
    assert "bytes needed" in err


def test_lone_surrogates_in_a_json_line_are_a_dead_letter(stories, tmp_path):
    from pipelines import preprocess

    lines = [json.dumps({"text": s}) for s in stories[:200]] + ['{"text": "a story \\ud800 cut in half"}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    assert preprocess.main(["--dataset", "tinystories", "--input", str(tmp_path / "in.jsonl"), "--output",
                            str(tmp_path / "o"), "--vocab_size", "300", "--max_bad_fraction", "0.01"]) == 0
    (letter,) = [json.loads(line) for line in (tmp_path / "o" / "dead_letter.jsonl").read_text().splitlines()]
    assert letter["reason"] == "invalid_text" and "surrogates not allowed" in letter["detail"]
    assert json.loads(letter["raw"])["text"] == "a story \ud800 cut in half"  # the record as it came, escapes kept


def test_pipelines_manifest_compares_sizes_and_reports_damage_in_one_line(tiny_dataset, tmp_path, capsys):
    from pipelines import manifest

    damaged = tmp_path / "data"
    shutil.copytree(tiny_dataset, damaged)
    sizes = {s["file"]: s["num_bytes"] for split in manifest.load(str(damaged))["splits"].values()
             for s in split["shards"]}
    truncated = damaged / "train-00000-of-00002.array_record"
    appended = damaged / "validation-00000-of-00001.array_record"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    appended.write_bytes(appended.read_bytes() + b"more")
    assert manifest.main([str(damaged), "--quick"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"train-00000-of-00002.array_record is {sizes[truncated.name] - 100:,} bytes, the manifest says "
        f"{sizes[truncated.name]:,}: it was truncated or appended to",
        f"validation-00000-of-00001.array_record is {sizes[appended.name] + 4:,} bytes, the manifest says "
        f"{sizes[appended.name]:,}: it was truncated or appended to"]
    with pytest.raises(SystemExit) as help_exit:
        manifest.main(["--help"])
    assert help_exit.value.code == 0 and "usage: python -m pipelines.manifest" in capsys.readouterr().out


@pytest.mark.parametrize("content,kind", [("", "an empty"), ('{"step": 30, "perpl', "a damaged")])
def test_a_damaged_or_empty_step_record_is_evaluated_again_and_replaced(tmp_path, capsys, content, kind):
    ledger = Ledger(str(tmp_path))
    ledger.append({"step": 10, "perplexity": {}})
    (tmp_path / "evals" / "steps" / "000000000030.json").write_text(content)
    (tmp_path / "evals" / "ledger.jsonl").unlink()  # rebuilt from the step files
    assert ledger.steps() == {10}
    assert f"warning: skipped {kind} ledger entry" in capsys.readouterr().out
    ledger.append({"step": 30, "perplexity": {"ppl_bound": 2.0}})  # evaluated again
    assert json.loads((tmp_path / "evals" / "steps" / "000000000030.json").read_text())["perplexity"] == {"ppl_bound": 2.0}
    Ledger(str(tmp_path)).append({"step": 40, "perplexity": {}})  # a later record rewrites the view
    assert Ledger(str(tmp_path)).steps() == {10, 30, 40}
    assert [json.loads(x)["step"] for x in (tmp_path / "evals" / "ledger.jsonl").read_text().splitlines()] == [10, 30, 40]


def test_an_export_replaces_another_only_whole_and_only_when_asked(tiny_overrides, tmp_path, capsys):
    from trainer import export

    cfg = config_lib.load(None, [*tiny_overrides, "train.steps=4", "train.checkpoint_every=2", "train.keep_last=2"])
    assert train.run(cfg) == 0
    run, out = str(tmp_path / "run"), tmp_path / "export"
    assert export.main(["--run_dir", run, "--step", "2", "--output", str(out), "--max_shard_mb", "0"]) == 0
    sharded = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in sharded and len([n for n in sharded if n.startswith("model-")]) > 2
    capsys.readouterr()
    assert export.main(["--run_dir", run, "--output", str(out)]) == 2
    assert "already holds an export: pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sharded  # refused: untouched
    assert export.main(["--run_dir", run, "--output", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "config.yaml", "model.safetensors", "tokenizer.json"]
    assert json.loads((out / "config.json").read_text())["diffusion_lm"]["step"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    capsys.readouterr()
    assert export.main(["--run_dir", run, "--output", run, "--overwrite"]) == 2  # not an export: never replaced
    assert "holds files that are not an export" in capsys.readouterr().err


def test_a_full_disk_when_the_run_lock_is_created_is_one_line_and_leaves_no_lock(tiny_overrides, tmp_path, capsys,
                                                                                 monkeypatch):
    import errno
    import os

    from trainer import __main__ as trainer_cli

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd, *args, **kwargs):
            self._file = real_fdopen(fd, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", FullDisk)
    assert trainer_cli.main([*tiny_overrides, "train.steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left on the device creating the run lock") and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / ".lock").exists()
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert trainer_cli.main([*tiny_overrides, "train.steps=2"]) == 0  # space again: nothing stands in the way


def test_a_checkpoint_larger_than_the_free_space_is_refused_before_its_save_starts(tiny_overrides, tmp_path, capsys,
                                                                                   monkeypatch):
    import collections
    import shutil as shutil_module

    import orbax.checkpoint as ocp

    from trainer import __main__ as cli

    started = []
    real_save = ocp.CheckpointManager.save
    monkeypatch.setattr(ocp.CheckpointManager, "save", lambda self, step, *a, **k: started.append(step) or
                        real_save(self, step, *a, **k))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    err = error_line(capsys, cli.main([*tiny_overrides, "train.steps=4", "train.checkpoint_every=2"]))
    assert "no space left on the device saving a checkpoint" in err and "1,000 free" in err
    assert started == []  # refused at the first save, before any background write began
    assert not (tmp_path / "run" / "checkpoints" / "2").exists()


def test_a_checkpoint_whose_metadata_this_orbax_cannot_read_is_skipped_by_the_trainer_and_recorded_by_evals(
        trained, tmp_path, capsys):
    from tests.conftest import TINY_MODEL
    from trainer import __main__ as trainer_cli

    run = copy_of(trained, tmp_path)
    metadata = run / "checkpoints" / "4" / "state" / "_METADATA"
    tree = json.loads(metadata.read_text())
    for entry in tree["tree_metadata"].values():  # as a newer orbax might write them
        for key in entry["key_metadata"]:
            key["key_type"] = 99
    metadata.write_text(json.dumps(tree))
    assert evals_once(run) == 0  # the intact step is evaluated, the other recorded as unreadable
    records = [json.loads(line) for line in (run / "evals" / "ledger.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "perplexity" in r] == [2]
    assert any(r["step"] == 4 and "unreadable" in json.dumps(r) for r in records)
    capsys.readouterr()
    config = config_lib.load_run(run)
    assert trainer_cli.main([f"data.path={config.data.path}", f"run_dir={run}", *TINY_MODEL, "train.steps=6",
                             "train.checkpoint_every=2"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint step 4 is unreadable" in out and "resuming at step 2" in out
