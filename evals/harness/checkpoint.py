"""The checkpoint the harness model scores: weights, the run's config, tokenizer and special ids."""

from __future__ import annotations

from typing import Any, NamedTuple

from flax import nnx
from tokenizers import Tokenizer

from evals import runs
from trainer import data, state
from trainer.config import Config
from trainer.errors import RunError


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
    run_cfg = runs.load_config(run_dir)
    manifest = runs.eval_data(run_cfg, data_path)
    exported = runs.exported_step(run_dir)
    if exported is None:
        graphdef, params, step = state.load_params(run_dir, step or None, run_cfg)
    elif step in (0, exported):
        (graphdef, params), step = runs.load_exported(run_dir, run_cfg), exported
    else:
        raise RunError(f"{run_dir} is an export of step {exported}, not of step {step}")
    tokenizer = runs.tokenizer(run_cfg.data.path, manifest)
    return Checkpoint(run_dir, run_cfg, tokenizer, data.special_ids(manifest), graphdef, params, step)
