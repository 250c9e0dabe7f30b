"""A Flax NNX transformer: bidirectional (diffusion) or causal (AR baseline), segment-masked.

Shapes: B batch, L length, D hidden, H heads, K head size, F SwiGLU width, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from trainer.config import ModelConfig


def rope(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
    half = x_BLHK.shape[-1] // 2
    freqs_K = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BLK = positions_BL[..., None].astype(jnp.float32) * freqs_K
    sin, cos = jnp.sin(angles_BLK)[:, :, None, :], jnp.cos(angles_BLK)[:, :, None, :]
    x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BLHK.dtype)


def attention_mask(segment_ids_BL: jax.Array, causal: bool) -> jax.Array:
    """[B, 1, L, L] bool: a query sees keys of its own packed document (and earlier ones if causal).

    Padding (segment 0) sees only padding, so no row is empty; real tokens never see it.
    """
    same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    if causal:
        length = segment_ids_BL.shape[1]
        same_BLL &= jnp.tril(jnp.ones((length, length), bool))
    return same_BLL[:, None]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.compute_dtype)
        self.heads, self.theta = cfg.heads, cfg.rope_theta
        self.qkv = nnx.Linear(cfg.hidden, 3 * cfg.hidden, use_bias=False, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(cfg.hidden, cfg.hidden, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x_BLD, positions_BL, mask_B1LL):
        batch, length, hidden = x_BLD.shape
        qkv = self.qkv(x_BLD).reshape(batch, length, 3, self.heads, hidden // self.heads)
        q_BLHK, k_BLHK, v_BLHK = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q_BLHK, k_BLHK = rope(q_BLHK, positions_BL, self.theta), rope(k_BLHK, positions_BL, self.theta)
        out_BLHK = jax.nn.dot_product_attention(q_BLHK, k_BLHK, v_BLHK, mask=mask_B1LL)
        return self.out(out_BLHK.reshape(batch, length, hidden))


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
        self.attn_norm = nnx.RMSNorm(cfg.hidden, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.hidden, dtype=dtype, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs)

    def __call__(self, x_BLD, positions_BL, mask_B1LL):
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), positions_BL, mask_B1LL)
        return x_BLD + self.mlp(self.mlp_norm(x_BLD))


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.compute_dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
        self.final_norm = nnx.RMSNorm(cfg.hidden, dtype=dtype, rngs=rngs)
        self.head = None if cfg.tie_embeddings else nnx.Linear(
            cfg.hidden, cfg.vocab_size, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, tokens_BL, segment_ids_BL, positions_BL, causal: bool = False):
        """Logits [B, L, V] in float32."""
        mask_B1LL = attention_mask(segment_ids_BL, causal)
        x_BLD = self.embed(tokens_BL)
        for block in self.blocks:
            if self.cfg.remat:
                x_BLD = nnx.remat(lambda b, *a: b(*a))(block, x_BLD, positions_BL, mask_B1LL)
            else:
                x_BLD = block(x_BLD, positions_BL, mask_B1LL)
        x_BLD = self.final_norm(x_BLD)
        logits_BLV = self.embed.attend(x_BLD) if self.head is None else self.head(x_BLD)
        return logits_BLV.astype(jnp.float32)


def param_count(cfg: ModelConfig) -> int:
    d, f, v = cfg.hidden, cfg.mlp_hidden, cfg.vocab_size
    per_block = 4 * d * d + 3 * d * f + 2 * d
    head = 0 if cfg.tie_embeddings else d * v
    return v * d + cfg.layers * per_block + d + head


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward matmul FLOPs per token (6 per weight, plus attention scores)."""
    d = cfg.hidden
    matmul_weights = cfg.layers * (4 * d * d + 3 * d * cfg.mlp_hidden) + d * cfg.vocab_size
    return 6 * matmul_weights + 12 * cfg.layers * d * seq_len
