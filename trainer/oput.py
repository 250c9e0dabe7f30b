"""DMax On-Policy Uniform Training (OPUT): block diffusion on a two-stream row [noisy | clean]
(the two-stream mask and forward are `block_diffusion`'s).

Shapes: B batch, N row length (a multiple of the block), 2N the two streams, V vocab.
Each example is masked at one rate t ~ U[low, high] on every position past its prompt; with
probability `on_policy_ratio` a no-gradient forward first fills every mask of the noisy
stream with the model's own greedy prediction, and the model learns to recover the clean
tokens from that draft (what soft parallel decoding relies on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trainer import block_diffusion, loss
from trainer.config import ObjectiveConfig


def add_noise(key: jax.Array, tokens_BN: jax.Array, prompt_len_B: jax.Array, cfg: ObjectiveConfig,
              mask_id: int) -> tuple[jax.Array, jax.Array]:
    """(noisy tokens, masked): every position past the prompt is masked with its example's rate."""
    rate_key, mask_key = jax.random.split(key)
    rate_B = jax.random.uniform(rate_key, prompt_len_B.shape, minval=cfg.noise_range_low,
                                maxval=cfg.noise_range_high)
    past_prompt = jnp.arange(tokens_BN.shape[1])[None, :] >= prompt_len_B[:, None]
    return loss.mask_tokens(mask_key, tokens_BN, rate_B[:, None], past_prompt, mask_id)


def oput_loss(model, batch: dict[str, jax.Array], key: jax.Array, mask_id: int, cfg: ObjectiveConfig):
    """(summed CE over supervised positions, their count, summed diagnostics).

    CE of the noisy stream's logits at i against clean token i (no shift), no 1/t weight.
    """
    tokens_BN, loss_mask_BN = batch["tokens"], batch["loss_mask"]
    batch_size, length = tokens_BN.shape
    noise_key, policy_key = jax.random.split(key)
    noisy_BN, masked_BN = add_noise(noise_key, tokens_BN, batch["prompt_len"], cfg, mask_id)
    positions_BN = jnp.tile(jnp.arange(length), (batch_size, 1))
    attention = block_diffusion.two_stream_mask(positions_BN, jnp.ones_like(tokens_BN), cfg.block_size)

    def noisy_logits(noisy):
        return block_diffusion.noisy_stream_logits(model, noisy, tokens_BN, positions_BN, attention)

    # On-policy rollout: the same forward without gradient; its greedy drafts replace the masks.
    on_policy_B = jax.random.uniform(policy_key, (batch_size,)) < cfg.on_policy_ratio
    draft_BN = jnp.argmax(jax.lax.stop_gradient(noisy_logits(noisy_BN)), axis=-1).astype(tokens_BN.dtype)
    replaced_BN = masked_BN & on_policy_B[:, None]
    inputs_BN = jnp.where(replaced_BN, draft_BN, noisy_BN)

    logits_BNV = noisy_logits(inputs_BN)
    nll_BN = -jnp.take_along_axis(jax.nn.log_softmax(logits_BNV), tokens_BN[..., None], -1)[..., 0]
    supervised = loss_mask_BN.astype(bool)
    plain_masked = supervised & masked_BN & ~replaced_BN
    on_policy = supervised & replaced_BN
    metrics = {
        "masked_nll": jnp.where(plain_masked, nll_BN, 0.0).sum(), "masked_count": plain_masked.sum(),
        "on_policy_nll": jnp.where(on_policy, nll_BN, 0.0).sum(), "on_policy_count": on_policy.sum(),
        "replaced": replaced_BN.sum(),
        "response_tokens": (jnp.arange(length)[None, :] >= batch["prompt_len"][:, None]).sum(),
        "truncated": batch["truncated"].sum(),
    }
    return jnp.where(supervised, nll_BN, 0.0).sum(), supervised.sum(), metrics


def report(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-step OPUT figures from the summed diagnostics."""
    return {
        "loss_masked": sums["masked_nll"] / jnp.maximum(sums["masked_count"], 1),
        "loss_on_policy": sums["on_policy_nll"] / jnp.maximum(sums["on_policy_count"], 1),
        "replaced_fraction": sums["replaced"] / jnp.maximum(sums["response_tokens"], 1),
        "truncated_examples": sums["truncated"],
    }
