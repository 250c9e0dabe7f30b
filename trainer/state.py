"""The train state and the model's weights, independent of the training loop: the optimizer, the
state's structure and initialisation, and a run's params for whatever reads them (evals, export,
trajectories, the harness)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from trainer import checkpointing, objectives, sharding
from trainer import config as config_lib
from trainer.config import Config, OptimConfig
from trainer.errors import RunError
from trainer.model import Transformer


def make_optimizer(cfg: OptimConfig, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup + cosine decay and global-norm clipping; (transformation, schedule)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, optax.adamw(schedule, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay)), schedule


def ema_update(ema: Any, params: Any, decay: float, step: jax.Array) -> Any:
    """The moving average after `step` updates. Its decay ramps up as (1 + step) / (10 + step) to
    `decay` (TensorFlow's num_updates rule), so the average forgets the initialisation early on."""
    rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda a, p: rate * a + (1.0 - rate) * p, ema, params)


def weights_key(cfg: Config) -> str:
    """The state entry a run's readers use: the moving average when the run keeps one."""
    return "ema" if cfg.optim.ema > 0 else "params"


def build_model(cfg: Config, rngs: nnx.Rngs) -> Transformer:
    """The model a run of `cfg` trains: the transformer, with the heads its objective needs."""
    return Transformer(cfg.model, rngs, **objectives.get(cfg.objective.name).model_options(cfg.objective))


def model_graphdef(cfg: Config) -> nnx.GraphDef:
    """The model's structure without its weights (nothing is allocated)."""
    return nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))))[0]


def init_state(cfg: Config, tx: optax.GradientTransformation) -> dict[str, Any]:
    """The train state as plain pytrees (params as a pure dict) for jit and orbax."""
    params = nnx.to_pure_dict(nnx.split(build_model(cfg, nnx.Rngs(params=cfg.seed)))[1])
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(cfg.seed)),
        **({"ema": jax.tree.map(jnp.copy, params)} if cfg.optim.ema > 0 else {}),
    }


def abstract_state(cfg: Config) -> dict[str, Any]:
    """The state's shapes and dtypes (nothing is allocated): what a checkpoint of this config holds."""
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    return jax.eval_shape(lambda: init_state(cfg, tx))


def sharded_init(cfg: Config, tx: optax.GradientTransformation, mesh, rules) -> tuple[dict[str, Any], Any]:
    """(state created directly in its shardings, those shardings)."""
    abstract = jax.eval_shape(lambda: init_state(cfg, tx))
    shardings = sharding.state_shardings(abstract, mesh, rules)
    return jax.jit(lambda: init_state(cfg, tx), out_shardings=shardings)(), shardings


class Weights(NamedTuple):
    graphdef: nnx.GraphDef  # the model's structure
    params: dict  # its parameters as a pure dict
    step: int  # the training step they were saved at


def committed_step(mngr, run_dir: str, step: int | None = None) -> int:
    """`step` (None: the latest) when it is committed; RunError otherwise."""
    steps = checkpointing.committed_steps(mngr)
    chosen = steps[-1] if step is None and steps else step
    if chosen not in steps:
        raise RunError(f"{run_dir} has no committed checkpoint{'' if step is None else f' at step {step}'} "
                       f"(committed: {steps})")
    return chosen


def load_params(run_dir: str, step: int | None = None, cfg: Config | None = None) -> Weights:
    """A run's committed checkpoint `step` (default: the latest), placed on this process's first
    device whatever mesh trained it. `cfg`: the run's config when already read."""
    cfg = cfg or config_lib.load_run(run_dir)
    mngr = checkpointing.reader(run_dir)
    step = committed_step(mngr, run_dir, step)
    abstract = abstract_state(cfg)
    checkpointing.check_shapes(mngr, step, abstract["params"], f"{run_dir}/config.yaml does not describe the run's "
                                                               f"checkpoints; restore the config it was trained with")
    checkpointing.check_owner(mngr, run_dir, step)
    try:
        params = checkpointing.restore_params(mngr, step, abstract, weights_key(cfg))
    except Exception as e:  # orbax/tensorstore raise many kinds for a damaged file
        raise RunError(f"checkpoint step {step} of {run_dir} cannot be read ({checkpointing.first_line(e)}): choose "
                       f"another step") from None
    return Weights(model_graphdef(cfg), params, step)
