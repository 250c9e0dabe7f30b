"""The decoder registry: each entry says which attention it decodes with, which models it fits,
whether another program gives the same tokens (its cached twin) and when it is the one-token
quality reference. Which decoders fit a run, and whether a chosen one is mismatched, come from
the entries and the run's objective entry (trainer/objectives), never from names.

A block-diffusion model (trained block-causally) decodes block by block with block-causal
attention; a bidirectional MDLM model with full attention; an AR model token by token (causal).
Decoding a model with another attention than it was trained with is allowed when asked for, and
reported as mismatched.
SPD revises its drafts only on models whose loss covers every position (the objective entry's
`revises`, OPUT); a SUBS model (MDLM, BD3LM) carries a decoded token over, as trained.

Adding a decoder: a program builder `build(graphdef, prompt_shape, cfg, mask_id, eos_id)` whose
`generate(params, prompt_BP, key)` returns (tokens, decoded_at, revisions, forwards_B, batch
passes), and one `register(Decoder(...))` line (see block_causal.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from evals import compiled
from evals.config import SamplingConfig
from evals.decoders import common
from trainer import objectives
from trainer.config import Config
from trainer.errors import ConfigError
from trainer.objectives.registry import BIDIRECTIONAL, BLOCK_CAUSAL, CAUSAL  # noqa: F401  (the attentions decoders fit)
from trainer.registry import Registry

FULL = "full"  # a decoder's attention: every position sees every other (BLOCK_CAUSAL: blocks see earlier ones)


@dataclasses.dataclass(frozen=True)
class Decoder:
    name: str
    build: Callable  # the program builder (module docstring)
    attention: str  # the attention it decodes with: BLOCK_CAUSAL | FULL | CAUSAL
    fits: tuple[str, ...]  # the training attentions (an objective entry's `attention`) of the models it fits
    cached_twin: str | None = None  # a decoder that gives the same tokens with another program (spd -> spd_cached)
    # Reads position i's token from position i-1's logits: it fits exactly the objectives with `shift` (Dream).
    shifted: bool = False
    # Reads Edit Flows' rate and insertion heads: it fits exactly the objectives with `edit_heads`.
    edit_heads: bool = False
    one_token: Callable[[SamplingConfig], bool] = lambda cfg: False  # commits one token per forward: the reference
    # Full-attention decoders: a program builder like `build` whose `generate(params, canvas_BT, key)` fills
    # the masks of a canvas anywhere, the other tokens fixed (evals.generate --infill); None: cannot infill.
    infill: Callable | None = None
    settings: Callable[[SamplingConfig], SamplingConfig] = lambda cfg: cfg  # what it fixes in the settings
    # Chosen by samplers=auto. The causal decoder is not: an AR run is scored by its exact perplexity and
    # judges the others' samples; it samples when named (and in the harness's generate_until).
    auto: bool = True


REGISTRY: Registry[Decoder] = Registry("decoder", "samplers")
register, names = REGISTRY.register, REGISTRY.names


def parse(spec: str) -> tuple[str, float | None]:
    """A decoder spec: its name, or `name@threshold` for one of several threshold settings."""
    name, _, threshold = spec.partition("@")
    return name, float(threshold) if threshold else None


def get(spec: str) -> Decoder:
    return REGISTRY.get(parse(spec)[0])


def fitting(objective_name: str) -> tuple[str, ...]:
    """The decoders that fit a model trained with this objective, in registration order."""
    return tuple(name for name in REGISTRY.entries if is_matched(name, objective_name))


def is_matched(spec: str, objective_name: str) -> bool:
    return objectives.get(objective_name).attention in get(spec).fits and reads_as_trained(spec, objective_name)


def reads_as_trained(spec: str, objective_name: str) -> bool:
    """Whether the decoder reads the model's outputs as the objective trained them (logits shifted or
    not; Edit Flows' heads or the LM head's masks): decoding otherwise reads every token from the
    wrong place, so it is refused, not reported."""
    objective, decoder = objectives.get(objective_name), get(spec)
    return (objective.shift, objective.edit_heads) == (decoder.shifted, decoder.edit_heads)


def trained_as(objective) -> str:
    """How an objective's model is read, in words (for refusals)."""
    if objective.edit_heads:
        return "with Edit Flows' heads"
    return "with Dream's shift" if objective.shift else "with its LM head alone (no Dream's shift, no Edit Flows' heads)"


def is_one_token(spec: str, cfg: SamplingConfig) -> bool:
    """Whether the decoder commits exactly one token per forward: the quality reference."""
    return get(spec).one_token(cfg)


def program(spec: str, graphdef, params, prompt_shape: tuple[int, int], cfg: SamplingConfig, mask_id: int,
            eos_id: int) -> tuple[Callable, SamplingConfig]:
    """(the compiled `generate(params, prompt_BP, key)` of the decoder `name` or `name@threshold`, the
    settings it runs with): compiled once per model structure, prompt shape and settings."""
    name, threshold = parse(spec)
    decoder = REGISTRY.get(name)
    if threshold is not None:
        cfg = dataclasses.replace(cfg, threshold=threshold)
    cfg = decoder.settings(cfg)
    # The model's config and its parameter tree: heads beyond the config (Edit Flows' time input) count.
    structure = (dataclasses.astuple(nnx.merge(graphdef, params).cfg), jax.tree.structure(params))
    return compiled.once(("decoder", name, structure, prompt_shape, dataclasses.astuple(cfg), mask_id, eos_id),
                         lambda: decoder.build(graphdef, prompt_shape, cfg, mask_id, eos_id)), cfg


def generate(spec: str, graphdef, params, prompt_BP: np.ndarray, cfg: SamplingConfig, mask_id: int, eos_id: int,
             key: jax.Array, timed: bool = True) -> common.Samples:
    """Decodes `gen_length` tokens after each prompt with the decoder `name` or `name@threshold`.
    `timed`: run twice and time the second run (evals); else decode once (jobs that only want the
    tokens)."""
    generate_program, cfg = program(spec, graphdef, params, prompt_BP.shape, cfg, mask_id, eos_id)
    return common.run(generate_program, params, prompt_BP, key, cfg, warm_up=timed)


def plan(specs: str, cfg: SamplingConfig, run_cfg: Config) -> tuple[list[str], SamplingConfig]:
    """(decoder specs, settings with the block size and revision resolved) for a run; ConfigError on
    a bad choice.

    `specs` is comma-separated specs (`name` or `name@threshold`, e.g. `spd_cached@0.5`) or "auto"
    (the decoders that fit the run's objective and are offered to auto: none for AR, which is scored
    by its exact perplexity). The generation stays within the length the model was trained
    on (data.seq_len)."""
    objective = objectives.get(run_cfg.objective.name)
    if specs == "auto":
        chosen = [n for n in fitting(objective.name) if REGISTRY.entries[n].auto]
    else:
        chosen = [n.strip() for n in specs.split(",") if n.strip()]
    if specs == "auto" and not chosen:
        return [], cfg
    unknown = [n for n in chosen if not is_valid(n)]
    if unknown or not chosen:
        raise ConfigError(f"samplers {specs!r}: unknown {unknown or 'empty list'} (known: {', '.join(names())}, "
                          f"each optionally @threshold, or auto)")
    misread = [n for n in chosen if not reads_as_trained(n, objective.name)]
    if misread:
        raise ConfigError(f"samplers {', '.join(misread)} cannot decode a model trained {trained_as(objective)} "
                          f"(objective {objective.name}): use one of {', '.join(fitting(objective.name))}")
    if not cfg.block_length:
        cfg = dataclasses.replace(cfg, block_length=block_length(cfg, run_cfg))
    if cfg.revise == "auto":  # only a model trained to predict every position (OPUT) revises its drafts
        cfg = dataclasses.replace(cfg, revise="yes" if objective.revises else "no")
    if objective.edit_heads:  # Edit Flows' rates are read under the schedule and prior the model trained with
        o = run_cfg.objective
        cfg = dataclasses.replace(
            cfg, edit_kappa=o.kappa if cfg.edit_kappa == "auto" else cfg.edit_kappa,
            edit_max_w=cfg.edit_max_w or o.max_w,
            edit_masks=(o.prior_masks if o.prior == "masks" else 0) if cfg.edit_masks < 0 else cfg.edit_masks)
        if cfg.edit_masks > cfg.gen_length:
            raise ConfigError(f"sampling.edit_masks {cfg.edit_masks} exceeds sampling.gen_length {cfg.gen_length}: "
                              f"the decoder's buffer starts with the prompt and that many masks")
    trained = run_cfg.data.seq_len
    if cfg.prompt_tokens + cfg.gen_length > trained:
        raise ConfigError(f"sampling.prompt_tokens + sampling.gen_length = {cfg.prompt_tokens + cfg.gen_length} "
                          f"exceeds the {trained} positions the model was trained on (data.seq_len)")
    if any(get(n).attention == FULL and not get(n).edit_heads for n in chosen):
        blocks = cfg.gen_length // cfg.block_length
        if cfg.gen_length % cfg.block_length:
            raise ConfigError(f"sampling.gen_length {cfg.gen_length} must be a multiple of sampling.block_length "
                              f"{cfg.block_length} for the full-attention samplers")
        if cfg.remask_steps % blocks:
            raise ConfigError(f"sampling.remask_steps must be 0 or a multiple of the number of blocks ({blocks})")
    return chosen, cfg


def block_length(cfg: SamplingConfig, run_cfg: Config) -> int:
    """The decoding block: sampling.block_length, else the run's objective's block size, else 32."""
    return cfg.block_length or objectives.get(run_cfg.objective.name).block_size(run_cfg.objective) or 32


def is_valid(spec: str) -> bool:
    """Whether `spec` names a registered decoder, with a positive threshold if any."""
    try:
        name, threshold = parse(spec)
    except ValueError:
        return False
    return name in REGISTRY.entries and (threshold is None or threshold > 0)


def resolve(spec: str, objective_name: str, cfg: SamplingConfig) -> str:
    """`spec`, or the quality reference among the decoders that fit the objective (else the first)."""
    if spec and not is_valid(spec):
        raise ConfigError(f"sampler {spec!r} is not a registered decoder (known: {', '.join(names())}, "
                          f"each optionally @threshold)")
    if spec and not reads_as_trained(spec, objective_name):
        raise ConfigError(f"sampler {spec!r} cannot decode a model trained "
                          f"{trained_as(objectives.get(objective_name))} (objective {objective_name}): use one of "
                          f"{', '.join(fitting(objective_name))}")
    if spec:
        return spec
    fits = fitting(objective_name)
    if not fits:
        raise ConfigError(f"no registered decoder fits objective {objective_name}: name one with sampler=")
    return next((name for name in fits if is_one_token(name, cfg)), fits[0])
