"""generate_until for the harness model: the decoder, the lengths, and where a generation stops.

The decoder (decoders.resolve) is the one `python -m evals` treats as the quality reference among
those that fit the run's objective (one token per forward: one_token for block diffusion, remask
for MDLM, dream for Dream, causal for AR), unless `sampler` names another. Requests are grouped by prompt length and decoded
`batch_size` prompts at a time (a short group is filled up with copies of its first prompt), so a
program compiles once per prompt length. Each generation is `max_gen_toks` tokens at most (whole
blocks for full-attention decoders, cut back afterwards), ends at the first EOS, and is cut at
the first stop string; prompt + generation fit the run's data.seq_len, longer prompts keep their
last tokens. Shapes: B batch, P prompt, G generation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from evals import decoders
from evals.config import SamplingConfig
from evals.harness.checkpoint import Checkpoint
from trainer.errors import ConfigError

log = logging.getLogger(__name__)


class Request(NamedTuple):
    prompt: list[int]  # token ids, prefix included
    max_tokens: int  # tokens generated at most
    temperature: float  # 0 = greedy


def lengths(prompt_len: int, max_tokens: int, row_len: int, block: int) -> tuple[int, int]:
    """(prompt tokens kept, generation length): `max_tokens` rounded up to whole `block`s, both within
    `row_len` (the generation first, as lm_eval's models do; at least one prompt token stays)."""
    gen_length = min(-(-max_tokens // block) * block, (row_len - 1) // block * block)
    if gen_length < 1:
        raise ConfigError(f"blocks of {block} tokens leave no room to generate within the run's {row_len} positions: "
                          f"set a smaller sampling.block_length")
    return min(prompt_len, row_len - gen_length), gen_length


def until_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    return text[:min((text.find(s) for s in until if s and s in text), default=len(text))]


def generate(checkpoint: Checkpoint, spec: str, sampling: SamplingConfig, batch_size: int, seed: int,
             requests: list[Request]) -> list[np.ndarray]:
    """The generated token ids of each request, up to (not including) its first EOS."""
    run_cfg, ids = checkpoint.run_cfg, checkpoint.ids
    spec = decoders.resolve(spec, run_cfg.objective.name, sampling)
    full = decoders.get(spec).attention == decoders.registry.FULL
    block = decoders.registry.block_length(sampling, run_cfg) if full else 1
    groups: dict[tuple[int, int, float], list[int]] = {}
    for i, r in enumerate(requests):
        kept, gen_length = lengths(len(r.prompt), r.max_tokens, run_cfg.data.seq_len, block)
        groups.setdefault((kept, gen_length, r.temperature), []).append(i)
    truncated = sum(len(requests[i].prompt) > kept for (kept, _, _), members in groups.items() for i in members)
    if truncated:
        log.warning("%d of %d prompts were cut to their last tokens to fit the run's %d positions (data.seq_len)",
                    truncated, len(requests), run_cfg.data.seq_len)
    out: list[np.ndarray] = [np.zeros(0, np.int32)] * len(requests)
    key = jax.random.key(seed)
    for (kept, gen_length, temperature), members in sorted(groups.items()):
        cfg = dataclasses.replace(sampling, prompt_tokens=kept, gen_length=gen_length, temperature=temperature)
        _, cfg = decoders.plan(spec, cfg, run_cfg)
        prompts_NP = np.stack([requests[i].prompt[-kept:] for i in members]).astype(np.int32)
        for start in range(0, len(members), batch_size):
            chunk_BP = prompts_NP[start:start + batch_size]
            prompt_BP = np.concatenate([chunk_BP, np.repeat(chunk_BP[:1], batch_size - len(chunk_BP), 0)])
            program, _ = decoders.program(spec, checkpoint.graphdef, checkpoint.params, prompt_BP.shape, cfg,
                                          ids["mask"], ids["eos"])
            tokens_BT = np.asarray(program(checkpoint.params, prompt_BP, jax.random.fold_in(key, members[start]))[0])
            for i, generated in zip(members[start:start + batch_size], tokens_BT[:, kept:]):
                generated = generated[:requests[i].max_tokens]
                eos = np.flatnonzero(generated == ids["eos"])
                out[i] = generated[:eos[0]] if len(eos) else generated
    return out
