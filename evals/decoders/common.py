"""What every decoder shares: its output, the token choice, EOS handling, per-sequence cost
accounting, and timing.

Cost is counted per sequence, as if each were decoded alone (DMax evaluates with batch 1): a
batch decodes in lockstep, but a sequence is charged only the forwards in which it still had
work, and forwards that only write the KV cache are charged too.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from evals.config import SamplingConfig


class Samples(NamedTuple):
    tokens: np.ndarray  # [B, P + G]: prompt then generation, EOS-filled after the first EOS
    decoded_at: np.ndarray  # [B, P + G]: decoding pass (1-based) that first decoded each position; 0 = prompt
    revisions: np.ndarray  # [B, P + G]: times a decoded position took a new token afterwards
    forwards: np.ndarray  # [B]: forwards each sequence needed (decoding passes + KV-cache writes)
    batch_forwards: int  # forwards the batch ran in lockstep
    seconds: float


def logits_and_choice(logits_BKV, key, cfg: SamplingConfig, mask_id: int):
    """(probabilities, x0 = greedy or Gumbel-max choice, its confidence p[x0])."""
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


def fill_after_eos(tokens_BT, prompt_len: int, eos_id: int, upto: int | jax.Array):
    """EOS after the first generated EOS (within [prompt_len, upto)); returns (tokens, done_B)."""
    index = jnp.arange(tokens_BT.shape[1])
    generated = (index >= prompt_len) & (index < upto)
    is_eos = (tokens_BT == eos_id) & generated
    first = jnp.min(jnp.where(is_eos, index, tokens_BT.shape[1]), axis=1)
    return jnp.where(index > first[:, None], eos_id, tokens_BT), is_eos.any(1)


def start_tokens(prompt_BP, total: int, mask_id: int):
    """(prompt followed by masks up to `total`, zero decoded_at, zero revisions)."""
    batch, prompt_len = prompt_BP.shape
    tokens = jnp.concatenate([prompt_BP, jnp.full((batch, total - prompt_len), mask_id, prompt_BP.dtype)], 1)
    zeros = jnp.zeros_like(tokens)
    return tokens, zeros, zeros


def run(generate, params, prompt_BP: np.ndarray, key, cfg: SamplingConfig, warm_up: bool = True) -> Samples:
    """Runs the program; with `warm_up` it runs once to compile (first use) or warm up and times a
    second run, else the one run's seconds include any compilation (jobs that only want tokens).

    `generate(params, prompt, key)` returns (tokens, decoded_at, revisions, forwards_B, batch_forwards)."""
    prompt = jnp.asarray(prompt_BP)
    if warm_up:
        jax.block_until_ready(generate(params, prompt, key))
    start = time.perf_counter()
    tokens, decoded_at, revisions, forwards, batch_forwards = jax.block_until_ready(generate(params, prompt, key))
    seconds = time.perf_counter() - start
    end = prompt_BP.shape[1] + cfg.gen_length
    return Samples(np.asarray(tokens)[:, :end], np.asarray(decoded_at)[:, :end], np.asarray(revisions)[:, :end],
                   np.asarray(forwards), int(batch_forwards), seconds)


def generated_lengths(samples: Samples, prompt_len: int, eos_id: int) -> np.ndarray:
    """Generated tokens per sample, up to and including the first EOS."""
    generated = samples.tokens[:, prompt_len:]
    is_eos = generated == eos_id
    return np.where(is_eos.any(1), is_eos.argmax(1) + 1, generated.shape[1])
