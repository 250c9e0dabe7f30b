"""The lm-evaluation-harness model `diffusion-lm-jax`: any checkpoint of this stack (MDLM, BD3LM,
OPUT, AR) answering lm_eval's three request types.

    python -m evals.harness --model diffusion-lm-jax --model_args run_dir=RUN[,step=N,samples=K,...]

- loglikelihood: exact for AR runs; for diffusion runs the objective's bound of the continuation
  given its context at `samples` stratified noise levels (scoring.py), its mean and standard
  error; `is_greedy` is computed for exact objectives only (False otherwise).
- loglikelihood_rolling: the text in disjoint windows of the run's data.seq_len, each conditioned
  on the window before it (lm_eval's rolling windows), summed.
- generate_until: generation.py.
Text is tokenized with the run's tokenizer.json; every request starts with BOS (EOS when the
tokenizer has none), like the documents the model was trained on. model_args (`ModelArgs`) are
typed like `python -m evals` keys (`sampling.threshold=0.7`); lm_eval's own --batch_size and
--device do not apply (batch_size is a model_arg; JAX places the model).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from evals import compiled, decoders, perplexity
from evals.config import HarnessSettings, SamplingConfig
from evals.harness import checkpoint, generation, scoring
from evals.harness.checkpoint import Checkpoint
from trainer import objectives
from trainer.config import check, load_into
from trainer.errors import ConfigError, MismatchError

log = logging.getLogger(__name__)
NAME = "diffusion-lm-jax"


@dataclasses.dataclass
class ModelArgs(HarnessSettings):
    """`--model_args` of diffusion-lm-jax (those of HarnessSettings, and:)"""
    run_dir: str = ""  # a trainer run directory or a trainer.export directory (required)
    step: int = 0  # the committed checkpoint scored (0 = the latest)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)  # generate_until's decoder settings
    # Read by the shipped tasks through lm_eval's metadata (model_args are part of it); the model checks
    # data_path's tokenizer against the run's:
    data_path: str = ""  # the preprocess output whose validation split the TinyStories tasks use ("" = the run's)
    judge_run_dir: str = ""  # an AR run whose latest checkpoint scores tinystories_continuation (gen_ppl)


@register_model(NAME)
class DiffusionLM(LM):
    def __init__(self, ckpt: Checkpoint, settings: HarnessSettings, sampling: SamplingConfig):
        super().__init__()
        self.ckpt, self.settings, self.sampling = ckpt, settings, sampling
        run_cfg = ckpt.run_cfg
        self.objective = objectives.get(run_cfg.objective.name)
        if not self.objective.exact and self.objective.token_loss is None:
            raise MismatchError(f"objective {self.objective.name} has no token_loss: the harness cannot score it")
        self.row_len = run_cfg.data.seq_len
        self.prefix = ckpt.ids["bos"] if ckpt.ids["bos"] is not None else ckpt.ids["eos"]
        self.stderrs: list[float] = []  # the standard errors of every bound estimated so far
        if settings.sampler:  # a typo fails here, not after the loglikelihood requests
            decoders.resolve(settings.sampler, self.objective.name, sampling)
        structure = (dataclasses.astuple(run_cfg.model), ckpt.ids["mask"], dataclasses.astuple(run_cfg.objective))
        if self.objective.exact:  # one program per model structure and objective, across checkpoints
            self._program = compiled.once(("harness exact", *structure), lambda: scoring.exact_program(ckpt.graphdef))
        else:
            self._program = compiled.once(("harness bound", *structure), lambda: scoring.bound_program(
                ckpt.graphdef, self.objective, ckpt.ids["mask"], run_cfg.objective))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DiffusionLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> DiffusionLM:
        """From model_args alone: lm_eval's batch_size, max_batch_size and device do not apply."""
        args = load_into(ModelArgs(), None, [f"{key}={value}" for key, value in arg_dict.items()])
        check([(bool(args.run_dir), "run_dir", "is required: --model_args run_dir=RUN"),
               (args.step >= 0, "step", "must be >= 0 (0 = the latest)"), *args.harness_rules()])
        return cls(checkpoint.load(args.run_dir, args.step, args.data_path), args, args.sampling)

    # ------------------------------------------------------------------ tokens

    def _encode(self, text: str) -> list[int]:
        return self.ckpt.tokenizer.encode(text, add_special_tokens=False).ids

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(prefix + context ids, continuation ids): the continuation is what the whole text adds to the
        context's tokens (a merge across the boundary stays whole); the context's trailing white space
        goes with the continuation, as lm_eval's models do."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self._encode(context + continuation), self._encode(context)
        return [self.prefix, *whole[:len(head)]], whole[len(head):]

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> scoring.Estimate:
        """Each (context, continuation) of token ids scored; a context too long for a row keeps its last
        tokens (at least one). Exact objectives score a continuation's first token from its context: lm_eval's
        requests always have one (the prefix); without context a diffusion bound covers the whole text."""
        sequences, scored, cut = [], [], 0
        for context, continuation in pairs:
            if len(continuation) + min(len(context), 1) > self.row_len:
                raise ConfigError(f"a continuation of {len(continuation)} tokens does not fit the run's "
                                  f"{self.row_len} positions (data.seq_len) after its context")
            overflow = len(context) + len(continuation) - self.row_len
            kept = context[overflow:] if overflow > 0 else context
            cut += len(kept) < len(context)
            sequences.append(np.asarray([*kept, *continuation], np.int32))
            scored.append(np.arange(len(sequences[-1])) >= len(kept))
        if cut:
            log.warning("%d of %d contexts were cut to their last tokens to fit the run's %d positions (data.seq_len)",
                        cut, len(pairs), self.row_len)
        rows = scoring.pack(sequences, scored, self.row_len, self.settings.batch_size)
        params = self.ckpt.params
        if self.objective.exact:
            return scoring.exact(self._program, params, rows, self.settings.batch_size, len(pairs))
        grid = perplexity.time_grid(self.settings.samples, self.ckpt.run_cfg.objective.eps)
        estimate = scoring.bound(self._program, params, rows, self.settings.batch_size, len(pairs), grid,
                                 self.settings.seed)
        self.stderrs += estimate.stderr_R.tolist()
        return estimate

    # ------------------------------------------------------------------ lm_eval's requests

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        estimate = self.score([self._pair(*r.args) for r in requests])
        return [(float(ll), bool(greedy)) for ll, greedy in zip(estimate.loglikelihood_R, estimate.greedy_R)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, request in enumerate(requests):
            for window in get_rolling_token_windows(self._encode(request.args[0]), self.prefix, self.row_len - 1, 1):
                windows.append(make_disjoint_window(window))
                owner.append(index)
        sums = np.bincount(owner, weights=self.score(windows).loglikelihood_R, minlength=len(requests))
        return sums.tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        asks, stops = [], []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            greedy = kwargs.get("do_sample") is False
            temperature = 0.0 if greedy else float(kwargs.get("temperature", self.sampling.temperature))
            max_tokens = int(kwargs.get("max_gen_toks", self.settings.max_gen_toks))
            asks.append(generation.Request([self.prefix, *self._encode(context)], max_tokens, temperature))
        ignored = {k for r in requests for k in r.args[1]} - {"until", "max_gen_toks", "do_sample", "temperature"}
        if ignored:
            log.warning("generate_until ignores %s", ", ".join(sorted(ignored)))
        generated = generation.generate(self.ckpt, self.settings.sampler, self.sampling, self.settings.batch_size,
                                        self.settings.seed, asks)
        return [generation.until_stop(self.ckpt.tokenizer.decode(ids.tolist()), until)
                for ids, until in zip(generated, stops)]

    def perplexity(self, pairs: list[tuple[str, str]]) -> float:
        """exp(NLL per continuation token) of (context, continuation) texts: a judge's gen-ppl."""
        tokens = [self._pair(*pair) for pair in pairs]
        nll = -self.score(tokens).loglikelihood_R.sum()
        return float(np.exp(nll / max(sum(len(c) for _, c in tokens), 1)))
