"""DMax On-Policy Uniform Training (OPUT): block diffusion on prompt/response rows in which the
model learns to repair its own drafts (what soft parallel decoding relies on).

Shapes: B batch, N row length (a multiple of the block), V vocab. Each example is masked at one
rate t ~ U[low, high] on every position past its prompt; with probability `on_policy_ratio` a
no-gradient forward first fills every mask of the noisy stream with the model's own greedy
prediction, and the model learns to recover the clean tokens from that draft. The loss is the
cross-entropy of the noisy stream against the clean tokens over the supervised positions (the
response and its first EOS), masked or not, without the 1/t weight. Evals score OPUT models by the
BD3LM bound.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from trainer.objectives import bd3lm, masking, registry, two_stream
from trainer.objectives.mdlm import MDLMSettings


@dataclasses.dataclass
class OPUTSettings(bd3lm.BD3LMSettings):
    """Block size, noise range (per example here; DMax trains at 0.75..0.75) and, for the bound evals
    report, BD3LM's schedule settings; plus:"""
    name: str = "oput"
    on_policy_ratio: float = 0.5  # share of examples trained on the model's own drafts
    supervised_eos: int = 32  # trailing EOS positions after the response that carry loss

    def rules(self, cfg):
        return [*MDLMSettings.rules(self, cfg), *bd3lm.block_rules(self, cfg),
                (cfg.data.seq_len % max(self.block_size, 1) == 0, "data.seq_len",
                 f"must be a multiple of objective.block_size={self.block_size} for oput"),
                (0 <= self.on_policy_ratio <= 1, "objective.on_policy_ratio", "must be in [0, 1]")]


def add_noise(key: jax.Array, tokens_BN: jax.Array, prompt_len_B: jax.Array, s: OPUTSettings,
              mask_id: int) -> tuple[jax.Array, jax.Array]:
    """(noisy tokens, masked): every position past the prompt is masked with its example's rate."""
    rate_key, mask_key = jax.random.split(key)
    rate_B = jax.random.uniform(rate_key, prompt_len_B.shape, minval=s.noise_range_low, maxval=s.noise_range_high)
    past_prompt = jnp.arange(tokens_BN.shape[1])[None, :] >= prompt_len_B[:, None]
    return masking.mask_tokens(mask_key, tokens_BN, rate_B[:, None], past_prompt, mask_id)


def train_loss(model, batch: dict[str, jax.Array], key: jax.Array, mask_id: int, s: OPUTSettings):
    """(summed CE over supervised positions, their count, summed diagnostics)."""
    tokens_BN, loss_mask_BN = batch["tokens"], batch["loss_mask"]
    batch_size, length = tokens_BN.shape
    noise_key, policy_key = jax.random.split(key)
    noisy_BN, masked_BN = add_noise(noise_key, tokens_BN, batch["prompt_len"], s, mask_id)
    positions_BN = jnp.tile(jnp.arange(length), (batch_size, 1))

    def noisy_logits(noisy):  # one example per row: a single segment
        return two_stream.noisy_stream_logits(model, noisy, tokens_BN, positions_BN, jnp.ones_like(tokens_BN),
                                              s.block_size)

    # On-policy rollout: the same forward without gradient; its greedy drafts replace the masks.
    on_policy_B = jax.random.uniform(policy_key, (batch_size,)) < s.on_policy_ratio
    draft_BN = jnp.argmax(jax.lax.stop_gradient(noisy_logits(noisy_BN)), axis=-1).astype(tokens_BN.dtype)
    replaced_BN = masked_BN & on_policy_B[:, None]
    inputs_BN = jnp.where(replaced_BN, draft_BN, noisy_BN)

    nll_BN = masking.token_nll(noisy_logits(inputs_BN), tokens_BN)
    supervised = loss_mask_BN.astype(bool)
    plain_masked = supervised & masked_BN & ~replaced_BN
    on_policy = supervised & replaced_BN
    sums = {
        "masked_nll": jnp.where(plain_masked, nll_BN, 0.0).sum(), "masked_count": plain_masked.sum(),
        "on_policy_nll": jnp.where(on_policy, nll_BN, 0.0).sum(), "on_policy_count": on_policy.sum(),
        "replaced": replaced_BN.sum(),
        "response_tokens": (jnp.arange(length)[None, :] >= batch["prompt_len"][:, None]).sum(),
        "truncated": batch["truncated"].sum(),
    }
    return jnp.where(supervised, nll_BN, 0.0).sum(), supervised.sum(), sums


def report(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-step OPUT figures from the summed diagnostics."""
    return {
        "loss_masked": sums["masked_nll"] / jnp.maximum(sums["masked_count"], 1),
        "loss_on_policy": sums["on_policy_nll"] / jnp.maximum(sums["on_policy_count"], 1),
        "replaced_fraction": sums["replaced"] / jnp.maximum(sums["response_tokens"], 1),
        "truncated_examples": sums["truncated"],
    }


def rollout_flops(model_cfg, seq_len: int) -> float:
    """Two streams, each trained (6 FLOPs per weight) after a rollout forward (2 per weight)."""
    return bd3lm.two_stream_flops(model_cfg, seq_len) * 8 / 6


OPUT = registry.register(registry.Objective(
    name="oput", settings=OPUTSettings, attention=registry.BLOCK_CAUSAL, batch=registry.TRAJECTORY,
    train_loss=train_loss, eval_loss=bd3lm.eval_loss, token_loss=bd3lm.token_loss, flops_per_token=rollout_flops,
    revises=True,
    block_size=lambda s: s.block_size, report=report,
    log=lambda loss, reported, s: {k: float(reported[k]) for k in
                                ("loss_masked", "loss_on_policy", "replaced_fraction", "truncated_examples")}))
