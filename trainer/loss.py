"""Objectives as pure functions: MDLM's continuous-time NELBO and the AR next-token loss
(block diffusion, built on these pieces, is in `block_diffusion.py`).

Each returns (sum of per-token losses, number of tokens), so gradient accumulation and
evaluation can sum over micro-batches and divide once: exactly the full-batch value.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from trainer.config import ObjectiveConfig

Logits = Callable[[jax.Array, bool], jax.Array]  # (tokens_BL, causal) -> logits_BLV


def alpha_and_weight(t_B: jax.Array, schedule: str, eps: float) -> tuple[jax.Array, jax.Array]:
    """alpha_t (probability a token is still clean) and the NELBO weight -alpha'_t / (1 - alpha_t)."""
    if schedule == "loglinear":  # MDLM's default: alpha = 1 - (1 - eps) t, weight 1/t
        return 1 - (1 - eps) * t_B, 1 / t_B
    if schedule == "linear":
        return 1 - t_B, 1 / t_B
    if schedule == "cosine":
        alpha = eps + (1 - eps) * jnp.cos(math.pi * t_B / 2)
        d_alpha = -(1 - eps) * (math.pi / 2) * jnp.sin(math.pi * t_B / 2)
        return alpha, -d_alpha / (1 - alpha)
    raise ValueError(f"unknown noise schedule {schedule}")


def sample_times(key: jax.Array, batch: int, antithetic: bool, eps: float) -> jax.Array:
    """t_B in [eps, 1]; antithetic: one uniform shifted by i/B, so the batch covers [0, 1) evenly."""
    if antithetic:
        u_B = (jax.random.uniform(key, ()) + jnp.arange(batch) / batch) % 1.0
    else:
        u_B = jax.random.uniform(key, (batch,))
    return eps + (1 - eps) * u_B


def mask_tokens(key: jax.Array, tokens_BL: jax.Array, rate_BL: jax.Array, real_BL: jax.Array,
                mask_id: int) -> tuple[jax.Array, jax.Array]:
    """(noisy tokens, masked): each real token becomes the mask token with its probability `rate`."""
    masked_BL = (jax.random.uniform(key, tokens_BL.shape) < rate_BL) & real_BL
    return jnp.where(masked_BL, mask_id, tokens_BL), masked_BL


def subs_nll(logits_BLV: jax.Array, tokens_BL: jax.Array, mask_id: int) -> jax.Array:
    """-log p(token) with the mask logit at -inf (SUBS: the model never predicts the mask)."""
    log_p = jax.nn.log_softmax(logits_BLV.at[..., mask_id].set(-jnp.inf))
    return -jnp.take_along_axis(log_p, tokens_BL[..., None], -1)[..., 0]


def mdlm_loss(
    logits_fn: Logits, tokens_BL: jax.Array, segment_ids_BL: jax.Array, key: jax.Array,
    mask_id: int, cfg: ObjectiveConfig, t_B: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Weighted NLL of the masked positions summed, and the count of real tokens.

    SUBS parameterisation: the mask logit is -inf and only masked positions carry loss.
    Padding (segment 0) is never masked and never counted.
    """
    time_key, mask_key = jax.random.split(key)
    batch = tokens_BL.shape[0]
    if t_B is None:
        t_B = sample_times(time_key, batch, cfg.antithetic, cfg.eps)
    alpha_B, weight_B = alpha_and_weight(t_B, cfg.noise_schedule, cfg.eps)
    real_BL = segment_ids_BL != 0
    noisy_BL, masked_BL = mask_tokens(mask_key, tokens_BL, (1 - alpha_B)[:, None], real_BL, mask_id)
    nll_BL = subs_nll(logits_fn(noisy_BL, False), tokens_BL, mask_id)
    weighted = jnp.where(masked_BL, nll_BL * weight_B[:, None], 0.0)
    return weighted.sum(), real_BL.sum()


def ar_loss(
    logits_fn: Logits, tokens_BL: jax.Array, segment_ids_BL: jax.Array, *_unused,
) -> tuple[jax.Array, jax.Array]:
    """Next-token NLL summed over positions whose successor is in the same document, and their count."""
    logits_BLV = logits_fn(tokens_BL, True)[:, :-1]
    targets_BL = tokens_BL[:, 1:]
    valid_BL = (segment_ids_BL[:, 1:] == segment_ids_BL[:, :-1]) & (segment_ids_BL[:, 1:] != 0)
    nll_BL = -jnp.take_along_axis(jax.nn.log_softmax(logits_BLV), targets_BL[..., None], -1)[..., 0]
    return jnp.where(valid_BL, nll_BL, 0.0).sum(), valid_BL.sum()
