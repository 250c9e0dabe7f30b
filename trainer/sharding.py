"""Device mesh and shardings: logical axis names per parameter, mapped to mesh axes by config rules.

A new layout is a config change (`mesh.data`, `mesh.fsdp`, `mesh.tensor`, `mesh.rules`), not
a code change. Optimizer moments mirror their parameters' paths, so one table shards both.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trainer.config import Config, MeshConfig, check
from trainer.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# Logical axes of each parameter's dimensions, by the last names on its path.
PARAM_AXES = {  # the first matching entry wins
    ("embed", "embedding"): ("vocab", "embed"),
    ("q", "kernel"): ("embed", "heads"),
    ("k", "kernel"): ("embed", "heads"),
    ("v", "kernel"): ("embed", "heads"),
    ("o", "kernel"): ("heads", "embed"),
    ("q_norm", "scale"): ("head_dim",),  # no rule maps head_dim: replicated
    ("k_norm", "scale"): ("head_dim",),
    ("gate", "kernel"): ("embed", "mlp"),
    ("up", "kernel"): ("embed", "mlp"),
    ("down", "kernel"): ("mlp", "embed"),
    ("head", "kernel"): ("embed", "vocab"),
    ("ins", "kernel"): ("embed", "vocab"),  # Edit Flows' insertion head
    ("scale",): ("embed",),
}
LOGICAL_AXES = {"batch", "vocab", "embed", "heads", "mlp"}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with one -1 filled so they multiply to the device count."""
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    unknown = [axis for axis, size in sizes.items() if size == -1]
    if len(unknown) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ConfigError("mesh.data, mesh.fsdp, mesh.tensor must be positive, with at most one -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if num_devices % known:
            raise ConfigError(f"mesh.{unknown[0]}=-1 cannot fill {num_devices} devices with the others ({known})")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"mesh sizes {sizes} multiply to {math.prod(sizes.values())}, not the "
                          f"{num_devices} devices")
    return sizes


def parse_rules(text: str) -> dict[str, tuple[str, ...]]:
    """'batch=data+fsdp,vocab=tensor' -> {'batch': ('data', 'fsdp'), 'vocab': ('tensor',)}."""
    rules: dict[str, tuple[str, ...]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        logical, sep, axes = item.partition("=")
        mesh_axes = tuple(a for a in axes.split("+") if a)
        if not sep or logical not in LOGICAL_AXES or any(a not in MESH_AXES for a in mesh_axes):
            raise ConfigError(f"mesh.rules entry {item!r} must map one of {sorted(LOGICAL_AXES)} to "
                              f"'+'-joined mesh axes of {MESH_AXES}")
        rules[logical] = mesh_axes
    return rules


def make_mesh(cfg: MeshConfig) -> Mesh:
    sizes = mesh_shape(cfg, jax.device_count())
    # Auto axes: shardings of parameters and batch are given, XLA propagates the rest (GSPMD).
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def spec_for(logical: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh,
             rules: dict[str, tuple[str, ...]]) -> PartitionSpec:
    """The mesh partitioning of one array; a dimension its mesh axes do not divide stays whole."""
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes if len(axes) > 1 else axes[0])
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def _logical_axes(path, ndim: int) -> tuple[str, ...] | None:
    names = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
    for suffix, axes in PARAM_AXES.items():
        if names[-len(suffix):] == suffix:
            if len(axes) + 1 == ndim and "blocks" in names:
                return ("layers", *axes)  # scanned blocks: no rule maps the stacked layer axis, it stays whole
            return axes
    return None


def state_shardings(abstract_state: Any, mesh: Mesh, rules: dict[str, tuple[str, ...]]) -> Any:
    """NamedShardings for every leaf of the train state (params, optimizer moments, step, RNG)."""

    def one(path, leaf):
        axes = _logical_axes(path, len(leaf.shape))
        if axes is None or len(axes) != len(leaf.shape):
            return NamedSharding(mesh, PartitionSpec())  # counters, RNG, scalars: replicated
        return NamedSharding(mesh, spec_for(axes, leaf.shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_sharding(mesh: Mesh, rules: dict[str, tuple[str, ...]]) -> NamedSharding:
    """Rows split over the batch axes (data and fsdp by default), sequence whole."""
    axes = tuple(a for a in rules.get("batch", ()) if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows -> global arrays on the mesh (each process passes only its share)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def validate(cfg: Config, num_devices: int) -> None:
    """The rules that depend on the devices: the mesh fills them, and the batch splits over its batch
    axes and the accumulation steps."""
    sizes = mesh_shape(cfg.mesh, num_devices)
    batch_parallel = math.prod(sizes[a] for a in parse_rules(cfg.mesh.rules).get("batch", ()))
    check([(cfg.train.global_batch % (cfg.train.grad_accum * batch_parallel) == 0, "train.global_batch",
            f"must be divisible by grad_accum x batch-parallel devices = {cfg.train.grad_accum * batch_parallel}")])
