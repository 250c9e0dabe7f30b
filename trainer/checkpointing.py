"""Saving and resuming training: orbax checkpoints, a Composite of the train state (params,
optimizer, step, RNG), Grain's iterator and the loader settings that iterator state means something
under, and read-only views of a run's committed steps.

Only committed steps are listed by orbax (a step being written lives under a temporary
name), so a restart always resumes from a complete state. Whatever is read back is checked against
what reads it before it is used: the params' shapes against the config (from the checkpoint's
metadata alone), the iterator state's step and loader settings against the run's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from trainer.config import Config, TrainConfig
from trainer.errors import MismatchError, RunError, TopologyError
from trainer.files import DiskFull, write_whole

LOADER = "loader"  # the Composite item holding the loader settings and step of the iterator state
IDENTITY = "identity.json"  # under checkpoints/: what the run is, fixed at its first step (check_identity)
RUN_ID = "run_id"  # the identity's random id, saved in every checkpoint's loader record
ITERATOR_SHA = "iterator sha256"  # the loader record's hash of the iterator state it was saved beside


def manager(run_dir: str, cfg: TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_last,
        keep_period=cfg.keep_every or None,  # kept on top of the last N, for evals to catch up
        enable_async_checkpointing=True,
        create=True,
    )
    directory = run_dir if "://" in run_dir else os.path.abspath(run_dir)  # orbax needs absolute paths
    return ocp.CheckpointManager(epath.Path(directory) / "checkpoints", options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any], iterator, loader: dict[str, Any],
         force: bool = False):
    """Saves asynchronously; a step already on disk (one that could not be restored) is replaced.
    `loader`: the settings the iterator state means something under (data.loader_settings) and the
    run's id; saved with the step and the iterator state's hash."""
    if step in mngr.all_steps():
        mngr.wait_until_finished()
        mngr.delete(step)
    check_space(str(mngr.directory), state)
    record = {**loader, "step": step, ITERATOR_SHA: iterator_sha(iterator)}
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator),
        **{LOADER: ocp.args.JsonSave(record)}), force=force)


def iterator_sha(iterator) -> str:
    """A hash of the iterator's state (the position in the data): an edited position is refused."""
    return hashlib.sha256(json.dumps(iterator.get_state(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(cfg: Config, tokenizer_sha256: str) -> dict[str, Any]:
    """What a run is, beyond its model's shape (checked against every checkpoint's metadata): the
    objective, the blocks evals decode with, and the tokenizer its data was written with."""
    from trainer import objectives

    return {"objective.name": cfg.objective.name,
            "objective.block_size": objectives.get(cfg.objective.name).block_size(cfg.objective),
            "tokenizer sha256": tokenizer_sha256}


def read_identity(run_dir: str) -> dict[str, Any] | None:
    """The identity recorded at a run's first step (None: a run from before identities, or none yet)."""
    path = epath.Path(run_dir) / "checkpoints" / IDENTITY
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        raise RunError(f"{path} is damaged: restore it (it fixes what the run is) or start a new run_dir") from None


def identity_conflict(saved: dict[str, Any], identity: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """(key, the run's value, the other value) where `identity` differs from the recorded one, or None."""
    return next(((key, saved[key], value) for key, value in identity.items() if key in saved and saved[key] != value),
                None)


def check_identity(run_dir: str, identity: dict[str, Any], write: bool) -> str:
    """The run's id. A run's identity is fixed at its first step: resuming as anything else is refused
    in one line (the way out: a new run_dir with train.init_from_run). `write`: record it when the
    run has none (process 0, under the run lock)."""
    saved = read_identity(run_dir)
    if saved is not None:
        conflict = identity_conflict(saved, identity)
        if conflict:
            key, theirs, ours = conflict
            raise MismatchError(f"{run_dir} was trained with {key}={theirs}, this config has {ours}: resume with the "
                                f"run's settings, or start a new run_dir with train.init_from_run={run_dir} (keeps "
                                f"its weights)")
        return saved[RUN_ID]
    record = {RUN_ID: uuid.uuid4().hex, **identity}
    if write:
        path = epath.Path(run_dir) / "checkpoints" / IDENTITY
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, json.dumps(record, indent=1))
    return record[RUN_ID]


def check_owner(mngr: ocp.CheckpointManager, run_dir: str, step: int) -> None:
    """Refuses a committed step written by another run (a checkpoint folder copied in): its loader
    record's run id is not the run's. Runs and steps from before run ids are not checked."""
    saved = read_identity(run_dir)
    if saved is None or not (epath.Path(mngr.directory) / str(step) / LOADER).exists():
        return
    try:
        record = mngr.restore(step, args=ocp.args.Composite(**{LOADER: ocp.args.JsonRestore()}))[LOADER]
    except Exception:  # a damaged record: restoring the step reports it
        return
    if record.get(RUN_ID) not in (None, saved[RUN_ID]):
        raise RunError(f"checkpoint step {step} of {run_dir} was written by another run (run id {record[RUN_ID]}, "
                       f"this run's {saved[RUN_ID]}): a checkpoint copied in from elsewhere; remove it")


def is_disk_full(error: BaseException) -> bool:
    """Whether an error (or one it wraps: orbax and tensorstore re-raise) is ENOSPC."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class _QuietDiskFull(logging.Filter):
    """orbax logs every failed background write of a checkpoint with its traceback (and asyncio each
    of its tasks' errors at exit); one that does not fit is reported once, in one line, by the trainer
    (`disk_full`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ("No space left on device" in record.getMessage() or (error is not None and is_disk_full(error)))


for _logger in ("absl", "asyncio"):
    logging.getLogger(_logger).addFilter(_QuietDiskFull())


def state_bytes(state: dict[str, Any]) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def check_space(checkpoints: str, state: dict[str, Any]) -> None:
    """Before an asynchronous save: a checkpoint that cannot fit on local disk is refused now, in one
    line, instead of failing in the background (a flood of event-loop errors, reported a save late)."""
    if "://" in checkpoints or not os.path.isdir(checkpoints):
        return
    if shutil.disk_usage(checkpoints).free < state_bytes(state):
        raise disk_full(str(epath.Path(checkpoints).parent), state)


def disk_full(run_dir: str, state: dict[str, Any]) -> DiskFull:
    """The one-line error for a checkpoint that did not fit: where, how many bytes, how many free."""
    needed = state_bytes(state)
    directory = epath.Path(run_dir) / "checkpoints"
    free = "" if "://" in run_dir else f", {shutil.disk_usage(directory).free:,} free"
    return DiskFull(f"no space left on the device saving a checkpoint to {directory} ({needed:,} bytes needed"
                    f"{free}): free space or lower train.keep_last; the committed checkpoints are intact and "
                    f"re-running resumes from the latest")


def check_data_state(run_dir: str, data_order: int) -> None:
    """Grain's iterator state is one per process and means something only under the data order that
    wrote it, so a run resumes only with the process count and data order it started with (devices
    per process and the mesh may change). The first start records both."""
    record = epath.Path(run_dir) / "checkpoints" / "processes.json"
    saved = _read_record(record)
    if saved is not None:
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
        write_whole(record, json.dumps({"process_count": jax.process_count(), "data_order": data_order}))


def _read_record(path: epath.Path) -> dict[str, Any] | None:
    """processes.json, or None where there is none yet. A damaged one (another tool's torn write) is
    rewritten: each checkpoint's own loader record holds the same facts and is checked on restore."""
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        if isinstance(saved, dict) and isinstance(saved.get("process_count"), int):
            return saved
    except ValueError:
        pass
    print(f"warning: {path} is damaged; rewriting it (each checkpoint's loader record is checked instead)")
    return None


def restore_latest(mngr: ocp.CheckpointManager, state: dict[str, Any], iterator,
                   loader: dict[str, Any]) -> dict[str, Any] | None:
    """The latest readable committed state (the iterator is restored in place), or None for a fresh
    run. An unreadable step (a damaged file, or a read that failed) is reported and the step before
    it is used; it stays on disk until the run saves that step again (`save` replaces it). A step
    whose params do not fit `state` or whose iterator state was written under other `loader`
    settings is refused in one line: it is readable, but not by this config."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        check_shapes(mngr, step, abstract["params"], "resume with the model the run was trained with or use a "
                                                     "new run_dir")
        recorded = (epath.Path(mngr.directory) / str(step) / LOADER).exists()  # older checkpoints have none
        items = {"state": ocp.args.StandardRestore(abstract), "data": grain.checkpoint.CheckpointRestore(iterator),
                 **({LOADER: ocp.args.JsonRestore()} if recorded else {})}
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore raise many kinds for a damaged file
            print(f"warning: checkpoint step {step} is unreadable ({first_line(e)}); trying the one before it")
            continue
        if recorded:
            check_loader(str(mngr.directory), restored[LOADER], int(restored["state"]["step"]), loader)
            if restored[LOADER].get(ITERATOR_SHA) not in (None, iterator_sha(iterator)):
                raise TopologyError(f"{mngr.directory}/{step}: its data-iterator state is not the one saved with "
                                    f"it (altered since): remove step {step} to resume from the one before")
        return restored["state"]
    if steps:
        raise RunError(f"no checkpoint of {mngr.directory} is readable (steps {sorted(steps)} were damaged)")
    return None


# Loader settings newer trainers record, with the value a checkpoint that predates them was read under.
RECORDED_SINCE = {"data.eos_fill": False}


def check_loader(directory: str, saved: dict[str, Any], step: int, loader: dict[str, Any]) -> None:
    """The iterator state resumes only at the step it was saved with and under the loader settings
    that wrote it: another global batch, stream count, row length or dataset would read other rows."""
    if saved.get("step") != step:
        raise TopologyError(f"{directory}/{step}: its data-iterator state was saved at step {saved.get('step')}, "
                            f"its train state at step {step}: the checkpoint was altered; remove step {step}")
    if saved.get(RUN_ID) not in (None, loader.get(RUN_ID)):
        raise TopologyError(f"{directory}/{step} was written by another run (run id {saved[RUN_ID]}, this run's "
                            f"{loader.get(RUN_ID)}): a checkpoint copied in from elsewhere; remove it")
    for key, value in loader.items():
        if key != RUN_ID and saved.get(key, RECORDED_SINCE.get(key)) != value:
            raise TopologyError(f"{directory}/{step}: its data-iterator state was saved with {key}={saved.get(key)}, "
                                f"this run has {value}: resume with the settings and data it was saved with, or "
                                f"start a new run_dir (train.init_from_run keeps the weights)")


def param_shapes(mngr: ocp.CheckpointManager, step: int) -> dict[str, tuple[int, ...]] | None:
    """Each parameter's shape in `step`'s checkpoint, read from its metadata alone (None: the
    metadata is unreadable, which restoring the step reports)."""
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.metadata(epath.Path(mngr.directory) / str(step) / "state").item_metadata
        return shapes_by_name(tree["params"])
    except Exception:  # a damaged file: the restore that follows reports it
        return None


def shapes_by_name(params: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape) for path, leaf in leaves}


def shape_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str | None:
    """How a checkpoint's params differ from what a config describes (None: they agree)."""
    for name in sorted(set(expected) | set(found)):
        if name not in expected:
            return f"holds params {name}, which the config has not"
        if name not in found:
            return f"lacks params {name}, which the config has"
        if expected[name] != found[name]:
            return f"holds params {name} of shape {found[name]}, the config gives {expected[name]}"
    return None


def check_shapes(mngr: ocp.CheckpointManager, step: int, abstract_params: Any, remedy: str) -> None:
    """Refuses, in one line, a checkpoint whose params are not the ones the config describes."""
    found = param_shapes(mngr, step)
    problem = found is not None and shape_mismatch(shapes_by_name(abstract_params), found)
    if problem:
        raise MismatchError(f"checkpoint step {step} of {mngr.directory} {problem}: {remedy}")


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def params_of_run(run_dir: str, state: dict[str, Any], key: str = "params") -> dict[str, Any]:
    """The params (`key`: or their moving average, "ema") of another run's latest committed
    checkpoint, placed like `state`'s params.

    The other run's optimizer must have the same structure (same optim config keys)."""
    source = reader(run_dir)
    step = source.latest_step()
    if step is None:
        raise RunError(f"train.init_from_run {run_dir} has no committed checkpoint")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {k: v for k, v in state.items() if k != "ema"})
    if key == "ema":  # the other run keeps a moving average, shaped and placed like the params
        abstract["ema"] = abstract["params"]
    try:
        restored = source.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except (ValueError, KeyError) as e:
        raise MismatchError(f"train.init_from_run {run_dir} step {step} does not fit this model: "
                            f"{str(e).splitlines()[0]}") from None
    return restored["state"][key]


def reader(run_dir: str) -> ocp.CheckpointManager:
    """A read-only view of a run's checkpoints (safe beside a live trainer)."""
    directory = run_dir if "://" in run_dir else os.path.abspath(run_dir)
    return ocp.CheckpointManager(epath.Path(directory) / "checkpoints",
                                 options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def committed_steps(mngr: ocp.CheckpointManager) -> list[int]:
    """Steps whose checkpoint is fully committed (orbax lists no temporary or unfinished step), as of now."""
    mngr.reload()
    return sorted(mngr.all_steps())


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_state: dict[str, Any],
                   key: str = "params") -> dict[str, Any]:
    """The params of `step` (`key`: or their moving average, "ema"), placed on this process's first
    device whatever mesh trained them."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored["state"][key]
