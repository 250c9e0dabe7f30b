"""BD3LM block discrete diffusion (Arriola et al. 2025) on packed rows.

The likelihood factorises over blocks of `block_size` tokens at each document's own positions;
each block is a masked-diffusion model (MDLM's SUBS NELBO) conditioned on the clean earlier blocks
of its document, computed for every block at once by the two-stream forward (two_stream.py).
One block covering each document is MDLM exactly. Shapes: B batch, L row length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from trainer.model import train_flops_per_token
from trainer.objectives import masking, registry, two_stream
from trainer.objectives.mdlm import MDLMSettings, nelbo_fields


@dataclasses.dataclass
class BD3LMSettings(MDLMSettings):
    name: str = "bd3lm"
    block_size: int = 32  # block length (evals decode with the same blocks)
    # Training times drawn from [max(eps, low), high] per block: BD3LM's clipped schedules (0..1 is the
    # unbiased NELBO; the evaluated bound is always unclipped).
    noise_range_low: float = 0.0
    noise_range_high: float = 1.0  # (see noise_range_low)

    def rules(self, cfg):
        return [*super().rules(cfg), *block_rules(self, cfg),
                (self.noise_range_high > self.eps, "objective.noise_range_high",
                 f"must be above objective.eps={self.eps}")]


def block_rules(s, cfg) -> list[tuple[bool, str, str]]:
    """Rules of the settings every block-diffusion objective shares."""
    return [(s.block_size >= 1, "objective.block_size", "must be at least 1"),
            (s.block_size <= cfg.data.seq_len, "objective.block_size",
             f"must be at most data.seq_len={cfg.data.seq_len} (a block is decoded within the trained length)"),
            (0 <= s.noise_range_low <= s.noise_range_high <= 1, "objective.noise_range_low",
             "and noise_range_high must satisfy 0 <= low <= high <= 1")]


def block_times(key: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array, s: BD3LMSettings) -> jax.Array:
    """t_BL: one diffusion time per (row, document, block), repeated over the block's tokens.

    Antithetic: the blocks of the whole batch, in order, take one uniform shifted by i/n, so the
    batch covers [0, 1) evenly; times are then mapped into [max(eps, low), high]."""
    block_id = positions_BL // s.block_size
    first = jnp.arange(positions_BL.shape[1]) == 0
    changes = lambda x: x != jnp.roll(x, 1, axis=1)  # noqa: E731
    starts_BL = first | changes(block_id) | changes(segment_ids_BL)
    index_BL = (jnp.cumsum(starts_BL.reshape(-1)) - 1).reshape(starts_BL.shape)  # block number in the batch
    if s.antithetic:
        u_BL = (jax.random.uniform(key, ()) + index_BL / starts_BL.sum()) % 1.0
    else:
        u_BL = jax.random.uniform(key, (starts_BL.size,))[index_BL]
    low, high = max(s.eps, s.noise_range_low), s.noise_range_high
    return low + (high - low) * u_BL


def nelbo_BL(model, batch: dict[str, jax.Array], key: jax.Array, mask_id: int, s: BD3LMSettings,
             t_BL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(each position's weighted NLL, 0 where not masked; the scored tokens): the BD3LM NELBO by
    position. Each piece's first token is context (masking.scored), like MDLM's; with batch["scored"]
    only those positions are masked, the rest stays clean context."""
    tokens_BL, segments_BL, positions_BL = batch["tokens"], batch["tokens_segment_ids"], batch["tokens_positions"]
    time_key, mask_key = jax.random.split(key)
    if t_BL is None:
        t_BL = block_times(time_key, positions_BL, segments_BL, s)
    alpha_BL, weight_BL = masking.alpha_and_weight(t_BL, s.noise_schedule, s.eps)
    scored_BL = masking.requested(masking.scored(segments_BL, positions_BL), batch)
    noisy_BL, masked_BL = masking.mask_tokens(mask_key, tokens_BL, 1 - alpha_BL, scored_BL, mask_id)
    logits_BLV = two_stream.noisy_stream_logits(model, noisy_BL, tokens_BL, positions_BL, segments_BL, s.block_size)
    nll_BL = masking.subs_nll(logits_BLV, tokens_BL, mask_id)
    return jnp.where(masked_BL, nll_BL * weight_BL, 0.0), scored_BL


def nelbo(model, batch: dict[str, jax.Array], key: jax.Array, mask_id: int, s: BD3LMSettings,
          t_BL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(weighted NLL of the masked positions summed, count of scored tokens): the BD3LM NELBO."""
    loss_BL, scored_BL = nelbo_BL(model, batch, key, mask_id, s, t_BL)
    return loss_BL.sum(), scored_BL.sum()


def train_loss(model, batch, key, mask_id, s):
    total, count = nelbo(model, batch, key, mask_id, s)
    return total, count, {}


def eval_loss(model, batch, key, mask_id, s, t):
    """The BD3LM NELBO with every block at time t (unclipped: each block conditioned on the clean
    earlier blocks). OPUT models are scored by it too."""
    return nelbo(model, batch, key, mask_id, s, t_BL=jnp.full(batch["tokens"].shape, t))


def logged_fields(loss: float, reported: dict, s: BD3LMSettings) -> dict:
    """The NELBO fields, unless the training times are clipped: that loss is no bound, and is
    logged as what it is (evals report the unclipped bound)."""
    if (s.noise_range_low, s.noise_range_high) != (0.0, 1.0):
        return {"clipped_nelbo": loss}
    return nelbo_fields(loss, reported, s)


def token_loss(model, batch, key, mask_id, s, t):
    """eval_loss by position (OPUT's too)."""
    return nelbo_BL(model, batch, key, mask_id, s, t_BL=jnp.full(batch["tokens"].shape, t))[0]


def two_stream_flops(model_cfg, seq_len: int) -> float:
    """Both streams are trained: two positions of a 2L-long forward per token."""
    return train_flops_per_token(model_cfg, 2 * seq_len) * 2


BD3LM = registry.register(registry.Objective(
    name="bd3lm", settings=BD3LMSettings, attention=registry.BLOCK_CAUSAL, batch=registry.PACKED,
    train_loss=train_loss, eval_loss=eval_loss, token_loss=token_loss, flops_per_token=two_stream_flops,
    block_size=lambda s: s.block_size, log=logged_fields))
