"""Pieces every masked-diffusion objective shares: noise schedules, time sampling, the absorbing
mask, and the SUBS log-likelihood. Pure functions; shapes in the names (B batch, L length, V vocab)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SCHEDULES = ("loglinear", "linear", "cosine")


def alpha_and_weight(t: jax.Array, schedule: str, eps: float) -> tuple[jax.Array, jax.Array]:
    """alpha_t (probability a token is still clean) and the NELBO weight -alpha'_t / (1 - alpha_t)."""
    if schedule == "loglinear":  # MDLM's default: alpha = 1 - (1 - eps) t, weight 1/t
        return 1 - (1 - eps) * t, 1 / t
    if schedule == "linear":
        return 1 - t, 1 / t
    if schedule == "cosine":
        alpha = eps + (1 - eps) * jnp.cos(math.pi * t / 2)
        d_alpha = -(1 - eps) * (math.pi / 2) * jnp.sin(math.pi * t / 2)
        return alpha, -d_alpha / (1 - alpha)
    raise ValueError(f"unknown noise schedule {schedule}")


def sample_times(key: jax.Array, batch: int, antithetic: bool, eps: float) -> jax.Array:
    """t_B in [eps, 1]; antithetic: one uniform shifted by i/B, so the batch covers [0, 1) evenly."""
    if antithetic:
        u_B = (jax.random.uniform(key, ()) + jnp.arange(batch) / batch) % 1.0
    else:
        u_B = jax.random.uniform(key, (batch,))
    return eps + (1 - eps) * u_B


def scored(segment_ids_BL: jax.Array, positions_BL: jax.Array) -> jax.Array:
    """The tokens a likelihood scores: every real token but the first of each packed piece (its
    document's BOS, or the start of a long document's later piece). That first token is context,
    never masked, as in bd3lms (`ignore_bos`), so a diffusion bound and AR's exact perplexity (which
    has no prediction for it) score the same tokens."""
    return (segment_ids_BL != 0) & (positions_BL != 0)


def mask_tokens(key: jax.Array, tokens_BL: jax.Array, rate_BL: jax.Array, maskable_BL: jax.Array,
                mask_id: int) -> tuple[jax.Array, jax.Array]:
    """(noisy tokens, masked): each maskable token becomes the mask token with its probability `rate`."""
    masked_BL = (jax.random.uniform(key, tokens_BL.shape) < rate_BL) & maskable_BL
    return jnp.where(masked_BL, mask_id, tokens_BL), masked_BL


def requested(positions_BL: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """`positions_BL` limited to batch["scored"] when the batch has it: a continuation scored given
    its clean context (the harness's requests)."""
    return positions_BL & batch["scored"] if "scored" in batch else positions_BL


def shift_BLV(logits_BLV: jax.Array) -> jax.Array:
    """Dream's shift: position i takes the logits of position i-1 (an AR model's next-token head), position 0
    keeps its own (it is never a target)."""
    return jnp.concatenate([logits_BLV[:, :1], logits_BLV[:, :-1]], axis=1)


def subs_nll(logits_BLV: jax.Array, tokens_BL: jax.Array, mask_id: int) -> jax.Array:
    """-log p(token) with the mask logit at -inf (SUBS: the model never predicts the mask)."""
    return token_nll(logits_BLV.at[..., mask_id].set(-jnp.inf), tokens_BL)


def token_nll(logits_BLV: jax.Array, tokens_BL: jax.Array) -> jax.Array:
    """-log softmax(logits)[token] at every position."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits_BLV), tokens_BL[..., None], -1)[..., 0]
