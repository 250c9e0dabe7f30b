"""MDLM (Sahoo et al. 2024): absorbing-mask diffusion with bidirectional attention over packed rows.

SUBS parameterisation (the mask logit is -inf, only masked positions carry loss), continuous-time
NELBO weighted by -alpha'_t / (1 - alpha_t), antithetic time sampling. Shapes: B batch, L length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from trainer.model import train_flops_per_token
from trainer.objectives import masking, registry


@dataclasses.dataclass
class MDLMSettings(registry.Settings):
    name: str = "mdlm"
    noise_schedule: str = "loglinear"  # loglinear | linear | cosine
    antithetic: bool = True  # low-discrepancy time sampling across the batch
    eps: float = 1e-3  # smallest diffusion time

    def rules(self, cfg):
        return [(self.noise_schedule in masking.SCHEDULES, "objective.noise_schedule",
                 f"must be one of {', '.join(masking.SCHEDULES)}"),
                (0 < self.eps < 1, "objective.eps", "must be in (0, 1)")]


def masked_nll_BL(model, batch: dict[str, jax.Array], key: jax.Array, mask_id: int, s: MDLMSettings,
                  t_B: jax.Array | None = None, shift: bool = False):
    """One noising of the batch at times t_B (sampled when None): (each position's SUBS NLL, 0 where not
    masked; masked_BL; the scored tokens: masking.scored, within batch["scored"] when given; the NELBO
    weight_B). Padding and each piece's first token are never masked nor counted. `shift`: position i is
    predicted by the logits of position i-1 (Dream's shift; a scored token's predecessor is in its piece)."""
    tokens_BL, segments_BL = batch["tokens"], batch["tokens_segment_ids"]
    time_key, mask_key = jax.random.split(key)
    if t_B is None:
        t_B = masking.sample_times(time_key, tokens_BL.shape[0], s.antithetic, s.eps)
    alpha_B, weight_B = masking.alpha_and_weight(t_B, s.noise_schedule, s.eps)
    scored_BL = masking.requested(masking.scored(segments_BL, batch["tokens_positions"]), batch)
    noisy_BL, masked_BL = masking.mask_tokens(mask_key, tokens_BL, (1 - alpha_B)[:, None], scored_BL, mask_id)
    logits_BLV = model(noisy_BL, segments_BL, batch["tokens_positions"], False)
    if shift:
        logits_BLV = masking.shift_BLV(logits_BLV)
    nll_BL = masking.subs_nll(logits_BLV, tokens_BL, mask_id)
    return jnp.where(masked_BL, nll_BL, 0.0), masked_BL, scored_BL, weight_B


def nelbo_BL(model, batch: dict[str, jax.Array], key: jax.Array, mask_id: int, s: MDLMSettings,
             t_B: jax.Array | None = None, shift: bool = False) -> tuple[jax.Array, jax.Array]:
    """(each position's weighted NLL, 0 where not masked; the scored tokens) of masked_nll_BL."""
    nll_BL, _, scored_BL, weight_B = masked_nll_BL(model, batch, key, mask_id, s, t_B, shift)
    return nll_BL * weight_B[:, None], scored_BL


def nelbo(model, batch: dict[str, jax.Array], key: jax.Array, mask_id: int, s: MDLMSettings,
          t_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(weighted NLL of the masked positions summed, count of scored tokens)."""
    loss_BL, scored_BL = nelbo_BL(model, batch, key, mask_id, s, t_B)
    return loss_BL.sum(), scored_BL.sum()


def train_loss(model, batch, key, mask_id, s):
    total, count = nelbo(model, batch, key, mask_id, s)
    return total, count, {}


def eval_loss(model, batch, key, mask_id, s, t):
    return nelbo(model, batch, key, mask_id, s, t_B=jnp.full((batch["tokens"].shape[0],), t))


def token_loss(model, batch, key, mask_id, s, t):
    return nelbo_BL(model, batch, key, mask_id, s, t_B=jnp.full((batch["tokens"].shape[0],), t))[0]


def nelbo_fields(loss: float, reported: dict, s: MDLMSettings) -> dict:
    """metrics.jsonl fields of a NELBO objective: the bound on the training batch."""
    return {"nelbo": loss, "ppl_bound": float(np.exp(min(loss, 50.0)))}


MDLM = registry.register(registry.Objective(
    name="mdlm", settings=MDLMSettings, attention=registry.BIDIRECTIONAL, batch=registry.PACKED,
    train_loss=train_loss, eval_loss=eval_loss, token_loss=token_loss, flops_per_token=train_flops_per_token,
    log=nelbo_fields))
