"""Reading a trainer run: its config, committed checkpoint steps, and params on this process's devices."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from trainer import config as config_lib
from trainer import train


class RunError(Exception):
    """The run directory cannot be evaluated: one line, exit code 2."""


def load_config(run_dir: str) -> config_lib.Config:
    path = epath.Path(run_dir)
    if not path.exists():
        raise RunError(f"run directory {run_dir} does not exist")
    if not (path / "config.yaml").exists():
        raise RunError(f"{run_dir} is not a trainer run directory (no config.yaml)")
    return config_lib.load(str(path / "config.yaml"), [])


def reader(run_dir: str) -> ocp.CheckpointManager:
    directory = run_dir if "://" in run_dir else os.path.abspath(run_dir)
    return ocp.CheckpointManager(epath.Path(directory) / "checkpoints",
                                 options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def committed_steps(mngr: ocp.CheckpointManager) -> list[int]:
    """Steps whose checkpoint is fully committed (orbax lists no temporary or unfinished step)."""
    mngr.reload()
    return sorted(mngr.all_steps())


def restore_params(mngr: ocp.CheckpointManager, step: int, cfg: config_lib.Config) -> tuple[Any, dict]:
    """(graphdef, params) of `step`, placed on this process's first device whatever mesh trained it."""
    tx, _ = train.make_optimizer(cfg.optim, cfg.train.steps)
    graphdef = train.model_graphdef(cfg)
    abstract = jax.eval_shape(lambda: train.init_state(cfg, tx))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return graphdef, restored["state"]["params"]
