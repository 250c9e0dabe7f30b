"""Block-causal samplers, for models trained block-causally (BD3LM, DMax OPUT).

Blocks of `block_length` tokens at absolute positions (the prompt starts at 0); a block sees
itself and the blocks before it. Exactly `gen_length` positions are generated: positions past
the prompt + generation in the last block are neither decoded nor attended to. Within a block,
one of two rules runs its passes:
- SPD (DMax soft parallel decoding): masked positions decode leftmost first while confident,
  decoded ones stay revisable and feed back as soft embeddings; the block ends when a pass
  changes nothing or every position is confident.
- threshold (Fast-dLLM's rule): commit every masked position whose confidence reaches the
  threshold, at least the most confident one; committed tokens are final. A threshold above 1
  commits exactly one token per forward: the one-token reference.
Each rule runs in two programs with identical tokens at equal settings: one compiled
`lax.while_loop` over blocks and passes that runs the whole sequence every pass (uncached), and
one that keeps the prompt's full blocks and each finished block in a fixed-size KV cache written
from hard tokens only, running passes on the active block alone (cached).
Shapes: B batch, P prompt, T total (a multiple of the block), K block, V vocab, D hidden.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from evals.config import SamplingConfig
from evals.decoding import fill_after_eos, logits_and_choice, start_tokens
from trainer.model import head_dim, kv_heads


class Pass(NamedTuple):
    tokens: jax.Array  # [B, K]
    masked: jax.Array  # [B, K]
    newly: jax.Array  # [B, K] decoded in this pass
    revised: jax.Array  # [B, K] decoded earlier and changed in this pass
    stop: jax.Array  # [B] the block is finished for this sequence
    x0: jax.Array  # [B, K]
    topk_p: jax.Array | None  # [B, K, k] (SPD's soft inputs)
    topk_ids: jax.Array | None  # [B, K, k]


class Rule(NamedTuple):
    """How a block is decoded: one pass from logits, and the next pass's input embeddings."""
    step: Callable[..., Pass]  # (logits_BKV, key, tokens_BK, masked_BK, in_a_BK, active_B, cfg, mask_id)
    inputs: Callable[..., jax.Array]  # (embedding_VD, pass, in_a_BK, mask_id) -> inputs_BKD


def spd_pass(logits_BKV, key, tokens_BK, masked_BK, in_a_BK, active_B, cfg: SamplingConfig, mask_id: int) -> Pass:
    """One SPD pass over the active block."""
    probs, x0, conf = logits_and_choice(logits_BKV, key, cfg, mask_id)
    width = tokens_BK.shape[1]
    index = jnp.arange(width)
    # Still-masked positions decode leftmost first while confident; at least one per pass.
    first_unsure = jnp.min(jnp.where(masked_BK & (conf < cfg.threshold), index, width), axis=1)
    newly = masked_BK & (index < first_unsure[:, None])
    leftmost = jnp.argmax(masked_BK, axis=1)
    none = ~newly.any(1) & masked_BK.any(1)
    newly = (newly | (none[:, None] & (index == leftmost[:, None]))) & active_B[:, None]
    decoded_before = in_a_BK & ~masked_BK & active_B[:, None]
    revise = cfg.revise != "no"  # "auto" left unresolved (no objective known) is DMax's rule: revise
    tokens = jnp.where(newly | (decoded_before & revise), x0, tokens_BK)  # drafts stay revisable
    masked = masked_BK & ~newly
    changed = (tokens != tokens_BK).any(1)
    confident = jnp.where(in_a_BK, probs.max(-1) >= cfg.confidence_stop, True).all(1)
    # Without revision nothing can change once every mask is decoded: the block ends there.
    settled = (~changed | confident) if revise else True
    stop = (settled & ~masked.any(1)) | ~active_B
    topk_p, topk_ids = jax.lax.top_k(probs, cfg.top_k)
    revised = decoded_before & (tokens != tokens_BK)
    return Pass(tokens, masked, newly, revised, stop, x0, topk_p, topk_ids)


def soft_inputs(embedding_VD, result: Pass, in_a_BK, mask_id: int):
    """Decoded positions of the block: the top-k mix of embeddings plus the leftover probability
    times the mask embedding, rescaled to the mix's expected norm; others: their hard embedding."""
    hard = embedding_VD[result.tokens]
    mask_vec = embedding_VD[mask_id]
    leftover = jnp.maximum(0.0, 1.0 - result.topk_p.sum(-1))
    vectors = embedding_VD[result.topk_ids]  # [B, K, k, D]
    mixed = (result.topk_p[..., None] * vectors).sum(-2) + leftover[..., None] * mask_vec
    target_norm = (result.topk_p * jnp.linalg.norm(vectors, axis=-1)).sum(-1) + leftover * jnp.linalg.norm(mask_vec)
    soft = mixed * (target_norm / jnp.maximum(jnp.linalg.norm(mixed, axis=-1), 1e-6))[..., None]
    return jnp.where((in_a_BK & ~result.masked)[..., None], soft, hard)


def threshold_pass(logits_BKV, key, tokens_BK, masked_BK, in_a_BK, active_B, cfg: SamplingConfig,
                   mask_id: int) -> Pass:
    """Commit every masked position with confidence >= threshold, at least the most confident."""
    _, x0, conf = logits_and_choice(logits_BKV, key, cfg, mask_id)
    best = jnp.argmax(jnp.where(masked_BK, conf, -jnp.inf), axis=1)
    sure = conf >= cfg.threshold
    newly = masked_BK & (sure | (jnp.arange(tokens_BK.shape[1]) == best[:, None])) & active_B[:, None]
    masked = masked_BK & ~newly
    return Pass(jnp.where(newly, x0, tokens_BK), masked, newly, jnp.zeros_like(newly),
                ~masked.any(1) | ~active_B, x0, None, None)


def hard_inputs(embedding_VD, result: Pass, in_a_BK, mask_id: int):
    return embedding_VD[result.tokens]


SPD = Rule(spd_pass, soft_inputs)
THRESHOLD = Rule(threshold_pass, hard_inputs)


def layout(prompt_len: int, cfg: SamplingConfig) -> tuple[int, int, int, int]:
    """(end = P + G, total T rounded up to whole blocks, first generating block, number of blocks)."""
    width, end = cfg.block_length, prompt_len + cfg.gen_length
    total = -(-end // width) * width
    return end, total, prompt_len // width, total // width


def block_causal_mask(total: int, width: int, end: int, query_start, query_len: int):
    """[1, 1, query_len, total]: a query sees keys of its own and earlier blocks, before `end`."""
    q_block = (query_start + jnp.arange(query_len)) // width
    keys = jnp.arange(total)
    return ((keys[None, :] // width <= q_block[:, None]) & (keys < end)[None, :])[None, None]


def _decode_block(rule: Rule, forward, embedding_VD, tokens_BT, start, key, active_B, forwards_B, passes,
                  prompt_len: int, end: int, cfg: SamplingConfig, mask_id: int, aux=None):
    """All passes of one block. `forward(inputs_BKD, aux)` returns (the block's logits [B, K, V], aux):
    `aux` is whatever the forward carries from pass to pass (the cached program's KV cache).

    Returns ((block tokens, masked, last x0, decoded_at, revisions), forwards_B, passes, aux)."""
    width = cfg.block_length
    block = jax.lax.dynamic_slice_in_dim(tokens_BT, start, width, 1)
    position = start + jnp.arange(width)
    in_a = ((position >= prompt_len) & (position < end))[None, :] & jnp.ones_like(block, bool)
    masked = in_a & (block == mask_id)
    zeros = jnp.zeros_like(block)
    carry0 = (jnp.int32(0), block, masked, embedding_VD[block], ~active_B, zeros, zeros, zeros, forwards_B, passes,
              aux)

    def cond(carry):
        step, stop = carry[0], carry[4]
        return (step < cfg.steps) & ~stop.all()

    def body(carry):
        step, tokens, masked, inputs, stop, _x0, decoded, revised, forwards, passes, aux = carry
        logits, aux = forward(inputs, aux)
        result = rule.step(logits, jax.random.fold_in(key, step), tokens, masked, in_a, ~stop, cfg, mask_id)
        forwards = forwards + (~stop).astype(forwards.dtype)  # only sequences with work are charged
        decoded = jnp.where(result.newly, passes + 1, decoded)
        revised = revised + result.revised.astype(revised.dtype)
        return (step + 1, result.tokens, result.masked, rule.inputs(embedding_VD, result, in_a, mask_id),
                stop | result.stop, result.x0, decoded, revised, forwards, passes + 1, aux)

    _, tokens, masked, _, _, x0, decoded, revised, forwards, passes, aux = jax.lax.while_loop(cond, body, carry0)
    return (tokens, masked, x0, decoded, revised), forwards, passes, aux


def _finish_block(tokens_BT, decoded_at, revisions, state, start, width, prompt_len, eos_id):
    """Leftover masks take the last prediction; hard tokens go in; EOS fills the rest."""
    block_tokens, masked, x0, block_decoded, block_revised = state
    block_tokens = jnp.where(masked, x0, block_tokens)
    tokens_BT = jax.lax.dynamic_update_slice_in_dim(tokens_BT, block_tokens, start, 1)
    decoded_at = jax.lax.dynamic_update_slice_in_dim(decoded_at, block_decoded, start, 1)
    revisions = jax.lax.dynamic_update_slice_in_dim(revisions, block_revised, start, 1)
    tokens_BT, done = fill_after_eos(tokens_BT, prompt_len, eos_id, start + width)
    return tokens_BT, decoded_at, revisions, done


def uncached(rule: Rule) -> Callable:
    """A program builder: every pass runs the whole sequence under the block-causal mask."""

    def build(graphdef, prompt_shape: tuple[int, int], cfg: SamplingConfig, mask_id: int, eos_id: int):
        batch, prompt_len = prompt_shape
        end, total, first_block, num_blocks = layout(prompt_len, cfg)
        width = cfg.block_length

        @jax.jit
        def generate(params, prompt_BP, key):
            model = nnx.merge(graphdef, params)
            embedding = model.embed.embedding[...]
            positions = jnp.broadcast_to(jnp.arange(total), (batch, total))
            mask_all = block_causal_mask(total, width, end, 0, total)
            tokens, decoded_at, revisions = start_tokens(prompt_BP, total, mask_id)

            def cond(carry):
                block, done = carry[0], carry[4]
                return (block < num_blocks) & ~done.all()

            def body(carry):
                block, tokens, decoded_at, revisions, done, forwards, passes = carry
                start = block * width
                hard = embedding[tokens]

                def forward(block_inputs, aux):
                    inputs = jax.lax.dynamic_update_slice_in_dim(hard, block_inputs.astype(hard.dtype), start, 1)
                    logits, _ = model.forward(inputs, positions, mask_all)
                    return jax.lax.dynamic_slice_in_dim(logits, start, width, 1), aux

                state, forwards, passes, _ = _decode_block(rule, forward, embedding, tokens, start,
                                                           jax.random.fold_in(key, block), ~done, forwards, passes,
                                                           prompt_len, end, cfg, mask_id)
                tokens, decoded_at, revisions, done = _finish_block(
                    tokens, decoded_at, revisions, state, start, width, prompt_len, eos_id)
                return block + 1, tokens, decoded_at, revisions, done, forwards, passes

            carry = (jnp.int32(first_block), tokens, decoded_at, revisions, jnp.zeros(batch, bool),
                     jnp.zeros(batch, jnp.int32), jnp.int32(0))
            _, tokens, decoded_at, revisions, _, forwards, passes = jax.lax.while_loop(cond, body, carry)
            tokens, _ = fill_after_eos(tokens, prompt_len, eos_id, end)
            return tokens, decoded_at, revisions, forwards, passes

        return generate

    build.__name__ = f"uncached_{rule.step.__name__}"
    return build


def cached(rule: Rule) -> Callable:
    """A program builder with a fixed-size KV cache: passes run on the active block alone, against
    the cached blocks before it. The cache holds K/V of hard tokens only: the hard tokens not yet
    cached (the prompt's full blocks, then each finished block) ride along with the next block's
    first pass, which writes them (DMax's way), so no forward only writes the cache."""

    def build(graphdef, prompt_shape: tuple[int, int], cfg: SamplingConfig, mask_id: int, eos_id: int):
        batch, prompt_len = prompt_shape
        end, total, first_block, num_blocks = layout(prompt_len, cfg)
        width = cfg.block_length

        @functools.partial(jax.jit, static_argnames="uncached")
        def decode_block(params, tokens, decoded_at, revisions, done, forwards, passes, block, caches, key, uncached):
            """One block; `uncached` hard tokens before it (static) are written to the cache by its first pass."""
            model = nnx.merge(graphdef, params)
            embedding = model.embed.embedding[...]
            start = block * width
            prefix = embedding[jax.lax.dynamic_slice_in_dim(tokens, start - uncached, uncached, 1)]

            def forward(block_inputs, caches):
                inputs = jnp.concatenate([prefix, block_inputs.astype(prefix.dtype)], 1)
                query_start = start - uncached
                positions = jnp.broadcast_to(query_start + jnp.arange(inputs.shape[1]), inputs.shape[:2])
                mask = block_causal_mask(total, width, end, query_start, inputs.shape[1])
                logits, kvs = model.forward(inputs, positions, mask, [(k, v, query_start) for k, v in caches])
                return logits[:, uncached:], kvs

            def later(block_inputs, caches):  # passes after the first: the block alone, cache as written
                mask = block_causal_mask(total, width, end, start, width)
                positions = jnp.broadcast_to(start + jnp.arange(width), block_inputs.shape[:2])
                logits, kvs = model.forward(block_inputs, positions, mask, [(k, v, start) for k, v in caches])
                return logits, caches

            state, forwards, passes, caches = _decode_block(
                rule, _first_then(forward, later), embedding, tokens, start, jax.random.fold_in(key, block), ~done,
                forwards, passes, prompt_len, end, cfg, mask_id, aux=(jnp.bool_(True), caches))
            tokens, decoded_at, revisions, done = _finish_block(
                tokens, decoded_at, revisions, state, start, width, prompt_len, eos_id)
            return tokens, decoded_at, revisions, done, forwards, passes, caches[1]

        def generate(params, prompt_BP, key):
            model = nnx.merge(graphdef, params)
            shape = (batch, total, kv_heads(model.cfg), head_dim(model.cfg))
            dtype = jnp.dtype(model.cfg.compute_dtype)
            caches = [(jnp.zeros(shape, dtype),) * 2 for _ in range(model.cfg.layers)]
            tokens, decoded_at, revisions = start_tokens(prompt_BP, total, mask_id)
            done, forwards, passes = jnp.zeros(batch, bool), jnp.zeros(batch, jnp.int32), jnp.int32(0)
            uncached = first_block * width  # the prompt's full blocks
            for block in range(first_block, num_blocks):
                tokens, decoded_at, revisions, done, forwards, passes, caches = decode_block(
                    params, tokens, decoded_at, revisions, done, forwards, passes, jnp.int32(block), caches, key,
                    uncached=uncached)
                if bool(done.all()):
                    break
                uncached = width
            tokens, _ = fill_after_eos(tokens, prompt_len, eos_id, end)
            return tokens, decoded_at, revisions, forwards, passes

        return generate

    build.__name__ = f"cached_{rule.step.__name__}"
    return build


def _first_then(first, later):
    """A forward that runs `first` on the first pass (it writes the cache) and `later` afterwards;
    aux = (is this the first pass, the KV caches)."""

    def forward(block_inputs, aux):
        is_first, caches = aux
        logits, caches = jax.lax.cond(is_first, first, later, block_inputs, caches)
        return logits, (jnp.bool_(False), caches)

    return forward
