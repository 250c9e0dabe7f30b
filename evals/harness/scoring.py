"""Scoring continuations given their contexts, as lm-evaluation-harness loglikelihood requests ask.

Exact objectives (AR): the log-likelihood of the continuation's tokens under the causal model, and
whether each is the model's greedy choice. Other objectives (diffusion): the objective's own
variational bound restricted to the continuation (`token_loss` with `scored` = the continuation:
only its tokens are masked and scored, the context stays clean; block diffusion conditions each
block on the clean blocks before it), at K stratified noise levels (the midpoints of
evals.perplexity.time_grid) with masks from a fixed seed; the estimate is the mean over the levels,
its standard error their spread / sqrt(K). The bound is an upper bound on the NLL, so the returned
log-likelihood is a lower bound.

A request is one token sequence (prefix, context, continuation) of at most a row; requests are
packed several per row (best-fit decreasing, trainer/packing.py; segment ids keep them apart) into
batches of one fixed shape, so each program compiles once per run.
Shapes: R requests, N rows, B rows per batch, L row length, K noise levels, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainer import packing
from trainer.objectives import masking


class Estimate(NamedTuple):
    loglikelihood_R: np.ndarray  # per request: exact, or minus the bound's estimate
    greedy_R: np.ndarray  # every continuation token is the model's greedy choice (exact objectives only)
    stderr_R: np.ndarray  # standard error of the estimate across noise levels (0 when exact)


def pack(sequences: list[np.ndarray], scored: list[np.ndarray], row_len: int, batch_rows: int) -> dict[str, np.ndarray]:
    """Requests (each at most `row_len` tokens, `scored` marking its continuation) -> rows [N, L] of
    tokens, tokens_segment_ids, tokens_positions, scored and request (its index; -1 = padding), N a
    multiple of `batch_rows` (padding rows hold no request)."""
    rows = packing.pack(sequences, row_len)  # placement depends on lengths only: the packs below align
    rows["scored"] = packing.pack([s.astype(np.int32) for s in scored], row_len)["tokens"].astype(bool)
    rows["request"] = packing.pack([np.full(len(s), i + 1) for i, s in enumerate(sequences)], row_len)["tokens"] - 1
    missing = -len(rows["tokens"]) % batch_rows
    return {k: np.concatenate([v, np.full((missing, row_len), -1 if k == "request" else 0, v.dtype)])
            for k, v in rows.items()}


def batches(rows: dict[str, np.ndarray], batch_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The model's inputs, `batch_rows` rows at a time."""
    for start in range(0, len(rows["tokens"]), batch_rows):
        yield {k: v[start:start + batch_rows] for k, v in rows.items() if k != "request"}


def per_request(values_NL: np.ndarray, rows: dict[str, np.ndarray], count: int) -> np.ndarray:
    """`values` ([N, L], or [K, N, L]) summed over each request's scored positions: [R] (or [K, R])."""
    where_NL = rows["scored"] & (rows["request"] >= 0)
    index_P, values_P = rows["request"][where_NL], values_NL[..., where_NL]
    sums = [np.bincount(index_P, weights=v, minlength=count) for v in values_P.reshape(-1, values_P.shape[-1])]
    return np.stack(sums).reshape(*values_P.shape[:-1], count)


def exact_program(graphdef):
    """(params, batch) -> (nll_BL, not_greedy_BL) of each position's token given the positions before it
    (causal attention; position 0 of a row is never scored: every request starts with a prefix)."""

    @jax.jit
    def score(params, batch):
        tokens_BL = batch["tokens"]
        logits_BLV = nnx.merge(graphdef, params)(tokens_BL, batch["tokens_segment_ids"], batch["tokens_positions"],
                                                 True)[:, :-1]
        nll_BL = masking.token_nll(logits_BLV, tokens_BL[:, 1:])
        missed_BL = jnp.argmax(logits_BLV, -1) != tokens_BL[:, 1:]
        return jnp.pad(nll_BL, ((0, 0), (1, 0))), jnp.pad(missed_BL, ((0, 0), (1, 0)))

    return score


def bound_program(graphdef, objective, mask_id: int, settings):
    """(params, batch, t_K, keys_K) -> loss_KBL: the objective's per-position bound at each level."""

    @jax.jit
    def score(params, batch, t_K, keys_K):
        model = nnx.merge(graphdef, params)
        return jax.lax.map(lambda tk: objective.token_loss(model, batch, tk[1], mask_id, settings, tk[0]),
                           (t_K, keys_K))

    return score


def exact(program, params, rows: dict[str, np.ndarray], batch_rows: int, count: int) -> Estimate:
    outputs = [jax.device_get(program(params, batch)) for batch in batches(rows, batch_rows)]
    nll_NL = np.concatenate([nll for nll, _ in outputs])
    missed_NL = np.concatenate([missed for _, missed in outputs]).astype(np.float64)
    return Estimate(-per_request(nll_NL, rows, count), per_request(missed_NL, rows, count) == 0, np.zeros(count))


def bound(program, params, rows: dict[str, np.ndarray], batch_rows: int, count: int, grid_K: np.ndarray,
          seed: int) -> Estimate:
    """The bound at every level of `grid_K` (K >= 2); batch b, level k draws its masks from
    fold_in(key(seed), b K + k), as evals.perplexity does."""
    levels, key = len(grid_K), jax.random.key(seed)
    t_K = jnp.asarray(grid_K, jnp.float32)
    loss_KNL = np.concatenate([
        jax.device_get(program(params, batch, t_K, jax.vmap(lambda i: jax.random.fold_in(key, i))(
            b * levels + jnp.arange(levels))))
        for b, batch in enumerate(batches(rows, batch_rows))], axis=1)
    loss_KR = per_request(loss_KNL, rows, count)
    return Estimate(-loss_KR.mean(axis=0), np.zeros(count, bool), loss_KR.std(axis=0, ddof=1) / np.sqrt(levels))
