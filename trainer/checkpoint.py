"""orbax checkpoints: a Composite of the train state (params, optimizer, step, RNG) and Grain's iterator.

Only committed steps are listed by orbax (a step being written lives under a temporary
name), so a restart always resumes from a complete state.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from trainer.config import TrainConfig


def manager(run_dir: str, cfg: TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_last,
        keep_period=cfg.keep_every or None,  # kept on top of the last N, for evals to catch up
        enable_async_checkpointing=True,
        create=True,
    )
    directory = run_dir if "://" in run_dir else os.path.abspath(run_dir)  # orbax needs absolute paths
    return ocp.CheckpointManager(epath.Path(directory) / "checkpoints", options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any], iterator, force: bool = False):
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)), force=force)


def restore_latest(mngr: ocp.CheckpointManager, state: dict[str, Any], iterator) -> dict[str, Any] | None:
    """The latest committed state (the iterator is restored in place), or None for a fresh run."""
    step = mngr.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(iterator)))
    return restored["state"]
