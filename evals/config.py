"""The eval stage's typed config: `key=value` overrides on the command line (or a YAML file)."""

from __future__ import annotations

import dataclasses

from trainer.config import check, load_into
from trainer.objectives.editflow import KAPPAS


@dataclasses.dataclass
class PerplexityConfig:
    max_tokens: int = 20_000  # validation tokens scored (0 = the whole split)
    time_samples: int = 8  # points of the fixed antithetic time grid per sequence (mdlm)
    batch_size: int = 8  # packed rows per forward
    seed: int = 0  # fixes the masks, so the bound is deterministic


DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


@dataclasses.dataclass
class SamplingConfig:
    num_samples: int = 32  # prompts, taken from the validation split (their spread gives the 90% intervals)
    prompt_tokens: int = 16  # leading tokens of each validation document used as the prompt
    gen_length: int = 64  # tokens generated after the prompt (prompt + generation <= the run's data.seq_len)
    block_length: int = 0  # decoding block size (0 = the run's objective.block_size for block diffusion, else 32)
    steps: int = 0  # SPD: passes per block at most (0 = block_length, DMax's cap); threshold decoders run until done
    threshold: float = 0.9  # SPD and threshold: decode masked positions whose confidence is at least this
    confidence_stop: float = 0.9  # SPD: a block ends once every position is this confident
    top_k: int = 1  # SPD: tokens mixed into a decoded position's soft embedding
    # SPD: re-predict already decoded positions (yes | no | auto = yes only for models trained to
    # predict every position, oput; SUBS models (mdlm, bd3lm) carry a decoded token over, as trained).
    revise: str = "auto"
    # SPD with revision: what a drafted position feeds the next pass: soft (DMax: its top-k tokens'
    # embeddings mixed with the mask's) | hard (its drafted token's embedding: what OPUT's rollout trains on)
    spd_inputs: str = "soft"
    temperature: float = 0.0  # 0 = greedy, else Gumbel-max sampling at this temperature
    suppress_mask: bool = True  # never predict the mask token
    # one_token and threshold: the position a pass commits at least: left_to_right (the leftmost masked one:
    # one_token then decodes each block in order) | confidence (the most confident masked one). Confidence
    # first commits a miscalibrated peak far ahead before the words leading to it (a story's ending word at
    # a block's last position), and most prompts then end in the same error (README, "How fast diffusion learns").
    order: str = "left_to_right"
    remask_steps: int = 0  # remask, dream, editflow: total steps, over the blocks (0 = gen_length, a token per step)
    # dream: which masked positions a step unmasks: origin (each with probability 1 - s/t) or the most confident
    # by maskgit_plus (the token's probability), topk_margin (top-1 minus top-2) or entropy (negative entropy)
    alg: str = "maskgit_plus"
    alg_temp: float = 0.0  # dream: 0 = the most confident; else sampled without replacement from softmax(conf / this)
    time_eps: float = 1e-3  # dream: the time grid runs from 1 down to this; editflow: from 0 up to 1 - this
    edit_kappa: str = "auto"  # editflow: the schedule of its rates (auto = the run's objective.kappa, as trained)
    edit_max_w: float = 0.0  # editflow: the clip of the rates' weight kappa'/(1 - kappa) (0 = the run's objective.max_w)
    edit_masks: int = -1  # editflow: MASK tokens after the prompt at the start (-1 = the run's objective prior)
    seed: int = 0  # sampling randomness


@dataclasses.dataclass
class HarnessSettings:
    """What the harness model (evals/harness) reads besides the checkpoint: `harness.*` keys here,
    `--model_args` of `python -m evals.harness`."""
    # Noise levels of a diffusion model's loglikelihood: its bound at K stratified levels, mean and standard
    # error (AR: exact, one pass). 32 halves K=8's standard error (measured: README).
    samples: int = 32
    batch_size: int = 8  # packed rows (loglikelihood) or prompts (generate_until) per forward
    seed: int = 0  # fixes the bound's masks and the sampling
    # generate_until's decoder, name or name@threshold ("" = the quality reference of the decoders that fit
    # the objective); its settings are sampling.*, but for seed (this one), gen_length (the task's
    # max_gen_toks, else the one below) and prompt_tokens (each request's own).
    sampler: str = ""
    max_gen_toks: int = 256  # generation length when a task sets none (prompt + generation fit data.seq_len)
    arithmetic_data: str = ""  # arithmetic_word_problems' rows: a DMax-layout .jsonl or .parquet file

    def harness_rules(self) -> list[tuple[bool, str, str]]:
        return [(self.samples >= 2, "samples", "must be at least 2 (the standard error needs two levels)"),
                (self.batch_size >= 1, "batch_size", "must be at least 1"),
                (self.max_gen_toks >= 1, "max_gen_toks", "must be at least 1")]


@dataclasses.dataclass
class HarnessConfig(HarnessSettings):
    """lm-evaluation-harness tasks run on each new step (evals/harness); the model reads the eval's
    data_path, gen_ppl_run_dir (the continuation task's judge) and sampling.* too."""
    # Comma-separated task names ("" = none): the shipped tinystories_cloze, tinystories_continuation,
    # arithmetic_word_problems (evals/harness/tasks) or any task lm_eval can load offline.
    tasks: str = ""
    limit: int = 0  # documents per task (0 = all)


@dataclasses.dataclass
class EvalConfig:
    perplexity: PerplexityConfig = dataclasses.field(default_factory=PerplexityConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    harness: HarnessConfig = dataclasses.field(default_factory=HarnessConfig)
    samplers: str = "auto"  # comma-separated names (name@threshold for one setting), or auto = matched to the objective
    # A preprocess output (same tokenizer) whose validation split is scored and gives the prompts
    # ("" = the run's data.path); an OPUT run on self-generated trajectories is scored on real text.
    data_path: str = ""
    gen_ppl_run_dir: str = ""  # an AR run on the same data whose latest checkpoint scores samples
    # A run evaluated with the same prompts and judge whose latest one-token gen-ppl is the quality
    # reference (a fine-tune's base model); "" = this run's own one-token decoder.
    reference_run_dir: str = ""
    poll_seconds: float = 10.0  # --watch: how often to look for new checkpoints
    wandb_mode: str = "offline"  # offline | online | disabled (WANDB_MODE overrides)

    def validate(self) -> None:
        s, p = self.sampling, self.perplexity
        check([
            (p.time_samples >= 1, "perplexity.time_samples", "must be at least 1"),
            (p.batch_size >= 1, "perplexity.batch_size", "must be at least 1"),
            (p.max_tokens >= 0, "perplexity.max_tokens", "must be >= 0"),
            (s.num_samples >= 1, "sampling.num_samples", "must be at least 1"),
            (s.prompt_tokens >= 1, "sampling.prompt_tokens", "must be at least 1"),
            (s.block_length >= 0, "sampling.block_length", "must be >= 0 (0 = the run's block size)"),
            (s.gen_length >= 1, "sampling.gen_length", "must be at least 1"),
            (s.steps >= 0, "sampling.steps", "must be >= 0 (0 = the block length)"),
            (s.top_k >= 1, "sampling.top_k", "must be at least 1"),
            (s.revise in ("yes", "no", "auto"), "sampling.revise", "must be yes, no or auto"),
            (s.spd_inputs in ("soft", "hard"), "sampling.spd_inputs", "must be soft or hard"),
            (s.temperature >= 0, "sampling.temperature", "must be >= 0"),
            (s.order in ("confidence", "left_to_right"), "sampling.order", "must be confidence or left_to_right"),
            (s.remask_steps >= 0, "sampling.remask_steps", "must be >= 0"),
            (s.alg in DREAM_ALGS, "sampling.alg", f"must be one of {', '.join(DREAM_ALGS)}"),
            (s.alg_temp >= 0, "sampling.alg_temp", "must be >= 0"),
            (0 < s.time_eps < 1, "sampling.time_eps", "must be in (0, 1)"),
            (s.edit_kappa in ("auto", *KAPPAS), "sampling.edit_kappa", f"must be auto or one of {', '.join(KAPPAS)}"),
            (s.edit_max_w >= 0, "sampling.edit_max_w", "must be >= 0 (0 = the run's objective.max_w)"),
            (s.edit_masks >= -1, "sampling.edit_masks", "must be >= -1 (-1 = the run's objective prior)"),
            (self.poll_seconds > 0, "poll_seconds", "must be positive"),
            (self.wandb_mode in ("offline", "online", "disabled"), "wandb_mode",
             "must be offline, online or disabled"),
            (self.harness.limit >= 0, "harness.limit", "must be >= 0 (0 = every document)"),
            *[(ok, f"harness.{key}", message) for ok, key, message in self.harness.harness_rules()],
        ])


def load(path: str | None, overrides: list[str]) -> EvalConfig:
    config = load_into(EvalConfig(), path, overrides)
    config.validate()
    return config
