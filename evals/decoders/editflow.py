"""Edit Flows' decoder: tau-leaping over a fixed-size buffer, a whole batch in one compiled program
(trainer/objectives/editflow.py trains the model).

The buffer holds prompt + generation (T = P + G positions); a row starts as its prompt followed by
`edit_masks` MASK tokens (the training prior) and has a length n <= T. Each of `remask_steps`
steps (tau = (1 - time_eps) / steps, t = 0, tau, ...) runs one forward over the row's n tokens and
reads the rates w_t * r_hat (w under the schedule the model trained with). Past the prompt, a row
fires with probability tau * (r_sub + r_del) and is then deleted with probability
r_del / (r_sub + r_del), else substituted; after each row from the prompt's last token on, one
token is inserted with probability tau * r_ins: at most one insertion per gap per step. Tokens
come greedy or Gumbel-max at `temperature` from the substitution or insertion head. A row that
would outgrow the buffer is cut at T and flagged. The prompt is never edited. Tokens per forward =
the final generated tokens / the steps. Shapes: B batch, T buffer, V vocab.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from evals.config import SamplingConfig
from evals.decoders import registry
from evals.decoders.common import choose, fill_after_eos
from trainer.objectives.editflow import DEL, INS, SUB, weight


class State(NamedTuple):
    tokens: jax.Array  # [B, T] the row's n tokens, then EOS
    n: jax.Array  # [B] the row's length
    decoded_at: jax.Array  # [B, T] the step (1-based) that inserted each token; 0 = the start (prompt, masks)
    revisions: jax.Array  # [B, T] substitutions each token took after it was written
    overflow: jax.Array  # [B] an edit was cut at the buffer's end


def start_state(prompt_BP, total: int, masks: int, mask_id: int, eos_id: int) -> State:
    batch, prompt_len = prompt_BP.shape
    index = jnp.arange(total)
    tokens = jnp.full((batch, total), eos_id, prompt_BP.dtype).at[:, :prompt_len].set(prompt_BP)
    tokens = jnp.where((index >= prompt_len) & (index < prompt_len + masks), mask_id, tokens)
    zeros = jnp.zeros((batch, total), jnp.int32)
    return State(tokens, jnp.full(batch, prompt_len + masks, jnp.int32), zeros, zeros, jnp.zeros(batch, bool))


def tau_leap_step(sub_logits_BTV, ins_logits_BTV, rates_BT3, s: State, step, key, prompt_len: int,
                  cfg: SamplingConfig, mask_id: int, eos_id: int) -> State:
    """One tau-leaping step from one forward's outputs (module docstring). Pure: the decoder's loop
    body, and what tests drive with oracle rates."""
    total = s.tokens.shape[1]
    index = jnp.arange(total)
    live = index[None, :] < s.n[:, None]
    rates_BT3 = weight(step * tau(cfg), cfg.edit_kappa, cfg.edit_max_w) * rates_BT3
    editable = live & (index >= prompt_len)  # the prompt is never substituted nor deleted
    r_sub = jnp.where(editable, rates_BT3[..., SUB], 0.0)
    r_del = jnp.where(editable, rates_BT3[..., DEL], 0.0)
    r_ins = jnp.where(live & (index >= prompt_len - 1), rates_BT3[..., INS], 0.0)  # after the prompt's last token on
    fire_key, which_key, sub_key, ins_key, tok_key = jax.random.split(jax.random.fold_in(key, step), 5)
    fire = jax.random.uniform(fire_key, r_sub.shape) < jnp.clip(tau(cfg) * (r_sub + r_del), 0, 1 - 1e-6)
    delete = fire & (jax.random.uniform(which_key, r_sub.shape) * (r_sub + r_del) < r_del)
    substitute = fire & ~delete
    insert = jax.random.uniform(ins_key, r_ins.shape) < jnp.clip(tau(cfg) * r_ins, 0, 1 - 1e-6)
    sub_token = choose(sub_logits_BTV, sub_key, cfg, mask_id).x0
    ins_token = choose(ins_logits_BTV, tok_key, cfg, mask_id).x0

    keep = live & ~delete
    emit = keep.astype(jnp.int32) + insert
    dst = jnp.cumsum(emit, 1) - emit  # where row i's kept token lands; its insertion follows it
    rows = jnp.arange(s.tokens.shape[0])[:, None]

    def scatter(base, kept, inserted):
        out = base.at[rows, jnp.where(keep, dst, total)].set(kept, mode="drop")
        return out.at[rows, jnp.where(insert, dst + keep, total)].set(inserted, mode="drop")

    written = step + 1
    grown = emit.sum(1)
    return State(
        tokens=scatter(jnp.full_like(s.tokens, eos_id), jnp.where(substitute, sub_token, s.tokens), ins_token),
        n=jnp.minimum(grown, total),
        decoded_at=scatter(jnp.zeros_like(s.decoded_at), s.decoded_at, written),
        revisions=scatter(jnp.zeros_like(s.revisions), s.revisions + substitute, 0),
        overflow=s.overflow | (grown > total))


def steps(cfg: SamplingConfig) -> int:
    """sampling.remask_steps (0 = gen_length)."""
    return cfg.remask_steps or cfg.gen_length


def tau(cfg: SamplingConfig) -> float:
    """The step: the steps span [0, 1 - time_eps)."""
    return (1 - cfg.time_eps) / steps(cfg)


def build(graphdef, prompt_shape: tuple[int, int], cfg: SamplingConfig, mask_id: int, eos_id: int):
    batch, prompt_len = prompt_shape
    total = prompt_len + cfg.gen_length

    @jax.jit
    def generate(params, prompt_BP, key):
        model = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(total), (batch, total))

        def body(step, s: State) -> State:
            segments = (positions < s.n[:, None]).astype(jnp.int32)
            outputs = model.edit_outputs(s.tokens, segments, positions, jnp.full(batch, step * tau(cfg)))
            return tau_leap_step(*outputs, s, step, key, prompt_len, cfg, mask_id, eos_id)

        end = jax.lax.fori_loop(0, steps(cfg), body, start_state(prompt_BP, total, cfg.edit_masks, mask_id, eos_id))
        tokens, _ = fill_after_eos(end.tokens, prompt_len, eos_id, total)
        forwards = jnp.full(batch, steps(cfg), jnp.int32)
        return tokens, end.decoded_at, end.revisions, forwards, jnp.int32(steps(cfg))

    return generate


registry.register(registry.Decoder("editflow", build, attention=registry.FULL, fits=(registry.BIDIRECTIONAL,),
                                   edit_heads=True))
