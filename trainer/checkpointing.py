"""Saving and resuming training: orbax checkpoints, a Composite of the train state (params,
optimizer, step, RNG) and Grain's iterator, and read-only views of a run's committed steps.

Only committed steps are listed by orbax (a step being written lives under a temporary
name), so a restart always resumes from a complete state.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from trainer.config import TrainConfig
from trainer.errors import MismatchError, RunError, TopologyError


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
    """Saves asynchronously; a step already on disk (one that could not be restored) is replaced."""
    if step in mngr.all_steps():
        mngr.wait_until_finished()
        mngr.delete(step)
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)), force=force)


def check_data_state(run_dir: str, data_order: int) -> None:
    """Grain's iterator state is one per process and means something only under the data order that
    wrote it, so a run resumes only with the process count and data order it started with (devices
    per process and the mesh may change). The first start records both."""
    record = epath.Path(run_dir) / "checkpoints" / "processes.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved["process_count"] != jax.process_count():
            raise TopologyError(f"{run_dir} was trained by {saved['process_count']} process(es); its data-iterator "
                                f"state cannot resume on {jax.process_count()}: use {saved['process_count']} "
                                f"processes or a new run_dir")
        if saved.get("data_order", 1) != data_order:  # runs before the record held it used order 1
            raise TopologyError(f"{run_dir} was trained under data order {saved.get('data_order', 1)} and this "
                                f"trainer reads data order {data_order}: its data-iterator state cannot resume; "
                                f"start a new run_dir (train.init_from_run={run_dir} keeps its weights)")
    elif jax.process_index() == 0:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"process_count": jax.process_count(), "data_order": data_order}))


def restore_latest(mngr: ocp.CheckpointManager, state: dict[str, Any], iterator) -> dict[str, Any] | None:
    """The latest readable committed state (the iterator is restored in place), or None for a fresh
    run. An unreadable step (a damaged file, or a read that failed) is reported and the step before
    it is used; it stays on disk until the run saves that step again (`save` replaces it)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(iterator)))
        except Exception as e:  # orbax/tensorstore raise many kinds for a damaged file
            print(f"warning: checkpoint step {step} is unreadable ({first_line(e)}); trying the one before it")
            continue
        return restored["state"]
    if steps:
        raise RunError(f"no checkpoint of {mngr.directory} is readable (steps {sorted(steps)} were damaged)")
    return None


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def params_of_run(run_dir: str, state: dict[str, Any]) -> dict[str, Any]:
    """The params of another run's latest committed checkpoint, placed like `state`'s params.

    The other run's optimizer must have the same structure (same optim config keys)."""
    source = reader(run_dir)
    step = source.latest_step()
    if step is None:
        raise RunError(f"train.init_from_run {run_dir} has no committed checkpoint")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        restored = source.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except (ValueError, KeyError) as e:
        raise MismatchError(f"train.init_from_run {run_dir} step {step} does not fit this model: "
                            f"{str(e).splitlines()[0]}") from None
    return restored["state"]["params"]


def reader(run_dir: str) -> ocp.CheckpointManager:
    """A read-only view of a run's checkpoints (safe beside a live trainer)."""
    directory = run_dir if "://" in run_dir else os.path.abspath(run_dir)
    return ocp.CheckpointManager(epath.Path(directory) / "checkpoints",
                                 options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def committed_steps(mngr: ocp.CheckpointManager) -> list[int]:
    """Steps whose checkpoint is fully committed (orbax lists no temporary or unfinished step), as of now."""
    mngr.reload()
    return sorted(mngr.all_steps())


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_state: dict[str, Any]) -> dict[str, Any]:
    """The params of `step`, placed on this process's first device whatever mesh trained them."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored["state"]["params"]
