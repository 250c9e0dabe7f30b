"""Dream (Ye et al. 2025): masked diffusion that keeps a causal model's next-token head, so an AR
run (or a Hugging Face Llama/Qwen3 checkpoint) starts it.

Bidirectional attention over packed rows; the logits of position i-1 predict token i (the shift,
masking.shift_BLV). Each piece's first token is never a target (its predictor would sit in
another document): masking.scored leaves it out, as for MDLM. The loss over the masked positions
is weighted by `time_weight`:
- cart: Dream's context-adaptive weight, a masked token's nearness to clean tokens of its own
  document under a two-sided geometric kernel of parameter `cart_p` (cart_weights_BL);
- inverse_t: the NELBO weight -alpha'_t / (1 - alpha_t) (1/t for the linear schedule);
- none: 1.
and divided by `loss_norm`. Whatever it trains with, evals score the true NELBO (inverse_t),
shifted. Shapes: B batch, L length, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from trainer.model import train_flops_per_token
from trainer.objectives import mdlm, registry
from trainer.objectives.mdlm import MDLMSettings

TIME_WEIGHTS = ("cart", "inverse_t", "none")
LOSS_NORMS = ("token", "masked", "sequence", "batch")


@dataclasses.dataclass
class DreamSettings(MDLMSettings):
    """MDLM's time settings (its loglinear schedule is Dream's p_mask = t up to eps), plus:"""
    name: str = "dream"
    time_weight: str = "cart"  # cart | inverse_t | none: the training loss's weight on a masked token
    cart_p: float = 0.3  # CART's geometric parameter (dllm's default; Dream's SFT recipe uses 0.1)
    # What the weighted sum is divided by: token = the scored tokens (dllm's default), masked = the masked
    # ones (Dream's trainer), sequence = each row by its own scored tokens then by the rows, batch = the rows.
    loss_norm: str = "token"

    def rules(self, cfg):
        return [*super().rules(cfg),
                (self.time_weight in TIME_WEIGHTS, "objective.time_weight", f"must be one of {', '.join(TIME_WEIGHTS)}"),
                (0 < self.cart_p < 1, "objective.cart_p", "must be in (0, 1)"),
                (self.loss_norm in LOSS_NORMS, "objective.loss_norm", f"must be one of {', '.join(LOSS_NORMS)}")]


def _linear_recurrence(decay_BL: jax.Array, inputs_BL: jax.Array) -> jax.Array:
    """h_i = decay_i * h_{i-1} + inputs_i along axis 1, h_{-1} = 0, in log depth (associative scan)."""
    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]
    return jax.lax.associative_scan(combine, (decay_BL, inputs_BL), axis=1)[1]


def cart_weights_BL(masked_BL: jax.Array, segment_ids_BL: jax.Array, p: float) -> jax.Array:
    """CART: w_i = masked_i * sum_j clean_j * p/2 * (1-p)^(|i-j|-1) over the other positions j of i's
    document (clean = not masked and not padding). In [0, 1); 0 where not masked.

    The two one-sided sums are linear recurrences (each step away multiplies by 1 - p, a document
    boundary resets), so this costs O(L), not the [L, L] kernel product."""
    clean_BL = (~masked_BL & (segment_ids_BL != 0)).astype(jnp.float32)

    def from_left(clean, segments):  # sum over j < i of clean_j (1-p)^(i-1-j), within i's document
        same = jnp.pad(segments[:, 1:] == segments[:, :-1], ((0, 0), (1, 0))).astype(jnp.float32)
        before = jnp.pad(clean[:, :-1], ((0, 0), (1, 0)))
        return _linear_recurrence((1 - p) * same, before * same)

    left = from_left(clean_BL, segment_ids_BL)
    right = jnp.flip(from_left(jnp.flip(clean_BL, 1), jnp.flip(segment_ids_BL, 1)), 1)
    return jnp.where(masked_BL, 0.5 * p * (left + right), 0.0)


def train_loss(model, batch, key, mask_id, s: DreamSettings):
    nll_BL, masked_BL, scored_BL, weight_B = mdlm.masked_nll_BL(model, batch, key, mask_id, s, shift=True)
    if s.time_weight == "cart":
        nll_BL = nll_BL * cart_weights_BL(masked_BL, batch["tokens_segment_ids"], s.cart_p)
    elif s.time_weight == "inverse_t":
        nll_BL = nll_BL * weight_B[:, None]
    rows = scored_BL.any(1)
    if s.loss_norm == "sequence":
        per_row = nll_BL.sum(1) / jnp.maximum(scored_BL.sum(1), 1)
        return per_row.sum(), rows.sum(), {}
    count = {"token": scored_BL.sum(), "masked": masked_BL.sum(), "batch": rows.sum()}[s.loss_norm]
    return nll_BL.sum(), count, {}


def eval_loss(model, batch, key, mask_id, s, t):
    """The true NELBO at time t (1/t-weighted, per scored token), shifted, whatever the training weight."""
    loss_BL, scored_BL = token_losses(model, batch, key, mask_id, s, t)
    return loss_BL.sum(), scored_BL.sum()


def token_losses(model, batch, key, mask_id, s, t):
    return mdlm.nelbo_BL(model, batch, key, mask_id, s, t_B=jnp.full((batch["tokens"].shape[0],), t), shift=True)


def logged_fields(loss: float, reported: dict, s: DreamSettings) -> dict:
    """The NELBO fields when the training loss is the bound (1/t weight per scored token); else the
    loss is logged as `loss` only (evals report the bound)."""
    if (s.time_weight, s.loss_norm) == ("inverse_t", "token"):
        return mdlm.nelbo_fields(loss, reported, s)
    return {}


DREAM = registry.register(registry.Objective(
    name="dream", settings=DreamSettings, attention=registry.BIDIRECTIONAL, batch=registry.PACKED,
    train_loss=train_loss, eval_loss=eval_loss,
    token_loss=lambda model, batch, key, mask_id, s, t: token_losses(model, batch, key, mask_id, s, t)[0],
    flops_per_token=train_flops_per_token, shift=True, log=logged_fields))
