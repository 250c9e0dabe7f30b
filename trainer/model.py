"""A Flax NNX transformer: bidirectional (diffusion), causal (AR baseline) or two-stream (block
diffusion), over packed rows; what a query sees is described by trainer/attention.py, not a mask.

Shapes: B batch, L length, D hidden, H heads, K head size, F SwiGLU width, V vocab.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from trainer import attention

if TYPE_CHECKING:
    from trainer.config import ModelConfig


def rope(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
    half = x_BLHK.shape[-1] // 2
    freqs_K = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BLK = positions_BL[..., None].astype(jnp.float32) * freqs_K
    sin, cos = jnp.sin(angles_BLK)[:, :, None, :], jnp.cos(angles_BLK)[:, :, None, :]
    x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BLHK.dtype)


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.hidden // cfg.heads


def kv_heads(cfg: ModelConfig) -> int:
    return cfg.kv_heads or cfg.heads


# Activation checkpointing of each block (model.remat): what the backward pass keeps from the forward.
REMAT_POLICIES = {
    "none": None,  # keep every activation (fastest, most memory)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmul outputs; recompute attention
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
}


def remat(fn, policy: str):
    """`fn` under the block's activation checkpointing policy."""
    return fn if policy == "none" else jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


class Attention(nnx.Module):
    """Multi-head attention with grouped-query key/value heads and optional QK-norm (Qwen3)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.compute_dtype)
        self.kernel = attention.resolve(cfg.attention, cfg.compute_dtype)
        self.heads, self.kv_heads, self.head_dim, self.theta = cfg.heads, kv_heads(cfg), head_dim(cfg), cfg.rope_theta
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs)  # noqa: E731
        self.q = linear(cfg.hidden, self.heads * self.head_dim)
        self.k = linear(cfg.hidden, self.kv_heads * self.head_dim)
        self.v = linear(cfg.hidden, self.kv_heads * self.head_dim)
        self.o = linear(self.heads * self.head_dim, cfg.hidden)
        norm = lambda: nnx.RMSNorm(self.head_dim, epsilon=cfg.norm_eps, dtype=dtype, rngs=rngs)  # noqa: E731
        self.q_norm, self.k_norm = (norm(), norm()) if cfg.qk_norm else (None, None)

    def __call__(self, x_BLD, positions_BL, spec, cache=None):
        """spec: what each query sees (attention.Dense | Segments | TwoStream).
        cache: (k_BSGK, v_BSGK, offset): this call's keys/values are written at `offset` of fixed-size
        buffers and the queries attend over the whole buffer (S keys; spec is then Dense). G = kv heads."""
        batch, length, _ = x_BLD.shape
        q_BLHK = self.q(x_BLD).reshape(batch, length, self.heads, self.head_dim)
        k_BLGK = self.k(x_BLD).reshape(batch, length, self.kv_heads, self.head_dim)
        v_BLGK = self.v(x_BLD).reshape(batch, length, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BLHK, k_BLGK = self.q_norm(q_BLHK), self.k_norm(k_BLGK)
        q_BLHK, k_BLGK = rope(q_BLHK, positions_BL, self.theta), rope(k_BLGK, positions_BL, self.theta)
        if cache is not None:
            cache_k, cache_v, offset = cache
            k_BLGK = jax.lax.dynamic_update_slice_in_dim(cache_k, k_BLGK.astype(cache_k.dtype), offset, 1)
            v_BLGK = jax.lax.dynamic_update_slice_in_dim(cache_v, v_BLGK.astype(cache_v.dtype), offset, 1)
        out_BLHK = attention.attend(q_BLHK, k_BLGK, v_BLGK, spec, self.kernel)
        return self.o(out_BLHK.reshape(batch, length, self.heads * self.head_dim)), (k_BLGK, v_BLGK)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.compute_dtype)
        self.gate = nnx.Linear(cfg.hidden, cfg.mlp_hidden, use_bias=False, dtype=dtype, rngs=rngs)
        self.up = nnx.Linear(cfg.hidden, cfg.mlp_hidden, use_bias=False, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(cfg.mlp_hidden, cfg.hidden, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x_BLD):
        return self.down(nnx.silu(self.gate(x_BLD)) * self.up(x_BLD))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.compute_dtype)
        self.attn_norm = nnx.RMSNorm(cfg.hidden, epsilon=cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.hidden, epsilon=cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs)

    def __call__(self, x_BLD, positions_BL, spec, cache=None):
        attn_BLD, kv = self.attn(self.attn_norm(x_BLD), positions_BL, spec, cache)
        x_BLD = x_BLD + attn_BLD
        return x_BLD + self.mlp(self.mlp_norm(x_BLD)), kv


TIME_FREQUENCIES = 8  # sin and cos of 2 pi k t, k = 1..8: the time input's features


class EditHeads(nnx.Module):
    """Edit Flows' outputs beside the LM head (which gives the substitution tokens): the rates of
    substituting, deleting and inserting after each row (softplus, in that order), and the tokens to
    insert (a head of its own, started as a copy of the LM head when the model starts from a run).
    `time_input`: the time t also enters, as Fourier features projected onto the embeddings (the
    projection starts at zero, so a model started from a run first computes what that run did)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, time_input: bool = False):
        dtype = jnp.dtype(cfg.compute_dtype)
        self.rates = nnx.Linear(cfg.hidden, 3, dtype=dtype, rngs=rngs)
        self.ins = nnx.Linear(cfg.hidden, cfg.vocab_size, use_bias=False, dtype=dtype, rngs=rngs)
        self.time = nnx.Linear(2 * TIME_FREQUENCIES, cfg.hidden, kernel_init=nnx.initializers.zeros, dtype=dtype,
                               rngs=rngs) if time_input else None

    def time_embedding(self, t_B):
        """[B, D]: what the time adds to every position's embedding."""
        angles_BF = 2 * jnp.pi * t_B[:, None] * jnp.arange(1, TIME_FREQUENCIES + 1)
        return self.time(jnp.concatenate([jnp.sin(angles_BF), jnp.cos(angles_BF)], -1))


class Transformer(nnx.Module):
    """Blocks are a list, or with `scan_layers` one Block whose params carry a leading layer axis
    (`blocks.attn.q.kernel[i]` is layer i's `blocks.i.attn.q.kernel`), run under jax.lax.scan.
    `edit_heads`: Edit Flows' rate and insertion heads too (edit_outputs); `time_input`: and the time.
    An objective's entry names these (its `model_options`)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, edit_heads: bool = False, time_input: bool = False):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.compute_dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden, dtype=dtype, rngs=rngs)
        @nnx.split_rngs(splits=cfg.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        # Every layer is initialised by one traced Block under vmap, in either layout: an initialiser
        # that traced each layer on its own (one random-number program per weight and layer) took
        # XLA minutes to compile for 16 layers. Unrolled blocks are the stacked ones' slices.
        stacked = stacked_blocks(rngs)
        if cfg.scan_layers:
            self.blocks = stacked
        else:
            graphdef, weights = nnx.split(stacked)
            self.blocks = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda x: x[i], weights))
                                    for i in range(cfg.layers)])
        self.final_norm = nnx.RMSNorm(cfg.hidden, epsilon=cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.head = None if cfg.tie_embeddings else nnx.Linear(
            cfg.hidden, cfg.vocab_size, use_bias=False, dtype=dtype, rngs=rngs)
        self.edit = EditHeads(cfg, rngs, time_input) if edit_heads else None

    def __call__(self, tokens_BL, segment_ids_BL, positions_BL, causal: bool = False):
        """Training/scoring path: logits [B, L, V] in float32 over packed rows."""
        logits_BLV, _ = self.forward(self.embed(tokens_BL), positions_BL,
                                     attention.Segments(segment_ids_BL, causal))
        return logits_BLV

    def forward(self, x_BLD, positions_BL, spec, caches=None, logits_for: int | None = None):
        """Embeddings in (hard or soft), (logits [B, L, V] float32, per-layer (k, v) buffers written
        when `caches` are given, else []) out.

        spec: what each query sees (attention.Dense | Segments | TwoStream).
        caches: per layer (k_BSHK, v_BSHK, offset) for decoding against a fixed-size KV cache.
        logits_for: only the first n positions' logits (the noisy stream of a two-stream row).
        """
        x_BLD, kvs = (self._scanned if self.cfg.scan_layers else self._unrolled)(x_BLD, positions_BL, spec, caches)
        return self.lm_logits(self.final_norm(x_BLD[:, :logits_for])), kvs

    def lm_logits(self, h_BLD):
        """The LM head over final-norm features, float32."""
        return (self.embed.attend(h_BLD) if self.head is None else self.head(h_BLD)).astype(jnp.float32)

    def edit_outputs(self, tokens_BL, segment_ids_BL, positions_BL, t_B):
        """Edit Flows' outputs over padded rows (segment 0 = padding) at times t_B (read only with the
        time input), float32: (substitution logits [B, L, V] (the LM head), insertion logits [B, L, V],
        rates [B, L, 3] (sub, del, ins) >= 0)."""
        x_BLD = self.embed(tokens_BL)
        if self.edit.time is not None:
            x_BLD = x_BLD + self.edit.time_embedding(t_B)[:, None, :].astype(x_BLD.dtype)
        x_BLD, _ = (self._scanned if self.cfg.scan_layers else self._unrolled)(
            x_BLD, positions_BL, attention.Segments(segment_ids_BL, False), None)
        h_BLD = self.final_norm(x_BLD)
        rates_BL3 = jax.nn.softplus(self.edit.rates(h_BLD).astype(jnp.float32))
        return self.lm_logits(h_BLD), self.edit.ins(h_BLD).astype(jnp.float32), rates_BL3

    def _unrolled(self, x_BLD, positions_BL, spec, caches):
        kvs = []
        call = lambda b, *args: b(*args)  # noqa: E731
        if self.cfg.remat != "none":
            call = nnx.remat(call, policy=REMAT_POLICIES[self.cfg.remat])
        for i, block in enumerate(self.blocks):
            x_BLD, kv = call(block, x_BLD, positions_BL, spec, None if caches is None else caches[i])
            kvs.append(kv)
        return x_BLD, kvs if caches is not None else []

    def _scanned(self, x_BLD, positions_BL, spec, caches):
        """One traced block for all layers (jax.lax.scan over the stacked params: pure JAX, so it also
        runs inside the decoders' loops); per-layer caches go in and come out stacked on axis 0."""
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x_BLD, params, cache):
            return nnx.merge(graphdef, params)(x_BLD, positions_BL, spec, cache)

        layer = remat(layer, self.cfg.remat)
        if caches is None:
            x_BLD, _ = jax.lax.scan(lambda x, params: (layer(x, params, None)[0], None), x_BLD, stacked)
            return x_BLD, []
        offset = caches[0][2]
        x_BLD, (k_NBSGK, v_NBSGK) = jax.lax.scan(
            lambda x, xs: layer(x, xs[0], (xs[1], xs[2], offset)), x_BLD,
            (stacked, jnp.stack([c[0] for c in caches]), jnp.stack([c[1] for c in caches])))
        return x_BLD, list(zip(k_NBSGK, v_NBSGK))


def _attention_weights(cfg: ModelConfig) -> int:
    d, k = cfg.hidden, head_dim(cfg)
    return 2 * d * cfg.heads * k + 2 * d * kv_heads(cfg) * k  # q and o, k and v


def param_count(cfg: ModelConfig) -> int:
    d, f, v = cfg.hidden, cfg.mlp_hidden, cfg.vocab_size
    per_block = _attention_weights(cfg) + 3 * d * f + 2 * d + (2 * head_dim(cfg) if cfg.qk_norm else 0)
    head = 0 if cfg.tie_embeddings else d * v
    return v * d + cfg.layers * per_block + d + head


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward matmul FLOPs per token (6 per weight, plus attention scores)."""
    matmul_weights = cfg.layers * (_attention_weights(cfg) + 3 * cfg.hidden * cfg.mlp_hidden) + cfg.hidden * cfg.vocab_size
    return 6 * matmul_weights + 12 * cfg.layers * cfg.heads * head_dim(cfg) * seq_len
