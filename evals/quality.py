"""Sample quality: generative perplexity under an AR checkpoint, and distinct-n diversity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def distinct_n(sequences: list[np.ndarray], n: int) -> float:
    """Unique n-grams / all n-grams over the samples (1.0 = no repetition)."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def generative_perplexity(graphdef, params, tokens_BT: np.ndarray, prompt_len: int,
                          lengths_B: np.ndarray) -> float:
    """exp(mean NLL) of the generated tokens (up to each sample's first EOS) given the prompt,
    under a causal (AR) model."""
    model = nnx.merge(graphdef, params)
    tokens = jnp.asarray(tokens_BT)
    segments = jnp.ones_like(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits = model(tokens, segments, positions, causal=True)[:, :-1]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
    index = np.arange(1, tokens.shape[1])
    scored = (index >= prompt_len)[None, :] & (index < prompt_len + lengths_B[:, None])
    return float(np.exp(np.asarray(nll)[scored].mean()))
