"""Sample quality (generative perplexity under an AR checkpoint, distinct-n diversity) and each
sampler's speed and quality figures, with bootstrap intervals over the prompts."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from evals.decoders.common import Samples, generated_lengths
from trainer.objectives.masking import token_nll

BOOTSTRAP = 1000  # resamples of the prompts for the 90% intervals
INTERVAL = (5, 95)  # percentiles


def distinct_n(sequences: list[np.ndarray], n: int) -> float:
    """Unique n-grams / all n-grams over the samples (1.0 = no repetition)."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def generated_nll(graphdef, params, tokens_BT: np.ndarray, prompt_len: int, lengths_B: np.ndarray) -> np.ndarray:
    """[B] summed NLL of each sample's generated tokens (up to its first EOS) given its prompt,
    under a causal (AR) model."""
    model = nnx.merge(graphdef, params)
    tokens = jnp.asarray(tokens_BT)
    segments = jnp.ones_like(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    nll = np.asarray(token_nll(model(tokens, segments, positions, causal=True)[:, :-1], tokens[:, 1:]))
    index = np.arange(1, tokens.shape[1])
    scored = (index >= prompt_len)[None, :] & (index < prompt_len + lengths_B[:, None])
    return np.where(scored, nll, 0.0).sum(1)


def pooled_interval(numerator_B: np.ndarray, denominator_B: np.ndarray, transform=lambda x: x,
                    seed: int = 0) -> list[float]:
    """90% bootstrap interval over the prompts of transform(sum numerator / sum denominator)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(numerator_B), (BOOTSTRAP, len(numerator_B)))
    values = transform(numerator_B[picks].sum(1) / np.maximum(denominator_B[picks].sum(1), 1))
    return [float(v) for v in np.percentile(values, INTERVAL)]


def sampler_metrics(out: Samples, prompt_len: int, eos_id: int, judge=None) -> dict:
    """Speed and quality of one sampler's output, counted per sequence (as if decoded alone):
    tokens per forward = generated tokens (to the first EOS) / the forwards the sequences needed,
    each with a bootstrap interval over the prompts. `judge`: (graphdef, params) of an AR model
    for generative perplexity."""
    lengths = generated_lengths(out, prompt_len, eos_id)
    generated = [row[prompt_len:prompt_len + n] for row, n in zip(out.tokens, lengths)]
    metrics = {
        "tokens_per_forward": float(lengths.sum() / max(out.forwards.sum(), 1)),
        "tokens_per_forward_interval": pooled_interval(lengths, out.forwards),
        "forwards_per_sequence": float(out.forwards.mean()),
        "batch_forwards": out.batch_forwards,
        "tokens_per_s": float(lengths.sum() / out.seconds),
        "seconds": round(out.seconds, 4),
        "mean_length": float(lengths.mean()),
        "sequences": len(lengths),
        **{f"distinct_{n}": distinct_n(generated, n) for n in (1, 2, 3)},
    }
    if judge is not None:
        nll = generated_nll(*judge, out.tokens, prompt_len, lengths)
        metrics["gen_ppl"] = float(np.exp(nll.sum() / lengths.sum()))
        metrics["gen_ppl_interval"] = pooled_interval(nll, lengths, np.exp)
    return metrics
