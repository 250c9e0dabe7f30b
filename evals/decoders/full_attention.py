"""Full-attention decoders, for models trained with bidirectional attention (MDLM).

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from evals.config import SamplingConfig
from evals.decoders import registry
from evals.decoders.common import choose, fill_after_eos, start_tokens
from trainer.attention import Dense


class State(NamedTuple):
    """The decoding loop's carry: one forward per iteration."""
    step: jax.Array  # forwards run so far
    block: jax.Array  # the block being decoded (0 = the first after the prompt)
    j: jax.Array  # forwards run on this block
    tokens: jax.Array  # [B, T] prompt, committed tokens and masks
    done: jax.Array  # [B] the sequence emitted EOS in a finished block
    decoded_at: jax.Array  # [B, T] the forward (1-based) that committed each position; 0 = prompt
    forwards: jax.Array  # [B] forwards each sequence needed (those in which it still had masks)


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
            full = Dense(jnp.ones((1, 1, total, total), bool))
            tokens, decoded_at, revisions = start_tokens(prompt_BP, total, mask_id)

            def body(s: State) -> State:
                start = prompt_len + s.block * width
                in_block = (index >= start) & (index < start + width)
                logits, _ = model.forward(embedding[s.tokens], positions, full)
                choice = choose(logits, jax.random.fold_in(key, s.step), cfg, mask_id)
                # Undecoded = never committed (not `== mask_id`: a committed mask id, possible with
                # suppress_mask off, would otherwise stay a candidate forever).
                open_BL = (index >= prompt_len) & in_block & ~s.done[:, None]
                candidate = (s.decoded_at == 0) & open_BL
                chosen = commit(choice.conf, candidate, s.j, cfg)
                tokens = jnp.where(chosen, choice.x0, s.tokens)
                decoded_at = jnp.where(chosen, s.step + 1, s.decoded_at)
                block_end = ~((decoded_at == 0) & open_BL).any()
                filled, ended = fill_after_eos(tokens, prompt_len, eos_id, start + width)
                return State(step=s.step + 1, block=s.block + block_end, j=jnp.where(block_end, 0, s.j + 1),
                             tokens=jnp.where(block_end, filled, tokens), done=s.done | (block_end & ended),
                             decoded_at=decoded_at,
                             forwards=s.forwards + candidate.any(1).astype(s.forwards.dtype))

            start = State(step=jnp.int32(0), block=jnp.int32(0), j=jnp.int32(0), tokens=tokens,
                          done=jnp.zeros(batch, bool), decoded_at=decoded_at, forwards=jnp.zeros(batch, jnp.int32))
            end = jax.lax.while_loop(lambda s: (s.block < num_blocks) & ~s.done.all(), body, start)
            tokens, _ = fill_after_eos(end.tokens, prompt_len, eos_id, total)
            return tokens, end.decoded_at, revisions, end.forwards, end.step

        return generate

    return build


registry.register(registry.Decoder(
    "remask", program(remask_commit), attention=registry.FULL, fits=(registry.BIDIRECTIONAL,),
    one_token=lambda cfg: cfg.remask_steps in (0, cfg.gen_length)))
registry.register(registry.Decoder(
    "threshold_full", program(threshold_commit), attention=registry.FULL, fits=(registry.BIDIRECTIONAL,)))
