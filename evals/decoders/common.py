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


class Choice(NamedTuple):
    """What a decoder reads of one forward's logits; V-wide work is done once, in `choose`."""
    logits: jax.Array  # [..., V] with the mask suppressed when asked
    log_z: jax.Array  # [...] log of the softmax normaliser
    x0: jax.Array  # [...] int32: the greedy or Gumbel-max token
    conf: jax.Array  # [...] p[x0]
    p_max: jax.Array  # [...] the largest probability
    argmax: jax.Array  # [...] int32: the most probable token (x0 when greedy)


def first_argmax(x, top):
    """The lowest index of `top` (= x.max(-1, keepdims=True)) along the last axis: `jnp.argmax`'s
    answer, from two vectorised reductions (XLA:CPU's variadic argmax reduction took 3x as long
    on [32, 16, 4096] logits)."""
    index = jnp.arange(x.shape[-1], dtype=jnp.float32)  # exact up to 2**24 tokens
    return jnp.min(jnp.where(x == top, index, jnp.inf), -1).astype(jnp.int32)


def choose(logits_BKV, key, cfg: SamplingConfig, mask_id: int) -> Choice:
    """The token choice (greedy, or Gumbel-max at a temperature) and its probabilities, without
    materialising the softmax."""
    if cfg.suppress_mask:
        logits_BKV = logits_BKV.at[..., mask_id].set(-jnp.inf)
    top = jnp.max(logits_BKV, -1, keepdims=True)
    sum_exp = jnp.sum(jnp.exp(logits_BKV - top), -1)
    argmax = first_argmax(logits_BKV, top)
    p_max = 1.0 / sum_exp  # exp(top - top) / sum_exp
    log_z = top[..., 0] + jnp.log(sum_exp)
    if cfg.temperature > 0:
        noisy = logits_BKV / cfg.temperature + jax.random.gumbel(key, logits_BKV.shape)
        x0 = first_argmax(noisy, jnp.max(noisy, -1, keepdims=True))
        conf = jnp.exp(jnp.take_along_axis(logits_BKV, x0[..., None], -1)[..., 0] - log_z)
    else:
        x0, conf = argmax, p_max
    return Choice(logits_BKV, log_z, x0, conf, p_max, argmax)


def top_k_probs(choice: Choice, k: int):
    """(the k largest probabilities [..., k], their tokens [..., k]), most probable first."""
    if k == 1:
        return choice.p_max[..., None], choice.argmax[..., None]
    values, ids = jax.lax.top_k(choice.logits, k)
    return jnp.exp(values - choice.log_z[..., None]), ids


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
