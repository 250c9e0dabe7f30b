"""How fast each objective learns to write correct stories: story correctness against training steps.

    python benchmarks/learning.py [--arm ar --arm bd3lm ...] [--seeds 3] [--steps 600] [--every 50] [--out F]

Trains the tiny model of `configs/tinystories_tiny*.yaml` (same size, data, optimizer and budget)
with each arm's objective on the quickstart's 5,000 generated stories, at --seeds seeds, keeping a
checkpoint every --every steps; evaluates each checkpoint with the arm's one-token decoder (AR:
causal greedy; BD3LM: one token per forward, left to right in blocks; MDLM: the remasking
sampler at one token per step; Dream: its own decoder at one token per step) on --prompts held-out prompts, and parses every sample against the
corpus's grammar (evals/quality.py). Per arm and seed: the curve of story correctness (share of
samples without an error), sentence validity and the validation bound per step; the first step
at which story correctness reaches each of --levels; and each diffusion arm's steps to a level
divided by the AR twin's at the same seed. Goal (published small-scale work puts masked diffusion
at about 2x AR's steps): BD3LM reaches the AR twin's correctness in <= 2x its steps (aim 1.5x),
median over the seeds. An arm (--arm, repeated; default: ar, mdlm, bd3lm) is `name` from ARMS or `name=base_arm:key=value,key=value` (a
variant: the base arm's config with overrides), e.g. `bd3lm_b4=bd3lm:objective.block_size=4`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile

import jax
from _common import emit, run

from evals import perplexity

PROMPT_LEN = 16
# name: (config, one-token decoder, overrides)
ARMS = {
    "ar": ("configs/tinystories_tiny_ar.yaml", "causal", []),
    "mdlm": ("configs/tinystories_tiny.yaml", "remask", []),
    "bd3lm": ("configs/tinystories_tiny_bd3lm.yaml", "one_token", []),
    "dream": ("configs/tinystories_tiny_dream.yaml", "dream", []),  # not a default arm: --arm dream
}


def parse_arm(spec: str) -> tuple[str, tuple[str, str, list[str]]]:
    name, _, variant = spec.partition("=")
    if not variant:
        return name, ARMS[name]
    base, _, overrides = variant.partition(":")
    config, decoder, extra = ARMS[base]
    return name, (config, decoder, [*extra, *[o for o in overrides.split(",") if o]])


def train_and_evaluate(tmp: str, data: str, name: str, arm, seed: int, args) -> list[dict]:
    """The arm's run at `seed`: one row per checkpoint (step, story correctness with its interval,
    sentence validity, distinct-2, the bound)."""
    config, decoder, overrides = arm
    run_dir = f"{tmp}/{name}_seed{seed}"
    run("-m", "trainer", "--config", config, f"run_dir={run_dir}", f"data.path={data}", f"seed={seed}",
        f"train.steps={args.steps}", f"train.checkpoint_every={args.every}",
        f"train.keep_last={args.steps // args.every + 1}", "wandb.mode=disabled", *overrides)
    run("-m", "evals", "--run_dir", run_dir, "--once", f"samplers={decoder}", f"sampling.num_samples={args.prompts}",
        f"sampling.prompt_tokens={PROMPT_LEN}", f"sampling.gen_length={args.gen_length}",
        f"perplexity.max_tokens={args.ppl_tokens}", "wandb_mode=disabled")
    rows = []
    with open(f"{run_dir}/evals/ledger.jsonl") as f:
        for record in map(json.loads, f):
            m = record["samplers"][decoder]
            ppl = record["perplexity"]
            rows.append({"step": record["step"], "story_correctness": m["story_correctness"],
                         "story_correctness_interval": m["story_correctness_interval"],
                         "sentence_validity": round(m["sentence_validity"], 4),
                         "distinct_2": round(m["distinct_2"], 4),
                         "distinct_continuations": round(m["distinct_continuations"], 4),
                         "length_tv": round(m["length_tv"], 4), "mean_length": round(m["mean_length"], 2),
                         "forwards_per_sequence": m["forwards_per_sequence"],
                         "tokens_per_forward": round(m["tokens_per_forward"], 4),
                         "ppl": round(perplexity.figure(ppl)[1], 4), "ppl_kind": perplexity.figure(ppl)[0]})
    return rows


def steps_to(curve: list[dict], level: float) -> int | None:
    """The first evaluated step whose story correctness is at least `level` (None: never)."""
    return next((r["step"] for r in curve if r["story_correctness"] >= level), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", action="append", help="an arm (repeat; see the docstring)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50, help="checkpoint (and evaluation) interval")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts per evaluation")
    parser.add_argument("--gen_length", type=int, default=112,
                        help="tokens generated after each 16-token prompt (112: whole stories, to the trained length)")
    parser.add_argument("--ppl_tokens", type=int, default=4000, help="validation tokens of each bound")
    parser.add_argument("--levels", default="0.5,0.8", help="story correctness levels to time")
    parser.add_argument("--workdir", default=None, help="keep the data and runs here (default: a temporary folder)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    arms = dict(parse_arm(spec) for spec in args.arm or ["ar", "mdlm", "bd3lm"])
    levels = [float(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as temporary:
        tmp = args.workdir or temporary
        run("-m", "pipelines.corpus", "--output", f"{tmp}/stories.txt", "--num_stories", "5000", "--seed", "0")
        run("-m", "pipelines.preprocess", "--dataset", "tinystories", "--input", f"{tmp}/stories.txt", "--output",
            f"{tmp}/data", "--vocab_size", "4096", "--num_shards", "4")
        curves = {name: {seed: train_and_evaluate(tmp, f"{tmp}/data", name, arm, seed, args)
                         for seed in range(args.seeds)} for name, arm in arms.items()}
    result = {"machine": f"{platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s)",
              "steps": args.steps, "every": args.every, "prompts": args.prompts, "gen_length": args.gen_length,
              "seeds": args.seeds,
              "arms": {name: {"config": arm[0], "decoder": arm[1], "overrides": arm[2]} for name, arm in arms.items()},
              "curves": curves, "steps_to": {}, "vs_ar": {}}
    for name, by_seed in curves.items():
        result["steps_to"][name] = {str(level): [steps_to(c, level) for c in by_seed.values()] for level in levels}
        if name == "ar" or "ar" not in curves:
            continue
        ratios = {}
        for level in levels:
            per_seed = [None if mine is None or theirs is None else mine / theirs for mine, theirs in
                        zip(result["steps_to"][name][str(level)], result["steps_to"]["ar"][str(level)])]
            # A seed that never reached the level within --steps counts as beyond every measured ratio
            # (a median among those is None: not reached).
            median = statistics.median(r if r is not None else math.inf for r in per_seed)
            ratios[str(level)] = {"per_seed": per_seed, "median": median if math.isfinite(median) else None}
        result["vs_ar"][name] = ratios
    emit(result, args.out)


if __name__ == "__main__":
    main()
