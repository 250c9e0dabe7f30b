"""Full-attention decoders, for models trained with bidirectional attention (MDLM; Dream's decoders,
dream.py, run the same loop on shifted logits).

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

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from evals.config import SamplingConfig
from evals.decoders import registry
from evals.decoders.common import Choice, choose, fill_after_eos, start_tokens
from trainer.attention import Dense
from trainer.objectives.masking import shift_BLV


class State(NamedTuple):
    """The decoding loop's carry: one forward per iteration."""
    step: jax.Array  # forwards run so far
    block: jax.Array  # the block being decoded (0 = the first after the prompt)
    j: jax.Array  # forwards run on this block
    tokens: jax.Array  # [B, T] prompt, committed tokens and masks
    done: jax.Array  # [B] the sequence emitted EOS in a finished block
    decoded_at: jax.Array  # [B, T] the forward (1-based) that committed each position; 0 = prompt
    forwards: jax.Array  # [B] forwards each sequence needed (those in which it still had masks)


def remask_commit(conf_BT, candidate_BT, j, cfg: SamplingConfig, key):
    """The most confident masked positions of the block at its step j, its masks spread evenly over
    the steps left: ceil(n / steps left) of a row's n (the larger shares first, as LLaDA's)."""
    left = jnp.maximum(steps_per_block(cfg) - j, 1)
    n_B = candidate_BT.sum(1)
    count_B = (n_B + left - 1) // left
    return candidate_BT & (ranks(jnp.where(candidate_BT, conf_BT, -jnp.inf)) < count_B[:, None])


def threshold_commit(conf_BT, candidate_BT, j, cfg: SamplingConfig, key):
    """Every masked position of the block at or above the threshold, at least the most confident."""
    best = jnp.argmax(jnp.where(candidate_BT, conf_BT, -jnp.inf), axis=1)
    return candidate_BT & ((conf_BT >= cfg.threshold) | (jnp.arange(conf_BT.shape[1]) == best[:, None]))


def ranks(score_BT):
    """Each position's rank in its row, highest score first (0 = the highest)."""
    return jnp.argsort(jnp.argsort(-score_BT, axis=1), axis=1)


def steps_per_block(cfg: SamplingConfig) -> int:
    """sampling.remask_steps (0 = gen_length) spread evenly over the blocks."""
    return (cfg.remask_steps or cfg.gen_length) // (cfg.gen_length // cfg.block_length)


def max_probability(choice: Choice, cfg: SamplingConfig):
    """The confidence the remask and threshold rules rank by: the chosen token's probability."""
    return choice.conf


def decode_step(logits_BTV, s: State, key, prompt_len: int, cfg: SamplingConfig, mask_id: int, eos_id: int,
                commit: Callable, confidence: Callable) -> State:
    """One forward's decisions from its logits (already read as the model was trained: shifted for
    Dream): choose tokens, commit some of the current block's masked positions, end the block when
    none is left. Pure: the decoders' loop body, and what tests drive with oracle logits."""
    index = jnp.arange(s.tokens.shape[1])
    start = prompt_len + s.block * cfg.block_length
    in_block = (index >= start) & (index < start + cfg.block_length)
    step_key = jax.random.fold_in(key, s.step)
    choice = choose(logits_BTV, step_key, cfg, mask_id)
    # Undecoded = never committed (not `== mask_id`: a committed mask id, possible with
    # suppress_mask off, would otherwise stay a candidate forever).
    open_BL = (index >= prompt_len) & in_block & ~s.done[:, None]
    candidate = (s.decoded_at == 0) & open_BL
    chosen = commit(confidence(choice, cfg), candidate, s.j, cfg, jax.random.fold_in(step_key, 1))
    tokens = jnp.where(chosen, choice.x0, s.tokens)
    decoded_at = jnp.where(chosen, s.step + 1, s.decoded_at)
    block_end = ~((decoded_at == 0) & open_BL).any()
    filled, ended = fill_after_eos(tokens, prompt_len, eos_id, start + cfg.block_length)
    return State(step=s.step + 1, block=s.block + block_end, j=jnp.where(block_end, 0, s.j + 1),
                 tokens=jnp.where(block_end, filled, tokens), done=s.done | (block_end & ended),
                 decoded_at=decoded_at, forwards=s.forwards + candidate.any(1).astype(s.forwards.dtype))


def start_state(prompt_BP, total: int, mask_id: int) -> State:
    tokens, decoded_at, _ = start_tokens(prompt_BP, total, mask_id)
    batch = prompt_BP.shape[0]
    return State(step=jnp.int32(0), block=jnp.int32(0), j=jnp.int32(0), tokens=tokens, done=jnp.zeros(batch, bool),
                 decoded_at=decoded_at, forwards=jnp.zeros(batch, jnp.int32))


def _logits(model, tokens_BT, shift: bool):
    """One full-attention forward over the whole canvas, read as the model was trained."""
    batch, total = tokens_BT.shape
    positions = jnp.broadcast_to(jnp.arange(total), (batch, total))
    logits, _ = model.forward(model.embed.embedding[...][tokens_BT], positions,
                              Dense(jnp.ones((1, 1, total, total), bool)))
    return shift_BLV(logits) if shift else logits


def program(commit: Callable, confidence: Callable = max_probability, shift: bool = False) -> Callable:
    """A program builder for one commit rule `commit(conf_BT, candidate_BT, j, cfg, key)`, ranking by
    `confidence(choice, cfg)`; `shift`: read position i's token from position i-1's logits (Dream)."""

    def build(graphdef, prompt_shape: tuple[int, int], cfg: SamplingConfig, mask_id: int, eos_id: int):
        batch, prompt_len = prompt_shape
        total = prompt_len + cfg.gen_length

        @jax.jit
        def generate(params, prompt_BP, key):
            model = nnx.merge(graphdef, params)

            def body(s: State) -> State:
                return decode_step(_logits(model, s.tokens, shift), s, key, prompt_len, cfg, mask_id, eos_id, commit,
                                   confidence)

            num_blocks = cfg.gen_length // cfg.block_length
            end = jax.lax.while_loop(lambda s: (s.block < num_blocks) & ~s.done.all(), body,
                                     start_state(prompt_BP, total, mask_id))
            tokens, _ = fill_after_eos(end.tokens, prompt_len, eos_id, total)
            return tokens, end.decoded_at, jnp.zeros_like(tokens), end.forwards, end.step

        return generate

    return build


def infill(commit: Callable, confidence: Callable = max_probability, shift: bool = False) -> Callable:
    """An infilling program builder for the same rule: `generate(params, canvas_BT, key)` fills every
    mask of the canvas, anywhere, in one block of `remask_steps` steps (> 0: the caller counts the
    holes), the other tokens staying fixed context; EOS ends nothing. Returns what `program`'s does,
    decoded_at 0 on the fixed tokens."""

    def build(graphdef, canvas_shape: tuple[int, int], cfg: SamplingConfig, mask_id: int, eos_id: int):
        total = canvas_shape[1]
        one_block = dataclasses.replace(cfg, gen_length=total, block_length=total)

        @jax.jit
        def generate(params, canvas_BT, key):
            model = nnx.merge(graphdef, params)
            holes = canvas_BT == mask_id
            start = start_state(canvas_BT[:, :0], total, mask_id)._replace(
                tokens=canvas_BT, decoded_at=jnp.where(holes, 0, -1))

            def body(s: State) -> State:
                return decode_step(_logits(model, s.tokens, shift), s, key, 0, one_block, mask_id, -1, commit,
                                   confidence)

            end = jax.lax.while_loop(lambda s: s.block < 1, body, start)
            return end.tokens, jnp.maximum(end.decoded_at, 0), jnp.zeros_like(canvas_BT), end.forwards, end.step

        return generate

    return build


registry.register(registry.Decoder(
    "remask", program(remask_commit), attention=registry.FULL, fits=(registry.BIDIRECTIONAL,),
    one_token=lambda cfg: cfg.remask_steps in (0, cfg.gen_length), infill=infill(remask_commit)))
registry.register(registry.Decoder(
    "threshold_full", program(threshold_commit), attention=registry.FULL, fits=(registry.BIDIRECTIONAL,),
    infill=infill(threshold_commit)))
