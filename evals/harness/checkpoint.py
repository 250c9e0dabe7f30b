"""The checkpoint the harness model scores: weights, the run's config, tokenizer and special ids."""

from __future__ import annotations

from typing import Any, NamedTuple

from flax import nnx
from tokenizers import Tokenizer

from evals import runs
from trainer.config import Config


class Checkpoint(NamedTuple):
    run_dir: str
    run_cfg: Config  # its data.path is the data the tasks read (the run's, or data_path)
    tokenizer: Tokenizer  # the run's tokenizer.json
    ids: dict[str, int | None]  # special ids: pad, bos, eos, mask
    graphdef: nnx.GraphDef
    params: Any
    step: int


def load(run_dir: str, step: int = 0, data_path: str = "") -> Checkpoint:
    """A run's committed checkpoint `step` (0 = the latest) or a trainer.export directory, on this
    process's first device; `data_path`: another preprocess output with the same tokenizer."""
    run = runs.open_run(run_dir, data_path)
    graphdef, params, step = run.weights(step)
    return Checkpoint(run_dir, run.cfg, run.tokenizer, run.ids, graphdef, params, step)
