"""Block discrete diffusion (BD3LM, Arriola et al. 2025) and the two-stream machinery it shares
with DMax OPUT.

Shapes: B batch, L row length, 2L the two streams [noisy | clean], V vocab.
A row is cut into blocks of `block` tokens at each document's own positions (position // block),
so training blocks line up with decoding blocks, which start at the prompt's position 0. The
likelihood factorises over blocks; each block is a masked-diffusion model conditioned on the
clean earlier blocks of its document. One forward over [noisy | clean] computes every block at
once: a noisy block sees itself and the clean earlier blocks, the clean stream is block-causal,
and nothing crosses a packed document boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trainer import loss
from trainer.config import ObjectiveConfig


def two_stream_mask(positions_BL: jax.Array, segment_ids_BL: jax.Array, block: int) -> jax.Array:
    """[B, 1, 2L, 2L] bool. Query q sees key k iff they are in the same packed document and: both
    are in the same stream and block, or q is noisy and k is a clean earlier block, or both are
    clean and k's block is not after q's. Padding (segment 0) sees only padding."""
    segments = jnp.concatenate([segment_ids_BL, segment_ids_BL], axis=1)
    block_id = jnp.concatenate([positions_BL, positions_BL], axis=1) // block
    length = positions_BL.shape[1]
    noisy = jnp.arange(2 * length) < length
    q_noisy, k_noisy = noisy[:, None], noisy[None, :]
    q_block, k_block = block_id[:, :, None], block_id[:, None, :]
    same_stream_block = (q_noisy == k_noisy) & (q_block == k_block)
    noisy_to_clean_past = q_noisy & ~k_noisy & (q_block > k_block)
    clean_causal = ~q_noisy & ~k_noisy & (q_block >= k_block)
    same_document = segments[:, :, None] == segments[:, None, :]
    return ((same_stream_block | noisy_to_clean_past | clean_causal) & same_document)[:, None]


def noisy_stream_logits(model, noisy_BL: jax.Array, clean_BL: jax.Array, positions_BL: jax.Array,
                        mask_B1SS: jax.Array) -> jax.Array:
    """Logits [B, L, V] of the noisy stream from one forward over [noisy | clean] (positions repeated)."""
    length = noisy_BL.shape[1]
    inputs = model.embed(jnp.concatenate([noisy_BL, clean_BL], axis=1))
    positions = jnp.concatenate([positions_BL, positions_BL], axis=1)
    logits, _ = model.forward(inputs, positions, mask_B1SS, logits_for=length)
    return logits


def block_times(key: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array, block: int,
                cfg: ObjectiveConfig) -> jax.Array:
    """t_BL: one diffusion time per (row, document, block), repeated over the block's tokens.

    Antithetic: the blocks of the whole batch, in order, take one uniform shifted by i/n, so the
    batch covers [0, 1) evenly; times are then mapped into [max(eps, low), high] (BD3LM's clipped
    schedules; 0..1 is the unbiased bound)."""
    block_id = positions_BL // block
    first = jnp.arange(positions_BL.shape[1]) == 0
    changes = lambda x: x != jnp.roll(x, 1, axis=1)  # noqa: E731
    starts_BL = first | changes(block_id) | changes(segment_ids_BL)
    index_BL = (jnp.cumsum(starts_BL.reshape(-1)) - 1).reshape(starts_BL.shape)  # block number in the batch
    if cfg.antithetic:
        u_BL = (jax.random.uniform(key, ()) + index_BL / starts_BL.sum()) % 1.0
    else:
        u_BL = jax.random.uniform(key, (starts_BL.size,))[index_BL]
    low, high = max(cfg.eps, cfg.noise_range_low), cfg.noise_range_high
    return low + (high - low) * u_BL


def bd3lm_loss(model, tokens_BL: jax.Array, segment_ids_BL: jax.Array, positions_BL: jax.Array, key: jax.Array,
               mask_id: int, cfg: ObjectiveConfig, t_BL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(weighted NLL of the masked positions summed, count of real tokens): the BD3LM NELBO.

    Like MDLM (SUBS: the mask logit is -inf, only masked positions carry loss, weight
    -alpha'_t / (1 - alpha_t)), but each block has its own time and sees the clean earlier
    blocks of its document. One block covering each document is MDLM exactly.
    """
    time_key, mask_key = jax.random.split(key)
    if t_BL is None:
        t_BL = block_times(time_key, positions_BL, segment_ids_BL, cfg.block_size, cfg)
    alpha_BL, weight_BL = loss.alpha_and_weight(t_BL, cfg.noise_schedule, cfg.eps)
    real_BL = segment_ids_BL != 0
    noisy_BL, masked_BL = loss.mask_tokens(mask_key, tokens_BL, 1 - alpha_BL, real_BL, mask_id)
    mask = two_stream_mask(positions_BL, segment_ids_BL, cfg.block_size)
    logits_BLV = noisy_stream_logits(model, noisy_BL, tokens_BL, positions_BL, mask)
    nll_BL = loss.subs_nll(logits_BLV, tokens_BL, mask_id)
    return jnp.where(masked_BL, nll_BL * weight_BL, 0.0).sum(), real_BL.sum()
