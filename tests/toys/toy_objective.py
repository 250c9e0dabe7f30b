"""A toy objective, as a user would add one: this file is all it takes (the extending test
registers it). A BERT-style masked LM on packed rows: one fixed mask rate, no diffusion weight."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from trainer.model import train_flops_per_token
from trainer.objectives import masking, registry
from trainer.objectives.mdlm import MDLMSettings


@dataclasses.dataclass
class ToyMLMSettings(MDLMSettings):  # eps and the schedule come along for the evals' time grid
    name: str = "toy_mlm"
    mask_rate: float = 0.3  # share of real tokens masked in training

    def rules(self, cfg):
        return [(0 < self.mask_rate <= 1, "objective.mask_rate", "must be in (0, 1]")]


def masked_nll(model, batch, key, mask_id, rate):
    """(NLL of the masked positions summed, their count)."""
    tokens, segments = batch["tokens"], batch["tokens_segment_ids"]
    noisy, masked = masking.mask_tokens(key, tokens, rate, segments != 0, mask_id)
    nll = masking.subs_nll(model(noisy, segments, batch["tokens_positions"], False), tokens, mask_id)
    return jnp.where(masked, nll, 0.0).sum(), masked.sum()


registry.register(registry.Objective(
    name="toy_mlm", settings=ToyMLMSettings, attention=registry.BIDIRECTIONAL, batch=registry.PACKED,
    train_loss=lambda model, batch, key, mask_id, s: (*masked_nll(model, batch, key, mask_id, s.mask_rate), {}),
    eval_loss=lambda model, batch, key, mask_id, s, t: masked_nll(model, batch, key, mask_id, t),
    flops_per_token=train_flops_per_token))
