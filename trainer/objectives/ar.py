"""The autoregressive baseline: causal next-token loss on the same packed rows, scored exactly.
It is the baseline of the quality benchmarks and the judge of sample quality (gen-ppl)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from trainer.model import train_flops_per_token
from trainer.objectives import masking, registry


@dataclasses.dataclass
class ARSettings(registry.Settings):
    name: str = "ar"  # no settings of its own


def next_token_nll_BL(model, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(each position's NLL given the positions before it, 0 where not scored; scored): scored positions
    have their predecessor in the same document (and are in batch["scored"] when the batch has it)."""
    tokens_BL, segments_BL = batch["tokens"], batch["tokens_segment_ids"]
    logits_BLV = model(tokens_BL, segments_BL, batch["tokens_positions"], True)[:, :-1]
    follows_BL = (segments_BL[:, 1:] == segments_BL[:, :-1]) & (segments_BL[:, 1:] != 0)
    valid_BL = masking.requested(jnp.pad(follows_BL, ((0, 0), (1, 0))), batch)
    nll_BL = jnp.pad(masking.token_nll(logits_BLV, tokens_BL[:, 1:]), ((0, 0), (1, 0)))
    return jnp.where(valid_BL, nll_BL, 0.0), valid_BL


def next_token_nll(model, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(NLL summed over positions whose predecessor is in the same document, their count)."""
    nll_BL, valid_BL = next_token_nll_BL(model, batch)
    return nll_BL.sum(), valid_BL.sum()


def train_loss(model, batch, key, mask_id, s):
    total, count = next_token_nll(model, batch)
    return total, count, {}


def eval_loss(model, batch, key, mask_id, s, t):
    return next_token_nll(model, batch)


def token_loss(model, batch, key, mask_id, s, t):
    return next_token_nll_BL(model, batch)[0]


AR = registry.register(registry.Objective(
    name="ar", settings=ARSettings, attention=registry.CAUSAL, batch=registry.PACKED,
    train_loss=train_loss, eval_loss=eval_loss, token_loss=token_loss, flops_per_token=train_flops_per_token,
    exact=True, log=lambda loss, reported, s: {"ppl": float(np.exp(min(loss, 50.0)))}))
