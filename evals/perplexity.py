"""The validation perplexity bound (the MDLM or BD3LM NELBO), exact AR perplexity, or (objectives
whose loss is not a bound: Edit Flows) the exponent of the loss per token, deterministically."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import numpy as np
from flax import nnx

from evals import compiled
from evals.config import PerplexityConfig
from trainer import data, objectives
from trainer.config import Config


def time_grid(samples: int, eps: float) -> np.ndarray:
    """A fixed antithetic grid: the midpoints of `samples` equal strata of [0, 1], mapped to [eps, 1]."""
    return eps + (1 - eps) * (np.arange(samples) + 0.5) / samples


# What evaluate reports, one per objective: a bound's exponent, AR's exact perplexity, or a loss's exponent.
FIGURES = ("ppl_bound", "ar_ppl", "loss_ppl")


def figure(ppl: dict[str, Any]) -> tuple[str, float]:
    """(name, value) of the figure an evaluate result holds."""
    return next((name, ppl[name]) for name in FIGURES if name in ppl)


def _compiled_loss(graphdef, mask_id: int, settings: objectives.Settings):
    """The jitted scoring function of one model structure and objective: its eval loss at time t."""
    objective = objectives.get(settings.name)

    @jax.jit
    def batch_loss(params, batch, t, key):
        return objective.eval_loss(nnx.merge(graphdef, params), batch, key, mask_id, settings, t)

    return batch_loss


def evaluate(graphdef, params, run_cfg: Config, manifest: dict[str, Any], cfg: PerplexityConfig) -> dict[str, Any]:
    """Sums NLL over validation rows until `max_tokens` real tokens (0 = all), every row (every
    block, for block diffusion) at every grid time with masks from a fixed seed; returns
    nats/token and its exponent."""
    objective = objectives.get(run_cfg.objective.name)
    mask_id = data.special_ids(manifest)["mask"]
    batch_loss = compiled.once(  # one compilation per run, not per step
        ("perplexity", dataclasses.astuple(run_cfg.model), mask_id, dataclasses.astuple(run_cfg.objective)),
        lambda: _compiled_loss(graphdef, mask_id, run_cfg.objective))

    documents_only = dataclasses.replace(run_cfg, data=dataclasses.replace(run_cfg.data, eos_fill=False))
    rows = data.EVAL_LOADERS[objective.batch](documents_only, manifest, "validation", cfg.batch_size, shuffle=False,
                                              repeat=False)
    grid = [None] if objective.exact else time_grid(cfg.time_samples, run_cfg.objective.eps)
    key = jax.random.key(cfg.seed)
    total_nll, total_count, tokens_seen = 0.0, 0, 0
    for index, batch in enumerate(rows):
        if cfg.max_tokens and tokens_seen >= cfg.max_tokens:
            break
        tokens_seen += int(np.count_nonzero(batch["tokens_segment_ids"]))
        for k, t in enumerate(grid):
            nll, count = batch_loss(params, batch, 0.0 if t is None else float(t),
                                    jax.random.fold_in(key, index * len(grid) + k))
            total_nll += float(nll)
            total_count += int(count)
    nats = total_nll / max(total_count, 1)
    name = "ar_ppl" if objective.exact else "ppl_bound" if objective.bound else "loss_ppl"
    return {"nats_per_token": nats, name: float(np.exp(nats)), "ppl_tokens": tokens_seen,
            "ppl_time_samples": 0 if objective.exact else len(grid)}


def prompt_documents(run_cfg: Config, manifest: dict[str, Any], count: int, length: int) -> list[np.ndarray]:
    """The first `count` validation documents of `length`+ tokens: the prompts' sources."""
    docs = data.documents(run_cfg.data.path, manifest, "validation")
    chosen = [d["tokens"] for d in itertools.islice((d for d in docs if len(d["tokens"]) >= length), count)]
    if len(chosen) < count:
        raise data.DataError(f"the validation split of {run_cfg.data.path} has only {len(chosen)} documents of "
                             f"{length}+ tokens: lower sampling.num_samples or sampling.prompt_tokens")
    return chosen


def prompt_rows(documents: list[np.ndarray], length: int) -> np.ndarray:
    """[len(documents), length]: each document's first `length` tokens."""
    return np.stack([d[:length] for d in documents]).astype(np.int32)


def prompts(run_cfg: Config, manifest: dict[str, Any], count: int, length: int) -> np.ndarray:
    """[count, length]: the first `length` tokens of the first long-enough validation documents."""
    return prompt_rows(prompt_documents(run_cfg, manifest, count, length), length)
