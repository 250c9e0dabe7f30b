"""Shared fixtures: a small generated corpus, the real samples in ../shared/data, the GCS emulator."""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

# One XLA compilation cache for the session and every subprocess it starts: tests compile the same
# programs (train steps, samplers) many times over; a cache hit returns the same executable.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="jax-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

from pipelines import corpus
from tests.gcs import GcsEmulator

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def stories() -> list[str]:
    return list(corpus.generate_stories(800, seed=7))


@pytest.fixture(scope="session")
def story_file(tmp_path_factory, stories) -> pathlib.Path:
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    corpus.write_tinystories_layout(iter(stories), str(path))
    return path


@pytest.fixture
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not present at {SHARED_DATA} (see shared/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gcs_emulator():
    with GcsEmulator() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, story_file) -> pathlib.Path:
    """The sample corpus preprocessed with a small BPE: what trainer and eval tests read."""
    from pipelines import preprocess

    out = tmp_path_factory.mktemp("dataset") / "data"
    assert preprocess.main(["--dataset", "tinystories", "--input", str(story_file), "--output", str(out),
                            "--vocab_size", "320", "--num_shards", "2", "--validation_fraction", "0.1"]) == 0
    return out


TINY_MODEL = ["model.hidden=32", "model.layers=2", "model.heads=2", "model.mlp_hidden=64",
              "model.max_seq_len=64", "data.seq_len=64", "data.pack_documents=64", "train.global_batch=8",
              "optim.warmup_steps=5", "optim.lr=3e-3", "wandb.mode=disabled", "train.log_every=1"]


@pytest.fixture(scope="session")
def bd3lm_run(tiny_dataset, tmp_path_factory) -> pathlib.Path:
    """A tiny block-diffusion run trained 40 steps (blocks of 8) on tiny_dataset: what training,
    eval and trajectory tests read."""
    from trainer import config as config_lib
    from trainer import train

    run_dir = tmp_path_factory.mktemp("runs") / "bd3lm"
    cfg = config_lib.load(None, [f"data.path={tiny_dataset}", f"run_dir={run_dir}", *TINY_MODEL,
                                 "objective.name=bd3lm", "objective.block_size=8", "train.steps=40",
                                 "train.checkpoint_every=40"])
    assert train.run(cfg) == 0
    return run_dir


@pytest.fixture
def tiny_overrides(tiny_dataset, tmp_path) -> list[str]:
    """key=value overrides for a CPU-sized MDLM run on tiny_dataset in a fresh run_dir."""
    return [f"data.path={tiny_dataset}", f"run_dir={tmp_path / 'run'}", *TINY_MODEL]


@pytest.fixture(scope="session")
def trajectory_dataset(tmp_path_factory) -> pathlib.Path:
    """Arithmetic question/answer trajectories, preprocessed like DMax's (generated: no shared/ needed)."""
    import json
    import random

    from pipelines import preprocess

    rng = random.Random(0)
    rows = []
    for _ in range(400):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        rows.append({"question": f"Tom has {a} apples and gets {b} more. How many apples does he have?",
                     "answer": f"He has {a} + {b} = {a + b} apples.\nThe answer is {a + b}."})
    source = tmp_path_factory.mktemp("trajectories") / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = source.parent / "data"
    assert preprocess.main(["--dataset", "dmax_trajectories", "--input", str(source), "--output", str(out),
                            "--vocab_size", "300", "--num_shards", "2", "--validation_fraction", "0.1"]) == 0
    return out
