"""Sample quality (generative perplexity under an AR checkpoint, distinct-n diversity) and each
sampler's speed and quality figures."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from evals.decoders.common import Samples, generated_lengths
from trainer.objectives.masking import token_nll


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
    nll = token_nll(model(tokens, segments, positions, causal=True)[:, :-1], tokens[:, 1:])
    index = np.arange(1, tokens.shape[1])
    scored = (index >= prompt_len)[None, :] & (index < prompt_len + lengths_B[:, None])
    return float(np.exp(np.asarray(nll)[scored].mean()))


def sampler_metrics(out: Samples, prompt_len: int, eos_id: int, judge=None) -> dict:
    """Speed and quality of one sampler's output, counted per sequence (as if decoded alone):
    tokens per forward = generated tokens (to the first EOS) / the forwards the sequences needed.
    `judge`: (graphdef, params) of an AR model for generative perplexity."""
    lengths = generated_lengths(out, prompt_len, eos_id)
    generated = [row[prompt_len:prompt_len + n] for row, n in zip(out.tokens, lengths)]
    metrics = {
        "tokens_per_forward": float(lengths.sum() / max(out.forwards.sum(), 1)),
        "forwards_per_sequence": float(out.forwards.mean()),
        "batch_forwards": out.batch_forwards,
        "tokens_per_s": float(lengths.sum() / out.seconds),
        "seconds": round(out.seconds, 4),
        "mean_length": float(lengths.mean()),
        **{f"distinct_{n}": distinct_n(generated, n) for n in (1, 2, 3)},
    }
    if judge is not None:
        metrics["gen_ppl"] = generative_perplexity(*judge, out.tokens, prompt_len, lengths)
    return metrics
