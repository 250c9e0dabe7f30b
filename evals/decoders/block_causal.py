"""Block-causal decoders, for models trained block-causally (BD3LM, DMax OPUT).

Blocks of `block_length` tokens at absolute positions (the prompt starts at 0); a block sees
itself and the blocks before it. Exactly `gen_length` positions are generated: positions past
the prompt + generation in the last block are neither decoded nor attended to. Within a block,
one of two rules runs its passes:
- SPD (DMax soft parallel decoding): masked positions decode leftmost first while confident,
  decoded ones stay revisable and feed back as soft embeddings; the block ends when a pass
  changes nothing or every position is confident.
- threshold (Fast-dLLM's rule): commit every masked position whose confidence reaches the
  threshold, at least one (the leftmost masked, or by sampling.order the most confident);
  committed tokens are final. A threshold above 1 commits exactly one token per forward: the
  one-token reference.
Each rule runs in two programs with identical tokens at equal settings: one compiled
`lax.while_loop` over blocks and passes that runs the whole sequence every pass (uncached), and
one that keeps the prompt's full blocks and each finished block in a fixed-size KV cache written
from hard tokens only, running passes on the active block alone (cached).
Shapes: B batch, P prompt, T total (a multiple of the block), K block, V vocab, D hidden.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from evals.config import SamplingConfig
from evals.decoders import registry
from evals.decoders.common import choose, fill_after_eos, start_tokens, top_k_probs
from trainer.attention import Dense
from trainer.model import head_dim, kv_heads


class Sequence(NamedTuple):
    """A request's state between blocks."""
    tokens: jax.Array  # [B, T] prompt, finished blocks and masks
    decoded_at: jax.Array  # [B, T] the pass (1-based) that first decoded each position; 0 = prompt
    revisions: jax.Array  # [B, T] times a decoded position took a new token afterwards
    done: jax.Array  # [B] the sequence emitted EOS in a finished block
    forwards: jax.Array  # [B] forwards each sequence needed (those in which it still had work)
    passes: jax.Array  # passes the batch ran in lockstep


class BlockPasses(NamedTuple):
    """The carry of one block's passes."""
    step: jax.Array  # passes run on this block
    tokens: jax.Array  # [B, K] the block's tokens: masks, drafts and decoded tokens
    masked: jax.Array  # [B, K] still masked
    inputs: jax.Array  # [B, K, D] the next pass's input embeddings
    stop: jax.Array  # [B] the block is finished for this sequence
    x0: jax.Array  # [B, K] the last pass's prediction
    decoded_at: jax.Array  # [B, K] as in Sequence
    revisions: jax.Array  # [B, K] as in Sequence
    forwards: jax.Array  # [B] as in Sequence
    passes: jax.Array  # as in Sequence
    aux: Any  # what the forward carries from pass to pass (the cached program's KV cache)


class Pass(NamedTuple):
    """What one pass of a rule decides."""
    tokens: jax.Array  # [B, K]
    masked: jax.Array  # [B, K]
    newly: jax.Array  # [B, K] decoded in this pass
    revised: jax.Array  # [B, K] decoded earlier and changed in this pass
    stop: jax.Array  # [B] the block is finished for this sequence
    x0: jax.Array  # [B, K]
    topk_p: jax.Array | None  # [B, K, k] (SPD's soft inputs)
    topk_ids: jax.Array | None  # [B, K, k]


class Rule(NamedTuple):
    """How a block is decoded: one pass from logits, the next pass's input embeddings, and the most
    passes a block may take (a rule that decodes at least one masked position per pass is done
    within the block's width)."""
    step: Callable[..., Pass]  # (logits_BKV, key, tokens_BK, masked_BK, in_a_BK, active_B, cfg, mask_id)
    inputs: Callable[..., jax.Array]  # (embedding_VD, pass, in_a_BK, cfg, mask_id) -> inputs_BKD
    max_passes: Callable[[SamplingConfig], int]


def spd_pass(logits_BKV, key, tokens_BK, masked_BK, in_a_BK, active_B, cfg: SamplingConfig, mask_id: int) -> Pass:
    """One SPD pass over the active block."""
    choice = choose(logits_BKV, key, cfg, mask_id)
    x0, conf = choice.x0, choice.conf
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
    confident = jnp.where(in_a_BK, choice.p_max >= cfg.confidence_stop, True).all(1)
    # Without revision nothing can change once every mask is decoded: the block ends there.
    settled = (~changed | confident) if revise else True
    stop = (settled & ~masked.any(1)) | ~active_B
    topk_p, topk_ids = top_k_probs(choice, cfg.top_k)
    revised = decoded_before & (tokens != tokens_BK)
    return Pass(tokens, masked, newly, revised, stop, x0, topk_p, topk_ids)


def soft_inputs(embedding_VD, result: Pass, in_a_BK, cfg: SamplingConfig, mask_id: int):
    """With revision, decoded positions of the block: the top-k mix of embeddings plus the leftover
    probability times the mask embedding, rescaled to the mix's expected norm; others: their hard
    embedding. Without revision (a SUBS model, trained only to fill masks) every decoded position is
    its committed token's hard embedding: what the model saw of unmasked tokens in training; so with
    sampling.spd_inputs=hard (what OPUT's rollout showed the model of its drafts)."""
    hard = embedding_VD[result.tokens]
    if cfg.revise == "no" or cfg.spd_inputs == "hard":
        return hard
    mask_vec = embedding_VD[mask_id]
    leftover = jnp.maximum(0.0, 1.0 - result.topk_p.sum(-1))
    vectors = embedding_VD[result.topk_ids]  # [B, K, k, D]
    mixed = (result.topk_p[..., None] * vectors).sum(-2) + leftover[..., None] * mask_vec
    target_norm = (result.topk_p * jnp.linalg.norm(vectors, axis=-1)).sum(-1) + leftover * jnp.linalg.norm(mask_vec)
    soft = mixed * (target_norm / jnp.maximum(jnp.linalg.norm(mixed, axis=-1), 1e-6))[..., None]
    return jnp.where((in_a_BK & ~result.masked)[..., None], soft, hard)


def threshold_pass(logits_BKV, key, tokens_BK, masked_BK, in_a_BK, active_B, cfg: SamplingConfig,
                   mask_id: int) -> Pass:
    """Commit every masked position with confidence >= threshold, at least one: the leftmost
    (sampling.order=left_to_right) or the most confident (confidence)."""
    choice = choose(logits_BKV, key, cfg, mask_id)
    x0, conf = choice.x0, choice.conf
    order = conf if cfg.order == "confidence" else -jnp.arange(tokens_BK.shape[1], dtype=conf.dtype)
    best = jnp.argmax(jnp.where(masked_BK, order, -jnp.inf), axis=1)
    sure = conf >= cfg.threshold
    newly = masked_BK & (sure | (jnp.arange(tokens_BK.shape[1]) == best[:, None])) & active_B[:, None]
    masked = masked_BK & ~newly
    return Pass(jnp.where(newly, x0, tokens_BK), masked, newly, jnp.zeros_like(newly),
                ~masked.any(1) | ~active_B, x0, None, None)


def hard_inputs(embedding_VD, result: Pass, in_a_BK, cfg: SamplingConfig, mask_id: int):
    return embedding_VD[result.tokens]


SPD = Rule(spd_pass, soft_inputs, lambda cfg: cfg.steps or cfg.block_length)  # DMax caps SPD at the block width
THRESHOLD = Rule(threshold_pass, hard_inputs, lambda cfg: cfg.block_length)  # until the block is decoded


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


def _decode_block(rule: Rule, forward, embedding_VD, seq: Sequence, start, key, prompt_len: int, end: int,
                  cfg: SamplingConfig, mask_id: int, aux=None) -> BlockPasses:
    """All passes of one block. `forward(inputs_BKD, aux)` returns (the block's logits [B, K, V], aux)."""
    width = cfg.block_length
    block = jax.lax.dynamic_slice_in_dim(seq.tokens, start, width, 1)
    position = start + jnp.arange(width)
    in_a = ((position >= prompt_len) & (position < end))[None, :] & jnp.ones_like(block, bool)
    zeros = jnp.zeros_like(block)

    def body(b: BlockPasses) -> BlockPasses:
        logits, aux = forward(b.inputs, b.aux)
        result = rule.step(logits, jax.random.fold_in(key, b.step), b.tokens, b.masked, in_a, ~b.stop, cfg, mask_id)
        return BlockPasses(
            step=b.step + 1, tokens=result.tokens, masked=result.masked,
            inputs=rule.inputs(embedding_VD, result, in_a, cfg, mask_id), stop=b.stop | result.stop, x0=result.x0,
            decoded_at=jnp.where(result.newly, b.passes + 1, b.decoded_at),
            revisions=b.revisions + result.revised.astype(b.revisions.dtype),
            forwards=b.forwards + (~b.stop).astype(b.forwards.dtype),  # only sequences with work are charged
            passes=b.passes + 1, aux=aux)

    first = BlockPasses(step=jnp.int32(0), tokens=block, masked=in_a & (block == mask_id), inputs=embedding_VD[block],
                        stop=seq.done, x0=zeros, decoded_at=zeros, revisions=zeros, forwards=seq.forwards,
                        passes=seq.passes, aux=aux)
    return jax.lax.while_loop(lambda b: (b.step < rule.max_passes(cfg)) & ~b.stop.all(), body, first)


def _finish_block(seq: Sequence, b: BlockPasses, start, width: int, prompt_len: int, eos_id: int) -> Sequence:
    """Leftover masks take the last prediction; hard tokens go in; EOS fills the rest."""
    put = lambda whole, part: jax.lax.dynamic_update_slice_in_dim(whole, part, start, 1)  # noqa: E731
    tokens, done = fill_after_eos(put(seq.tokens, jnp.where(b.masked, b.x0, b.tokens)), prompt_len, eos_id,
                                  start + width)
    return Sequence(tokens=tokens, decoded_at=put(seq.decoded_at, b.decoded_at),
                    revisions=put(seq.revisions, b.revisions), done=done, forwards=b.forwards, passes=b.passes)


def _first_sequence(prompt_BP, total: int, mask_id: int) -> Sequence:
    tokens, decoded_at, revisions = start_tokens(prompt_BP, total, mask_id)
    batch = prompt_BP.shape[0]
    return Sequence(tokens, decoded_at, revisions, jnp.zeros(batch, bool), jnp.zeros(batch, jnp.int32), jnp.int32(0))


def _outputs(seq: Sequence, prompt_len: int, end: int, eos_id: int):
    """(tokens, decoded_at, revisions, forwards_B, batch passes): what every program returns."""
    tokens, _ = fill_after_eos(seq.tokens, prompt_len, eos_id, end)
    return tokens, seq.decoded_at, seq.revisions, seq.forwards, seq.passes


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
            mask_all = Dense(block_causal_mask(total, width, end, 0, total))

            def body(carry: tuple[jax.Array, Sequence]) -> tuple[jax.Array, Sequence]:
                block, seq = carry
                start = block * width
                hard = embedding[seq.tokens]

                def forward(block_inputs, aux):
                    inputs = jax.lax.dynamic_update_slice_in_dim(hard, block_inputs.astype(hard.dtype), start, 1)
                    logits, _ = model.forward(inputs, positions, mask_all)
                    return jax.lax.dynamic_slice_in_dim(logits, start, width, 1), aux

                passes = _decode_block(rule, forward, embedding, seq, start, jax.random.fold_in(key, block),
                                       prompt_len, end, cfg, mask_id)
                return block + 1, _finish_block(seq, passes, start, width, prompt_len, eos_id)

            _, seq = jax.lax.while_loop(lambda c: (c[0] < num_blocks) & ~c[1].done.all(), body,
                                        (jnp.int32(first_block), _first_sequence(prompt_BP, total, mask_id)))
            return _outputs(seq, prompt_len, end, eos_id)

        return generate

    return build


def cached(rule: Rule) -> Callable:
    """A program builder with a fixed-size KV cache: passes run on the active block alone, against
    the cached blocks before it. The cache holds K/V of hard tokens only: the hard tokens not yet
    cached (the prompt's full blocks, then each finished block) ride along with the next block's
    first pass, which writes them (DMax's way), so no forward only writes the cache. One compiled
    program per request: the first block (its prefix is the prompt's full blocks) and then a
    `lax.while_loop` over the others (each with the previous block as its prefix), all on device."""

    def build(graphdef, prompt_shape: tuple[int, int], cfg: SamplingConfig, mask_id: int, eos_id: int):
        batch, prompt_len = prompt_shape
        end, total, first_block, num_blocks = layout(prompt_len, cfg)
        width = cfg.block_length

        def decode_block(model, seq: Sequence, block, caches, key, uncached: int):
            """One block; `uncached` hard tokens before it are written to the cache by its first pass."""
            embedding = model.embed.embedding[...]
            start = block * width
            prefix = embedding[jax.lax.dynamic_slice_in_dim(seq.tokens, start - uncached, uncached, 1)]

            def forward(block_inputs, caches):
                inputs = jnp.concatenate([prefix, block_inputs.astype(prefix.dtype)], 1)
                query_start = start - uncached
                positions = jnp.broadcast_to(query_start + jnp.arange(inputs.shape[1]), inputs.shape[:2])
                mask = Dense(block_causal_mask(total, width, end, query_start, inputs.shape[1]))
                logits, kvs = model.forward(inputs, positions, mask, [(k, v, query_start) for k, v in caches])
                return logits[:, uncached:], kvs

            def later(block_inputs, caches):  # passes after the first: the block alone, cache as written
                mask = Dense(block_causal_mask(total, width, end, start, width))
                positions = jnp.broadcast_to(start + jnp.arange(width), block_inputs.shape[:2])
                logits, kvs = model.forward(block_inputs, positions, mask, [(k, v, start) for k, v in caches])
                return logits, caches

            passes = _decode_block(rule, _first_then(forward, later), embedding, seq, start,
                                   jax.random.fold_in(key, block), prompt_len, end, cfg, mask_id,
                                   aux=(jnp.bool_(True), caches))
            return _finish_block(seq, passes, start, width, prompt_len, eos_id), passes.aux[1]

        @jax.jit
        def generate(params, prompt_BP, key):
            model = nnx.merge(graphdef, params)
            shape = (batch, total, kv_heads(model.cfg), head_dim(model.cfg))
            dtype = jnp.dtype(model.cfg.compute_dtype)
            caches = [(jnp.zeros(shape, dtype),) * 2 for _ in range(model.cfg.layers)]
            seq, caches = decode_block(model, _first_sequence(prompt_BP, total, mask_id), jnp.int32(first_block),
                                       caches, key, uncached=first_block * width)  # the prompt's full blocks

            def body(carry):
                block, seq, caches = carry
                return (block + 1, *decode_block(model, seq, block, caches, key, uncached=width))

            _, seq, _ = jax.lax.while_loop(lambda c: (c[0] < num_blocks) & ~c[1].done.all(), body,
                                           (jnp.int32(first_block + 1), seq, caches))
            return _outputs(seq, prompt_len, end, eos_id)

        return generate

    return build


def _first_then(first, later):
    """A forward that runs `first` on the first pass (it writes the cache) and `later` afterwards;
    aux = (is this the first pass, the KV caches)."""

    def forward(block_inputs, aux):
        is_first, caches = aux
        logits, caches = jax.lax.cond(is_first, first, later, block_inputs, caches)
        return logits, (jnp.bool_(False), caches)

    return forward


registry.register(registry.Decoder(
    "one_token", cached(THRESHOLD), attention=registry.BLOCK_CAUSAL, fits=(registry.BLOCK_CAUSAL,),
    one_token=lambda cfg: True, settings=lambda cfg: dataclasses.replace(cfg, threshold=2.0)))  # unreachable: one per pass
registry.register(registry.Decoder(
    "threshold", cached(THRESHOLD), attention=registry.BLOCK_CAUSAL, fits=(registry.BLOCK_CAUSAL,)))
registry.register(registry.Decoder(
    "spd", uncached(SPD), attention=registry.BLOCK_CAUSAL, fits=(registry.BLOCK_CAUSAL,), cached_twin="spd_cached"))
registry.register(registry.Decoder(
    "spd_cached", cached(SPD), attention=registry.BLOCK_CAUSAL, fits=(registry.BLOCK_CAUSAL,)))
