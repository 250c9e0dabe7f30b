"""Dream's decoders, for models trained with Dream's shift (trainer/objectives/dream.py): the
full-attention loop of full_attention.py on shifted logits, so the first generated token is read
from the last prompt token, as the AR model it may have started from would.

- dream: Dream's `diffusion_generate`. Each block (one block = Dream's single canvas; smaller
  blocks run it semi-autoregressively) takes `steps` = sampling.remask_steps / blocks forwards on
  the time grid linspace(1, time_eps, steps + 1). At step (t, s), alg=origin unmasks each masked
  position with probability 1 - s/t; the other algs unmask the k = floor(n (1 - s/t)) most
  confident of the row's n masked positions (all of them at the last step), k counted per row,
  not averaged over the batch as Dream's code does. alg_temp > 0 samples those k without
  replacement from softmax(confidence / alg_temp) (Gumbel top-k).
- dream_threshold: Fast-dLLM's threshold rule on shifted logits (full_attention.threshold_commit).
Shapes: B batch, T prompt + generation, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from evals.config import SamplingConfig
from evals.decoders import full_attention, registry
from evals.decoders.common import Choice, top_k_probs


def confidence(choice: Choice, cfg: SamplingConfig):
    """What `alg` ranks masked positions by, larger = more confident."""
    if cfg.alg == "topk_margin":
        top2, _ = top_k_probs(choice, 2)
        return top2[..., 0] - top2[..., 1]
    if cfg.alg == "entropy":
        log_p = choice.logits - choice.log_z[..., None]
        p = jnp.exp(log_p)
        return jnp.sum(p * jnp.log(p + 1e-10), -1)  # Dream's form: a suppressed token (p = 0) adds 0
    return choice.conf


def step_times(j, steps: int, eps: float):
    """(t, s): step j's times on the grid linspace(1, eps, steps + 1) (float32, as Dream's code)."""
    grid = jnp.linspace(1.0, eps, steps + 1, dtype=jnp.float32)
    j = jnp.minimum(j, steps - 1)
    return grid[j], grid[j + 1]


def unmask_counts(n_B, j, steps: int, eps: float):
    """How many of a row's n masked positions step j of `steps` unmasks: floor(n (1 - s/t)), every
    one at the last step."""
    t, s = step_times(j, steps, eps)
    return jnp.where(j >= steps - 1, n_B, jnp.floor(n_B * (1 - s / t)).astype(n_B.dtype))


def schedule_commit(conf_BT, candidate_BT, j, cfg: SamplingConfig, key):
    """Dream's step: the positions of the block that step j of its time grid unmasks."""
    steps = full_attention.steps_per_block(cfg)
    if cfg.alg == "origin":
        t, s = step_times(j, steps, cfg.time_eps)
        return candidate_BT & ((jax.random.uniform(key, conf_BT.shape) < 1 - s / t) | (j >= steps - 1))
    k_B = unmask_counts(candidate_BT.sum(1), j, steps, cfg.time_eps)
    score = conf_BT / cfg.alg_temp + jax.random.gumbel(key, conf_BT.shape) if cfg.alg_temp > 0 else conf_BT
    return candidate_BT & (full_attention.ranks(jnp.where(candidate_BT, score, -jnp.inf)) < k_B[:, None])


registry.register(registry.Decoder(
    "dream", full_attention.program(schedule_commit, confidence, shift=True), attention=registry.FULL,
    fits=(registry.BIDIRECTIONAL,), shifted=True,
    one_token=lambda cfg: cfg.alg != "origin" and cfg.remask_steps in (0, cfg.gen_length),
    infill=full_attention.infill(schedule_commit, confidence, shift=True)))
registry.register(registry.Decoder(
    "dream_threshold", full_attention.program(full_attention.threshold_commit, shift=True), attention=registry.FULL,
    fits=(registry.BIDIRECTIONAL,), shifted=True, infill=full_attention.infill(full_attention.threshold_commit, shift=True)))
