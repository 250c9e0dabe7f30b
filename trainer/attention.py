"""Attention without dense masks where the structure allows it, and the kernel each platform runs.

What a query may see is described, not materialised: `Segments` (packed documents, bidirectional
or causal), `TwoStream` (block diffusion's [noisy | clean] rows) and, for the decoders' small
block masks, `Dense`. `attend` runs a description with one kernel:
- xla: any platform. Segments become an [B, 1, L, L] boolean mask; a two-stream row is computed
  in its structure (`two_stream`), never as a [2L, 2L] score matrix.
- cudnn: cuDNN's fused attention through `jax.nn.dot_product_attention` (NVIDIA GPUs, bfloat16):
  segments go in as a mask (cuDNN turns it into a bias); two-stream rows take the xla path.
- splash: Pallas splash attention (TPU): segment ids and a causal or full mask, blocks of keys a
  query cannot see are skipped; two-stream rows and dense masks take the xla path.
`model.attention: auto` picks cudnn on NVIDIA GPUs in bfloat16, splash on TPUs, xla elsewhere.

Shapes: B batch, L query length, S key length, H query heads, G key/value heads, K head size,
N block-diffusion block, T tiles of N queries.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from trainer.errors import ConfigError

KERNELS = ("auto", "xla", "cudnn", "splash")


# Descriptions are pytrees whose arrays are traced and whose flags are static (they pass through
# jit, scan and remat as arguments).


@struct.dataclass
class Dense:
    """An explicit [B or 1, 1, L, S] boolean mask (the decoders' block masks against a KV cache)."""
    mask_B1LS: jax.Array


@struct.dataclass
class Segments:
    """Packed rows: a query sees the keys of its own document (segment id; 0 = padding, which sees
    only padding), all of them or (causal) those at or before it. Queries and keys are the same row."""
    segment_ids_BL: jax.Array
    causal: bool = struct.field(pytree_node=False)


@struct.dataclass
class TwoStream:
    """A block-diffusion row [noisy | clean] of 2L positions: blocks of `block` tokens at each
    document's own positions (position // block). A noisy query sees its own noisy block and the
    clean earlier blocks of its document; a clean query sees the clean blocks of its document up to
    its own. Segment ids and positions are those of one stream (the other repeats them)."""
    segment_ids_BL: jax.Array
    positions_BL: jax.Array
    block: int = struct.field(pytree_node=False)


def resolve(kernel: str, compute_dtype: str) -> str:
    """The kernel `auto` stands for on this platform; an explicit kernel the platform lacks is
    refused in one line, never swapped for another."""
    platform = jax.default_backend()
    if kernel == "auto":
        if platform == "gpu" and compute_dtype == "bfloat16":
            return "cudnn"
        return "splash" if platform == "tpu" else "xla"
    if kernel == "cudnn" and platform != "gpu":
        raise ConfigError(f"model.attention=cudnn needs an NVIDIA GPU; this platform is {platform}: "
                          "use model.attention=auto or xla")
    if kernel == "splash" and platform != "tpu":
        raise ConfigError(f"model.attention=splash needs a TPU; this platform is {platform}: "
                          "use model.attention=auto or xla")
    return kernel


def segment_mask(segment_ids_BL: jax.Array, causal: bool) -> jax.Array:
    """[B, 1, L, L] bool: a query sees keys of its own packed document (and earlier ones if causal)."""
    same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    if causal:
        length = segment_ids_BL.shape[1]
        same_BLL &= jnp.tril(jnp.ones((length, length), bool))
    return same_BLL[:, None]


def attend(q_BLHK, k_BSGK, v_BSGK, spec: Dense | Segments | TwoStream, kernel: str) -> jax.Array:
    """Attention output [B, L, H, K] of `spec` with `kernel` (a resolved name, not auto)."""
    if isinstance(spec, TwoStream):
        return two_stream(q_BLHK, k_BSGK, v_BSGK, spec)
    if isinstance(spec, Segments) and kernel == "splash":
        return splash(q_BLHK, k_BSGK, v_BSGK, spec, interpret=jax.default_backend() != "tpu")
    mask = spec.mask_B1LS if isinstance(spec, Dense) else segment_mask(spec.segment_ids_BL, spec.causal)
    implementation = "cudnn" if kernel == "cudnn" else "xla"
    return jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, mask=mask, implementation=implementation)


def _grouped(x_BLHK, groups: int):
    """[B, L, H, K] -> [B, L, G, H / G, K]: the query heads that share a key/value head."""
    b, l, h, k = x_BLHK.shape
    return x_BLHK.reshape(b, l, groups, h // groups, k)


def two_stream(q_BLHK, k_BLGK, v_BLGK, spec: TwoStream) -> jax.Array:
    """Block-diffusion attention over [noisy | clean] (L = 2 x the stream length) in its structure.

    Clean queries: block-causal attention over the clean keys (a stream-sized mask). Noisy queries:
    one softmax over the clean keys of earlier blocks and the noisy keys of their own block. A
    document's block is a contiguous run of at most `block` positions, so a noisy query's own block
    lies within the tile of `block` queries it belongs to and its two neighbours: noisy-to-noisy
    scores are [tiles, block, 3 x block], not [L, L]. Score FLOPs: 2 stream^2 + 3 stream x block
    per head instead of (2 stream)^2. Padding (segment 0) is grouped by tile, not by position."""
    batch, length2, heads, size = q_BLHK.shape
    length, groups, n = length2 // 2, k_BLGK.shape[2], spec.block
    scale = size ** -0.5
    segments, positions = spec.segment_ids_BL, spec.positions_BL
    # A block's identity: (document, block of its positions); padding tokens group by tile.
    block_id = jnp.where(segments != 0, positions // n, jnp.arange(length) // n)
    q = _grouped(q_BLHK * jnp.asarray(scale, q_BLHK.dtype), groups)  # [B, 2L, G, R, K]
    q_noisy, q_clean = q[:, :length], q[:, length:]
    k_noisy, k_clean = k_BLGK[:, :length], k_BLGK[:, length:]
    v_noisy, v_clean = v_BLGK[:, :length], v_BLGK[:, length:]
    same_doc = segments[:, :, None] == segments[:, None, :]  # [B, L(query), L(key)]
    key_block, query_block = block_id[:, None, :], block_id[:, :, None]

    def scores(q_BLGRK, k_BSGK):
        return jnp.einsum("blgrk,bsgk->bgrls", q_BLGRK, k_BSGK, preferred_element_type=jnp.float32)

    def weighted(p_BGRLS, v_BSGK):
        return jnp.einsum("bgrls,bsgk->blgrk", p_BGRLS.astype(v_BSGK.dtype), v_BSGK)

    neg = jnp.finfo(jnp.float32).min
    # Clean stream: block-causal over clean keys.
    clean_scores = jnp.where((same_doc & (key_block <= query_block))[:, None, None], scores(q_clean, k_clean), neg)
    clean_out = weighted(jax.nn.softmax(clean_scores, axis=-1), v_clean)

    # Noisy stream, part 1: clean keys of earlier blocks of the same document.
    to_clean = jnp.where((same_doc & (key_block < query_block))[:, None, None], scores(q_noisy, k_clean), neg)
    # Part 2: noisy keys of the own block, within the query's tile and its two neighbours.
    tiles = -(-length // n)
    pad = tiles * n - length
    window_k = _windows(k_noisy, n, pad)  # [B, T, 3N, G, K]
    window_v = _windows(v_noisy, n, pad)
    window_doc = _windows(segments, n, pad, fill=-1)  # [B, T, 3N]
    window_block = _windows(block_id, n, pad, fill=-1)
    tiled = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(  # noqa: E731
        batch, tiles, n, *x.shape[2:])
    q_tiles = tiled(q_noisy)  # [B, T, N, G, R, K]
    own = ((tiled(segments)[:, :, :, None] == window_doc[:, :, None, :])
           & (tiled(block_id)[:, :, :, None] == window_block[:, :, None, :]))  # [B, T, N, 3N]
    to_noisy = jnp.einsum("btngrk,btsgk->bgrtns", q_tiles, window_k, preferred_element_type=jnp.float32)
    to_noisy = jnp.where(own[:, None, None], to_noisy, neg)
    # One softmax over both parts, per query.
    to_clean_t = jnp.pad(to_clean, [(0, 0)] * 3 + [(0, pad), (0, 0)], constant_values=neg).reshape(
        batch, groups, -1, tiles, n, length)
    probs = jax.nn.softmax(jnp.concatenate([to_clean_t, to_noisy], axis=-1), axis=-1)
    p_clean, p_noisy = probs[..., :length], probs[..., length:]
    noisy_out = (jnp.einsum("bgrtns,bsgk->btngrk", p_clean.astype(v_clean.dtype), v_clean)
                 + jnp.einsum("bgrtns,btsgk->btngrk", p_noisy.astype(v_noisy.dtype), window_v))
    noisy_out = noisy_out.reshape(batch, tiles * n, groups, -1, size)[:, :length]
    out = jnp.concatenate([noisy_out, clean_out], axis=1)
    return out.reshape(batch, length2, heads, size)


def _windows(x_BL, n: int, pad: int, fill=0):
    """[B, L, ...] -> [B, T, 3N, ...]: for tile t, positions (t-1)N .. (t+2)N (out of range: `fill`)."""
    widths = [(0, 0), (n, pad + n)] + [(0, 0)] * (x_BL.ndim - 2)
    padded = jnp.pad(x_BL, widths, constant_values=fill)
    batch, tiles = x_BL.shape[0], (x_BL.shape[1] + pad) // n
    tiled = padded.reshape(batch, tiles + 2, n, *x_BL.shape[2:])
    return jnp.concatenate([tiled[:, :-2], tiled[:, 1:-1], tiled[:, 2:]], axis=2)


def splash_block(length: int) -> int | None:
    """Splash's tile size for a sequence length: the largest of 512/256/128 that divides it, the
    length itself below 128, else None (splash cannot tile it)."""
    return next((b for b in (512, 256, 128) if length % b == 0), length if length < 128 else None)


@functools.cache
def _splash_kernel(length: int, heads: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    block = splash_block(length)
    shape = (length, length)
    mask = sa.MultiHeadMask([sa.CausalMask(shape) if causal else sa.FullMask(shape)] * heads)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash(q_BLHK, k_BLGK, v_BLGK, spec: Segments, interpret: bool = False) -> jax.Array:
    """Pallas splash attention with segment ids (TPU; `interpret` runs it anywhere, slowly: tests)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    batch, length, heads, size = q_BLHK.shape
    repeat = heads // k_BLGK.shape[2]
    kernel = _splash_kernel(length, heads, spec.causal, interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, L, H, K] -> [B, H, L, K]
    q = heads_first(q_BLHK * jnp.asarray(size ** -0.5, q_BLHK.dtype))
    k, v = (heads_first(jnp.repeat(x, repeat, axis=2)) for x in (k_BLGK, v_BLGK))
    segments = spec.segment_ids_BL.astype(jnp.int32)
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(s1, s1)))(q, k, v, segments)
    return heads_first(out)


def two_stream_reference_mask(spec: TwoStream) -> np.ndarray | jax.Array:
    """The dense [B, 1, 2L, 2L] mask `two_stream` computes in its structure (for tests and the
    FLOP comparison only: it is what the structured path never builds)."""
    segments = jnp.concatenate([spec.segment_ids_BL] * 2, axis=1)
    block_id = jnp.concatenate([spec.positions_BL] * 2, axis=1) // spec.block
    length = spec.positions_BL.shape[1]
    noisy = jnp.arange(2 * length) < length
    q_noisy, k_noisy = noisy[:, None], noisy[None, :]
    q_block, k_block = block_id[:, :, None], block_id[:, None, :]
    same_stream_block = (q_noisy == k_noisy) & (q_block == k_block)
    noisy_to_clean_past = q_noisy & ~k_noisy & (q_block > k_block)
    clean_causal = ~q_noisy & ~k_noisy & (q_block >= k_block)
    same_document = segments[:, :, None] == segments[:, None, :]
    return ((same_stream_block | noisy_to_clean_past | clean_causal) & same_document)[:, None]
