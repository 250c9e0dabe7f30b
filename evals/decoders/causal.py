"""The causal decoder, for models trained with causal attention (the AR baseline): one token per
forward, greedy or Gumbel-max (sampling.temperature), until EOS or `gen_length` tokens.

Plain (no KV cache): every forward runs the whole prompt + generation under the causal mask, and
the positions not generated yet hold the mask token, which no earlier position sees.
Shapes: B batch, P prompt, T = P + G, V vocab.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from evals.config import SamplingConfig
from evals.decoders import registry
from evals.decoders.common import choose, fill_after_eos, start_tokens


class State(NamedTuple):
    """The decoding loop's carry: one forward per iteration."""
    step: jax.Array  # tokens generated so far
    tokens: jax.Array  # [B, T] prompt, generated tokens and masks
    done: jax.Array  # [B] the sequence emitted EOS
    forwards: jax.Array  # [B] forwards each sequence needed (until its EOS)


def build(graphdef, prompt_shape: tuple[int, int], cfg: SamplingConfig, mask_id: int, eos_id: int):
    batch, prompt_len = prompt_shape
    total = prompt_len + cfg.gen_length
    index = jnp.arange(total)

    @jax.jit
    def generate(params, prompt_BP, key):
        model = nnx.merge(graphdef, params)
        segments = jnp.ones((batch, total), jnp.int32)
        positions = jnp.broadcast_to(index, (batch, total))
        tokens, _, revisions = start_tokens(prompt_BP, total, mask_id)

        def body(s: State) -> State:
            at = prompt_len + s.step
            logits_BTV = model(s.tokens, segments, positions, True)
            logits_B1V = jax.lax.dynamic_slice_in_dim(logits_BTV, at - 1, 1, 1)
            x0_B1 = choose(logits_B1V, jax.random.fold_in(key, s.step), cfg, mask_id).x0
            token_B = jnp.where(s.done, eos_id, x0_B1[:, 0])
            return State(step=s.step + 1, tokens=s.tokens.at[:, at].set(token_B),
                         done=s.done | (token_B == eos_id), forwards=s.forwards + (~s.done).astype(s.forwards.dtype))

        start = State(step=jnp.int32(0), tokens=tokens, done=jnp.zeros(batch, bool),
                      forwards=jnp.zeros(batch, jnp.int32))
        end = jax.lax.while_loop(lambda s: (s.step < cfg.gen_length) & ~s.done.all(), body, start)
        tokens, _ = fill_after_eos(end.tokens, prompt_len, eos_id, total)
        generated = (index >= prompt_len) & (index < prompt_len + end.forwards[:, None])
        decoded_at = jnp.where(generated, index - prompt_len + 1, 0)
        return tokens, decoded_at, revisions, end.forwards, end.step

    return generate


registry.register(registry.Decoder(
    "causal", build, attention=registry.CAUSAL, fits=(registry.CAUSAL,), one_token=lambda cfg: True, auto=False))
