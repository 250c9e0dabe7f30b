"""Full-attention samplers, for models trained with bidirectional attention (MDLM).

Semi-autoregressive blocks of `block_length` tokens from the end of the prompt; every forward
attends bidirectionally over the whole prompt + generation (masks included). Within the current
block, per forward:
- remask (LLaDA low-confidence remasking): commit the `count` most confident masked positions,
  the block's masks spread evenly over its steps (`remask_steps`; default one token per step,
  the one-token reference);
- threshold (Fast-dLLM's rule, no cache): commit every masked position whose confidence
  reaches the threshold, at least the most confident one.
Committed tokens are never revised. Shapes: B batch, P prompt, T = P + G, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from evals.config import SamplingConfig
from evals.decoding import fill_after_eos, logits_and_choice, start_tokens


def remask_commit(conf_BT, candidate_BT, j, cfg: SamplingConfig):
    """The block's `count` most confident masked positions at its step j."""
    width, per_block = cfg.block_length, _remask_steps(cfg) // (cfg.gen_length // cfg.block_length)
    count = width // per_block + (j < width % per_block).astype(jnp.int32)
    score = jnp.where(candidate_BT, conf_BT, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=1), axis=1)
    return candidate_BT & (rank < count)


def threshold_commit(conf_BT, candidate_BT, j, cfg: SamplingConfig):
    """Every masked position of the block at or above the threshold, at least the most confident."""
    best = jnp.argmax(jnp.where(candidate_BT, conf_BT, -jnp.inf), axis=1)
    return candidate_BT & ((conf_BT >= cfg.threshold) | (jnp.arange(conf_BT.shape[1]) == best[:, None]))


def _remask_steps(cfg: SamplingConfig) -> int:
    return cfg.remask_steps or cfg.gen_length


def program(commit: Callable) -> Callable:
    """A program builder for one commit rule."""

    def build(graphdef, prompt_shape: tuple[int, int], cfg: SamplingConfig, mask_id: int, eos_id: int):
        batch, prompt_len = prompt_shape
        width, num_blocks = cfg.block_length, cfg.gen_length // cfg.block_length
        total = prompt_len + cfg.gen_length
        index = jnp.arange(total)

        @jax.jit
        def generate(params, prompt_BP, key):
            model = nnx.merge(graphdef, params)
            embedding = model.embed.embedding[...]
            positions = jnp.broadcast_to(jnp.arange(total), (batch, total))
            full = jnp.ones((1, 1, total, total), bool)
            tokens, decoded_at, revisions = start_tokens(prompt_BP, total, mask_id)

            def cond(carry):
                block, done = carry[1], carry[4]
                return (block < num_blocks) & ~done.all()

            def body(carry):
                step, block, j, tokens, done, decoded_at, forwards = carry
                start = prompt_len + block * width
                in_block = (index >= start) & (index < start + width)
                logits, _ = model.forward(embedding[tokens], positions, full)
                _, x0, conf = logits_and_choice(logits, jax.random.fold_in(key, step), cfg, mask_id)
                candidate = (tokens == mask_id) & in_block & ~done[:, None]
                chosen = commit(conf, candidate, j, cfg)
                tokens = jnp.where(chosen, x0, tokens)
                decoded_at = jnp.where(chosen, step + 1, decoded_at)
                forwards = forwards + candidate.any(1).astype(forwards.dtype)  # only sequences with work
                block_end = ~((tokens == mask_id) & in_block & ~done[:, None]).any()
                filled, ended = fill_after_eos(tokens, prompt_len, eos_id, start + width)
                tokens = jnp.where(block_end, filled, tokens)
                return (step + 1, block + block_end, jnp.where(block_end, 0, j + 1), tokens,
                        done | (block_end & ended), decoded_at, forwards)

            carry = (jnp.int32(0), jnp.int32(0), jnp.int32(0), tokens, jnp.zeros(batch, bool), decoded_at,
                     jnp.zeros(batch, jnp.int32))
            passes, _, _, tokens, _, decoded_at, forwards = jax.lax.while_loop(cond, body, carry)
            tokens, _ = fill_after_eos(tokens, prompt_len, eos_id, total)
            return tokens, decoded_at, revisions, forwards, passes

        return generate

    build.__name__ = f"full_{commit.__name__}"
    return build
