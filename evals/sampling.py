"""Samplers for masked diffusion LMs: SPD (DMax's soft parallel decoding) and LLaDA's remasking.

SPD comes in two implementations with identical outputs at equal settings:
- `spd_generate`: one compiled, fixed-shape program (`lax.while_loop` over blocks and
  passes); every pass runs the whole sequence under block-causal attention.
- `spd_generate_cached`: the prompt's full blocks and each finished block are written to
  a fixed-size KV cache (from hard tokens only), and passes run on the active block alone.
Shapes: B batch, P prompt, T total (a multiple of the block), K block, V vocab, D hidden.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from evals.config import SamplingConfig
from trainer.model import head_dim, kv_heads


class Samples(NamedTuple):
    tokens: np.ndarray  # [B, P + G]: prompt then generation, EOS-filled after the first EOS
    decoded_at: np.ndarray  # [B, P + G]: forward (1-based) that first decoded each position; 0 = prompt
    revisions: np.ndarray  # [B, P + G]: times a decoded position took a new token afterwards
    nfe: int  # decoding forwards of the batch
    cache_forwards: int  # extra forwards that wrote the KV cache (cached SPD only)
    seconds: float


def _logits_and_choice(logits_BKV, key, cfg: SamplingConfig, mask_id: int):
    if cfg.suppress_mask:
        logits_BKV = logits_BKV.at[..., mask_id].set(-jnp.inf)
    probs_BKV = jax.nn.softmax(logits_BKV, axis=-1)
    if cfg.temperature > 0:
        noisy = logits_BKV / cfg.temperature + jax.random.gumbel(key, logits_BKV.shape)
        x0_BK = jnp.argmax(noisy, axis=-1)
    else:
        x0_BK = jnp.argmax(logits_BKV, axis=-1)
    conf_BK = jnp.take_along_axis(probs_BKV, x0_BK[..., None], -1)[..., 0]
    return probs_BKV, x0_BK.astype(jnp.int32), conf_BK


class _Pass(NamedTuple):
    tokens: jax.Array  # [B, K]
    masked: jax.Array  # [B, K]
    newly: jax.Array  # [B, K] decoded in this pass
    revised: jax.Array  # [B, K] decoded earlier and changed in this pass
    stop: jax.Array  # [B] the block is finished for this sequence
    x0: jax.Array  # [B, K]
    topk_p: jax.Array  # [B, K, k]
    topk_ids: jax.Array  # [B, K, k]


def spd_pass(logits_BKV, key, tokens_BK, masked_BK, in_a_BK, active_B, cfg: SamplingConfig,
             mask_id: int) -> _Pass:
    """One SPD pass over the active block (pure; shared by both implementations)."""
    probs, x0, conf = _logits_and_choice(logits_BKV, key, cfg, mask_id)
    width = tokens_BK.shape[1]
    index = jnp.arange(width)
    # Still-masked positions decode leftmost first while confident; at least one per pass.
    first_unsure = jnp.min(jnp.where(masked_BK & (conf < cfg.threshold), index, width), axis=1)
    newly = masked_BK & (index < first_unsure[:, None])
    leftmost = jnp.argmax(masked_BK, axis=1)
    none = ~newly.any(1) & masked_BK.any(1)
    newly = (newly | (none[:, None] & (index == leftmost[:, None]))) & active_B[:, None]
    decoded_before = in_a_BK & ~masked_BK & active_B[:, None]
    tokens = jnp.where(newly | decoded_before, x0, tokens_BK)  # drafts stay revisable
    masked = masked_BK & ~newly
    changed = (tokens != tokens_BK).any(1)
    confident = jnp.where(in_a_BK, probs.max(-1) >= cfg.confidence_stop, True).all(1)
    stop = ((~changed | confident) & ~masked.any(1)) | ~active_B
    topk_p, topk_ids = jax.lax.top_k(probs, cfg.top_k)
    revised = decoded_before & (x0 != tokens_BK)
    return _Pass(tokens, masked, newly, revised, stop, x0, topk_p, topk_ids)


def soft_inputs(embedding_VD, tokens_BK, masked_BK, in_a_BK, topk_p, topk_ids, mask_id: int):
    """Decoded positions of the block: the top-k mix of embeddings plus the leftover probability
    times the mask embedding, rescaled to the mix's expected norm; others: their hard embedding."""
    hard = embedding_VD[tokens_BK]
    mask_vec = embedding_VD[mask_id]
    leftover = jnp.maximum(0.0, 1.0 - topk_p.sum(-1))
    vectors = embedding_VD[topk_ids]  # [B, K, k, D]
    mixed = (topk_p[..., None] * vectors).sum(-2) + leftover[..., None] * mask_vec
    target_norm = (topk_p * jnp.linalg.norm(vectors, axis=-1)).sum(-1) + leftover * jnp.linalg.norm(mask_vec)
    soft = mixed * (target_norm / jnp.maximum(jnp.linalg.norm(mixed, axis=-1), 1e-6))[..., None]
    return jnp.where((in_a_BK & ~masked_BK)[..., None], soft, hard)


def fill_after_eos(tokens_BT, prompt_len: int, eos_id: int, upto: int | jax.Array):
    """EOS after the first generated EOS (within [prompt_len, upto)); returns (tokens, done_B)."""
    index = jnp.arange(tokens_BT.shape[1])
    generated = (index >= prompt_len) & (index < upto)
    is_eos = (tokens_BT == eos_id) & generated
    first = jnp.min(jnp.where(is_eos, index, tokens_BT.shape[1]), axis=1)
    return jnp.where(index > first[:, None], eos_id, tokens_BT), is_eos.any(1)


def _layout(prompt_len: int, cfg: SamplingConfig) -> tuple[int, int, int]:
    """(total length T, first generating block, number of blocks) with blocks at absolute positions."""
    width = cfg.block_length
    total = -(-(prompt_len + cfg.gen_length) // width) * width
    return total, prompt_len // width, total // width


def _block_causal(total: int, width: int, query_start, query_len: int):
    """[1, 1, query_len, total]: a query sees keys of its own and earlier blocks."""
    q_block = (query_start + jnp.arange(query_len)) // width
    k_block = jnp.arange(total) // width
    return (k_block[None, :] <= q_block[:, None])[None, None]


def _block_state(tokens_BT, start, width: int, prompt_len: int, mask_id: int):
    block = jax.lax.dynamic_slice_in_dim(tokens_BT, start, width, 1)
    in_a = (start + jnp.arange(width) >= prompt_len)[None, :] & jnp.ones_like(block, bool)
    return block, in_a, in_a & (block == mask_id)


def _finish_block(tokens_BT, decoded_at, revisions, state, start, width, prompt_len, eos_id):
    """Leftover masks take the last prediction; hard tokens go in; EOS fills the rest."""
    block_tokens, masked, x0, block_decoded, block_revised = state
    block_tokens = jnp.where(masked, x0, block_tokens)
    tokens_BT = jax.lax.dynamic_update_slice_in_dim(tokens_BT, block_tokens, start, 1)
    decoded_at = jax.lax.dynamic_update_slice_in_dim(decoded_at, block_decoded, start, 1)
    revisions = jax.lax.dynamic_update_slice_in_dim(revisions, block_revised, start, 1)
    tokens_BT, done = fill_after_eos(tokens_BT, prompt_len, eos_id, start + width)
    return tokens_BT, decoded_at, revisions, done


def _decode_block(forward, embedding_VD, tokens_BT, start, key, active_B, nfe, prompt_len, cfg, mask_id):
    """All passes of one block; `forward(inputs_BKD or None)` returns the block's logits [B, K, V]."""
    width = cfg.block_length
    block, in_a, masked = _block_state(tokens_BT, start, width, prompt_len, mask_id)
    zeros = jnp.zeros_like(block)
    carry0 = (jnp.int32(0), block, masked, embedding_VD[block], ~active_B, zeros, zeros, zeros, nfe)

    def cond(carry):
        step, stop = carry[0], carry[4]
        return (step < cfg.steps) & ~stop.all()

    def body(carry):
        step, tokens, masked, inputs, stop, _x0, decoded, revised, nfe = carry
        result = spd_pass(forward(inputs), jax.random.fold_in(key, step), tokens, masked, in_a, ~stop,
                          cfg, mask_id)
        decoded = jnp.where(result.newly, nfe + 1, decoded)
        revised = revised + result.revised.astype(revised.dtype)
        inputs = soft_inputs(embedding_VD, result.tokens, result.masked, in_a, result.topk_p,
                             result.topk_ids, mask_id)
        return (step + 1, result.tokens, result.masked, inputs, stop | result.stop, result.x0, decoded,
                revised, nfe + 1)

    _, tokens, masked, _, _, x0, decoded, revised, nfe = jax.lax.while_loop(cond, body, carry0)
    return (tokens, masked, x0, decoded, revised), nfe


def _init(prompt_BP, total: int, mask_id: int):
    batch, prompt_len = prompt_BP.shape
    tokens = jnp.concatenate([prompt_BP, jnp.full((batch, total - prompt_len), mask_id, prompt_BP.dtype)], 1)
    zeros = jnp.zeros_like(tokens)
    return tokens, zeros, zeros


_PROGRAMS: dict[tuple, Callable] = {}


def _program(build: Callable, graphdef, params, prompt_BP: np.ndarray, cfg: SamplingConfig, mask_id: int,
             eos_id: int) -> Callable:
    """`build(graphdef, prompt shape, cfg, mask_id, eos_id)`, made once per model structure and
    settings: jit caches per function object, so rebuilding per checkpoint recompiled every time.
    The model config fixes the graphdef (which itself is unhashable)."""
    structure = dataclasses.astuple(nnx.merge(graphdef, params).cfg)
    key = (build.__name__, structure, prompt_BP.shape, dataclasses.astuple(cfg), mask_id, eos_id)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = build(graphdef, prompt_BP.shape, cfg, mask_id, eos_id)
    return _PROGRAMS[key]


def spd_generate(graphdef, params, prompt_BP: np.ndarray, cfg: SamplingConfig, mask_id: int, eos_id: int,
                 key: jax.Array) -> Samples:
    generate = _program(_spd_program, graphdef, params, prompt_BP, cfg, mask_id, eos_id)
    return _timed(generate, params, jnp.asarray(prompt_BP), key, prompt_BP.shape[1], cfg)


def _spd_program(graphdef, prompt_shape: tuple[int, int], cfg: SamplingConfig, mask_id: int, eos_id: int):
    prompt_len = prompt_shape[1]
    total, first_block, num_blocks = _layout(prompt_len, cfg)
    width = cfg.block_length

    @jax.jit
    def generate(params, prompt_BP, key):
        model = nnx.merge(graphdef, params)
        embedding = model.embed.embedding[...]
        positions = jnp.broadcast_to(jnp.arange(total), (prompt_BP.shape[0], total))
        mask_all = _block_causal(total, width, 0, total)
        tokens, decoded_at, revisions = _init(prompt_BP, total, mask_id)

        def cond(carry):
            block, _t, _d, _r, done, _nfe = carry
            return (block < num_blocks) & ~done.all()

        def body(carry):
            block, tokens, decoded_at, revisions, done, nfe = carry
            start = block * width
            hard = embedding[tokens]

            def forward(block_inputs):
                inputs = jax.lax.dynamic_update_slice_in_dim(hard, block_inputs.astype(hard.dtype), start, 1)
                logits, _ = model.forward(inputs, positions, mask_all)
                return jax.lax.dynamic_slice_in_dim(logits, start, width, 1)

            state, nfe = _decode_block(forward, embedding, tokens, start, jax.random.fold_in(key, block),
                                       ~done, nfe, prompt_len, cfg, mask_id)
            tokens, decoded_at, revisions, done = _finish_block(
                tokens, decoded_at, revisions, state, start, width, prompt_len, eos_id)
            return block + 1, tokens, decoded_at, revisions, done, nfe

        carry = (jnp.int32(first_block), tokens, decoded_at, revisions, jnp.zeros(prompt_BP.shape[0], bool),
                 jnp.int32(0))
        _, tokens, decoded_at, revisions, _, nfe = jax.lax.while_loop(cond, body, carry)
        tokens, _ = fill_after_eos(tokens, prompt_len, eos_id, total)
        return tokens, decoded_at, revisions, nfe, 0

    return generate


def spd_generate_cached(graphdef, params, prompt_BP: np.ndarray, cfg: SamplingConfig, mask_id: int,
                        eos_id: int, key: jax.Array) -> Samples:
    generate = _program(_spd_cached_program, graphdef, params, prompt_BP, cfg, mask_id, eos_id)
    return _timed(generate, params, jnp.asarray(prompt_BP), key, prompt_BP.shape[1], cfg)


def _spd_cached_program(graphdef, prompt_shape: tuple[int, int], cfg: SamplingConfig, mask_id: int, eos_id: int):
    batch, prompt_len = prompt_shape
    total, first_block, num_blocks = _layout(prompt_len, cfg)
    width = cfg.block_length

    def attend(model, inputs_BKD, start, caches):
        positions = jnp.broadcast_to(start + jnp.arange(inputs_BKD.shape[1]), inputs_BKD.shape[:2])
        mask = _block_causal(total, width, start, inputs_BKD.shape[1])
        return model.forward(inputs_BKD, positions, mask, [(k, v, start) for k, v in caches])

    @jax.jit
    def write_cache(params, tokens_BK, start, caches):
        """K/V of hard tokens at `start` written into the cache (the only way the cache changes)."""
        model = nnx.merge(graphdef, params)
        _, kvs = attend(model, model.embed.embedding[...][tokens_BK], start, caches)
        return kvs

    @jax.jit
    def decode_block(params, tokens, decoded_at, revisions, done, nfe, block, caches, key):
        model = nnx.merge(graphdef, params)
        embedding = model.embed.embedding[...]
        start = block * width

        def forward(block_inputs):
            logits, _ = attend(model, block_inputs, start, caches)
            return logits

        state, nfe = _decode_block(forward, embedding, tokens, start, jax.random.fold_in(key, block), ~done,
                                   nfe, prompt_len, cfg, mask_id)
        tokens, decoded_at, revisions, done = _finish_block(
            tokens, decoded_at, revisions, state, start, width, prompt_len, eos_id)
        return tokens, decoded_at, revisions, done, nfe

    def generate(params, prompt_BP, key):
        model = nnx.merge(graphdef, params)
        shape = (batch, total, kv_heads(model.cfg), head_dim(model.cfg))
        dtype = jnp.dtype(model.cfg.compute_dtype)
        caches = [(jnp.zeros(shape, dtype),) * 2 for _ in range(model.cfg.layers)]
        tokens, decoded_at, revisions = _init(prompt_BP, total, mask_id)
        forwards = 0
        for block in range(first_block):  # the prompt's full blocks
            start = block * width
            caches = write_cache(params, tokens[:, start:start + width], jnp.int32(start), caches)
            forwards += 1
        done, nfe = jnp.zeros(batch, bool), jnp.int32(0)
        for block in range(first_block, num_blocks):
            tokens, decoded_at, revisions, done, nfe = decode_block(
                params, tokens, decoded_at, revisions, done, nfe, jnp.int32(block), caches, key)
            if bool(done.all()):
                break
            start = block * width
            caches = write_cache(params, tokens[:, start:start + width], jnp.int32(start), caches)
            forwards += 1
        tokens, _ = fill_after_eos(tokens, prompt_len, eos_id, total)
        return tokens, decoded_at, revisions, nfe, forwards

    return generate


def remask_generate(graphdef, params, prompt_BP: np.ndarray, cfg: SamplingConfig, mask_id: int, eos_id: int,
                    key: jax.Array) -> Samples:
    """LLaDA's low-confidence remasking: semi-AR blocks, full bidirectional attention, a fixed
    number of tokens committed per step (the block's masks spread evenly over its steps)."""
    generate = _program(_remask_program, graphdef, params, prompt_BP, cfg, mask_id, eos_id)
    return _timed(generate, params, jnp.asarray(prompt_BP), key, prompt_BP.shape[1], cfg)


def _remask_program(graphdef, prompt_shape: tuple[int, int], cfg: SamplingConfig, mask_id: int, eos_id: int):
    prompt_len = prompt_shape[1]
    width, num_blocks = cfg.block_length, cfg.gen_length // cfg.block_length
    steps = cfg.remask_steps or cfg.gen_length
    per_block = steps // num_blocks
    total = prompt_len + cfg.gen_length

    @jax.jit
    def generate(params, prompt_BP, key):
        model = nnx.merge(graphdef, params)
        embedding = model.embed.embedding[...]
        batch = prompt_BP.shape[0]
        positions = jnp.broadcast_to(jnp.arange(total), (batch, total))
        full = jnp.ones((1, 1, total, total), bool)
        tokens, decoded_at, revisions = _init(prompt_BP, total, mask_id)
        index = jnp.arange(total)

        def cond(carry):
            step, _t, _d, done = carry
            return (step < steps) & ~done.all()

        def body(carry):
            step, tokens, decoded_at, done = carry
            block, j = step // per_block, step % per_block
            start = prompt_len + block * width
            count = width // per_block + (j < width % per_block).astype(jnp.int32)
            logits, _ = model.forward(embedding[tokens], positions, full)
            _, x0, conf = _logits_and_choice(logits, jax.random.fold_in(key, step), cfg, mask_id)
            candidate = (tokens == mask_id) & (index >= start) & (index < start + width) & ~done[:, None]
            score = jnp.where(candidate, conf, -jnp.inf)
            rank = jnp.argsort(jnp.argsort(-score, axis=1), axis=1)
            chosen = candidate & (rank < count)
            tokens = jnp.where(chosen, x0, tokens)
            decoded_at = jnp.where(chosen, step + 1, decoded_at)
            block_end = j == per_block - 1
            filled, ended = fill_after_eos(tokens, prompt_len, eos_id, start + width)
            tokens = jnp.where(block_end, filled, tokens)
            return step + 1, tokens, decoded_at, done | (block_end & ended)

        carry = (jnp.int32(0), tokens, decoded_at, jnp.zeros(batch, bool))
        nfe, tokens, decoded_at, _ = jax.lax.while_loop(cond, body, carry)
        tokens, _ = fill_after_eos(tokens, prompt_len, eos_id, total)
        return tokens, decoded_at, revisions, nfe, 0

    return generate


def _timed(generate, params, prompt_BP, key, prompt_len, cfg) -> Samples:
    """Runs once to compile (first use of the program) or warm up, then times a second run."""
    jax.block_until_ready(generate(params, prompt_BP, key))
    start = time.perf_counter()
    tokens, decoded_at, revisions, nfe, cache_forwards = jax.block_until_ready(generate(params, prompt_BP, key))
    seconds = time.perf_counter() - start
    end = prompt_len + cfg.gen_length
    return Samples(np.asarray(tokens)[:, :end], np.asarray(decoded_at)[:, :end], np.asarray(revisions)[:, :end],
                   int(nfe), int(cache_forwards), seconds)


def generated_lengths(samples: Samples, prompt_len: int, eos_id: int) -> np.ndarray:
    """Generated tokens per sample, up to and including the first EOS."""
    generated = samples.tokens[:, prompt_len:]
    is_eos = generated == eos_id
    first = np.where(is_eos.any(1), is_eos.argmax(1) + 1, generated.shape[1])
    return first
