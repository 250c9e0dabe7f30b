"""The samplers by name, and which ones fit a model's training objective.

A block-diffusion model (bd3lm, oput) was trained block-causally: it decodes block by block with
block-causal attention (SPD, threshold, one-token). A bidirectional MDLM model decodes with full
attention (remasking, threshold_full). Decoding a model with the other kind of attention than it
was trained with is allowed when asked for, and reported as mismatched. SPD revises its drafts
only on models trained to predict every position (OPUT); a SUBS model (MDLM, BD3LM: loss on masked
positions only) carries a decoded token over, as its parameterisation defines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from evals import block_causal, decoding, full_attention
from evals.config import SamplingConfig
from trainer.config import BLOCK_DIFFUSION, Config, ConfigError

BLOCK_CAUSAL, FULL = "block_causal", "full"
REVISING = ("oput",)  # objectives whose loss covers every position, not only the masked ones


class Sampler(NamedTuple):
    build: Callable  # a program builder (see decoding.program)
    attention: str  # BLOCK_CAUSAL | FULL
    one_token: bool  # commits exactly one token per forward: the quality reference


SAMPLERS = {
    "spd": Sampler(block_causal.uncached(block_causal.SPD), BLOCK_CAUSAL, False),
    "spd_cached": Sampler(block_causal.cached(block_causal.SPD), BLOCK_CAUSAL, False),
    "threshold": Sampler(block_causal.cached(block_causal.THRESHOLD), BLOCK_CAUSAL, False),
    "one_token": Sampler(block_causal.cached(block_causal.THRESHOLD), BLOCK_CAUSAL, True),
    "remask": Sampler(full_attention.program(full_attention.remask_commit), FULL, False),
    "threshold_full": Sampler(full_attention.program(full_attention.threshold_commit), FULL, False),
}
MATCHED = {
    BLOCK_CAUSAL: ("one_token", "threshold", "spd", "spd_cached"),
    FULL: ("remask", "threshold_full"),
}


def attention_of(objective: str) -> str:
    """The attention a model trained with `objective` decodes with."""
    return BLOCK_CAUSAL if objective in BLOCK_DIFFUSION else FULL


def matched(objective: str) -> tuple[str, ...]:
    return MATCHED[attention_of(objective)]


def parse(spec: str) -> tuple[str, float | None]:
    """A sampler spec: its name, or `name@threshold` for one of several threshold settings."""
    name, _, threshold = spec.partition("@")
    return name, float(threshold) if threshold else None


def sampler_of(spec: str) -> Sampler:
    return SAMPLERS[parse(spec)[0]]


def is_matched(spec: str, objective: str) -> bool:
    return sampler_of(spec).attention == attention_of(objective)


def is_one_token(spec: str, cfg: SamplingConfig) -> bool:
    """Whether the sampler commits exactly one token per forward: the quality reference."""
    name = parse(spec)[0]
    return SAMPLERS[name].one_token or (name == "remask" and cfg.remask_steps in (0, cfg.gen_length))


def generate(spec: str, graphdef, params, prompt_BP: np.ndarray, cfg: SamplingConfig, mask_id: int, eos_id: int,
             key: jax.Array) -> decoding.Samples:
    """Decodes `gen_length` tokens after each prompt with the sampler `name` or `name@threshold`
    (compiled once per model structure and settings)."""
    name, threshold = parse(spec)
    sampler = SAMPLERS[name]
    if threshold is not None:
        cfg = dataclasses.replace(cfg, threshold=threshold)
    if sampler.one_token:
        cfg = dataclasses.replace(cfg, threshold=2.0)  # unreachable: the most confident token only
    build = decoding.program(sampler.build, graphdef, params, prompt_BP.shape, cfg, mask_id, eos_id)
    return decoding.timed(build, params, prompt_BP, key, cfg)


def plan(names: str, cfg: SamplingConfig, run_cfg: Config) -> tuple[list[str], SamplingConfig]:
    """(sampler specs, settings with the block size resolved) for a run; ConfigError on a bad choice.

    `names` is comma-separated specs (`name` or `name@threshold`, e.g. `spd_cached@0.5`) or "auto"
    (the samplers matched to the run's objective). The generation stays within the length the
    model was trained on (data.seq_len)."""
    objective = run_cfg.objective.name
    if objective == "ar":  # AR runs are scored by their exact perplexity only
        return [], cfg
    chosen = list(matched(objective)) if names == "auto" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if not _valid(n)]
    if unknown or not chosen:
        raise ConfigError(f"samplers {names!r}: unknown {unknown or 'empty list'} (known: {', '.join(SAMPLERS)}, "
                          f"each optionally @threshold, or auto)")
    if not cfg.block_length:
        cfg = dataclasses.replace(cfg, block_length=run_cfg.objective.block_size if objective in BLOCK_DIFFUSION
                                  else 32)
    if cfg.revise == "auto":  # only a model trained to predict every position (OPUT) revises its drafts
        cfg = dataclasses.replace(cfg, revise="yes" if objective in REVISING else "no")
    trained = run_cfg.data.seq_len
    if cfg.prompt_tokens + cfg.gen_length > trained:
        raise ConfigError(f"sampling.prompt_tokens + sampling.gen_length = {cfg.prompt_tokens + cfg.gen_length} "
                          f"exceeds the {trained} positions the model was trained on (data.seq_len)")
    if any(sampler_of(n).attention == FULL for n in chosen):
        blocks = cfg.gen_length // cfg.block_length
        if cfg.gen_length % cfg.block_length:
            raise ConfigError(f"sampling.gen_length {cfg.gen_length} must be a multiple of sampling.block_length "
                              f"{cfg.block_length} for the full-attention samplers")
        if cfg.remask_steps % blocks:
            raise ConfigError(f"sampling.remask_steps must be 0 or a multiple of the number of blocks ({blocks})")
    return chosen, cfg


def _valid(spec: str) -> bool:
    try:
        name, threshold = parse(spec)
    except ValueError:
        return False
    return name in SAMPLERS and (threshold is None or threshold > 0)
