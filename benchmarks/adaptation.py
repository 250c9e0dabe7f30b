"""What starting a diffusion model from an AR model buys (Dream's claim), measured.

    python benchmarks/adaptation.py [--ar_steps N] [--adapt_steps M] [--every E] [--seeds 3] [--out F]

On the quickstart's 5,000 generated stories, with the tiny model of `configs/tinystories_tiny*.yaml`
(same size, data, optimizer and tokens per step), per seed: an AR run of N steps; then M steps of
each of Dream (shifted head), MDLM (no shift) and BD3LM started from it (`train.init_from_run`);
against Dream and MDLM trained from scratch for N + M steps. Every E steps each run is evaluated
(`python -m evals`): the validation bound, and story correctness and diversity of its one-token
decoder's samples, parsed against the corpus grammar (dream, remask, one_token).

Per arm and seed: the curves by total steps (an adapted arm's step s is N + s), with the bound of
the AR run's own weights under the arm's objective as adaptation step 0 (what the arm starts
from); for the adapted Dream and MDLM, the first adaptation step whose bound is at or below their
from-scratch twin's final bound. Dream's arms are also decoded left to right (blocks of one token,
what an AR head is for): story correctness `l2r`. The arm `dream_from_ar_lr4e-4` adapts at a
fifth of the config's peak learning rate (Dream's warning: a high rate washes out the AR model).
Goals, from Dream's claim: the AR-initialised Dream reaches the bound Dream from scratch has after
N + M steps within (N + M) / 3 adaptation steps, and the shift beats no shift (Dream's bound below
MDLM's, both from the AR run) at every evaluated step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import types

import jax
from _common import emit, run
from learning import GEN_LENGTH, PROMPT_LEN, train_and_evaluate

from evals import perplexity
from evals.config import PerplexityConfig
from trainer import config as config_lib
from trainer import data as data_lib
from trainer import state

ARMS = {  # name: (config, one-token decoder, starts from the AR run, overrides)
    "dream_from_ar": ("configs/tinystories_tiny_dream.yaml", "dream", True, []),
    "dream_from_ar_lr4e-4": ("configs/tinystories_tiny_dream.yaml", "dream", True, ["optim.lr=4e-4"]),
    "mdlm_from_ar": ("configs/tinystories_tiny.yaml", "remask", True, []),
    "bd3lm_from_ar": ("configs/tinystories_tiny_bd3lm.yaml", "one_token", True, []),
    "dream_scratch": ("configs/tinystories_tiny_dream.yaml", "dream", False, []),
    "mdlm_scratch": ("configs/tinystories_tiny.yaml", "remask", False, []),
}
TWIN = {"dream_from_ar": "dream_scratch", "mdlm_from_ar": "mdlm_scratch"}


def start_bound(ar_run: str, config: str, ppl_tokens: int) -> float:
    """The validation bound of the AR run's weights under the arm's objective: adaptation step 0."""
    ar_cfg = config_lib.load_run(ar_run)
    arm_cfg = dataclasses.replace(ar_cfg, objective=config_lib.load(config, []).objective)
    weights = state.load_params(ar_run)
    return round(perplexity.evaluate(weights.graphdef, weights.params, arm_cfg, data_lib.load_manifest(
        ar_cfg.data.path), PerplexityConfig(max_tokens=ppl_tokens))["ppl_bound"], 4)


def left_to_right(run_dir: str, args) -> dict[int, float]:
    """Story correctness per step of Dream's decoder in blocks of one token (left to right)."""
    settings = [f"sampling.num_samples={args.prompts}", f"sampling.prompt_tokens={PROMPT_LEN}",
                f"sampling.gen_length={GEN_LENGTH}", "sampling.block_length=1"]
    run("-m", "evals", "--run_dir", run_dir, "--once", "--force", "samplers=dream", *settings,
        f"perplexity.max_tokens={args.ppl_tokens}", "wandb_mode=disabled")
    with open(f"{run_dir}/evals/ledger.jsonl") as f:
        return {r["step"]: r["samplers"]["dream"]["story_correctness"] for r in map(json.loads, f)
                if r["settings"]["sampling"]["block_length"] == 1}


def reaches(curve: list[dict], bound: float) -> int | None:
    """The first adaptation step whose bound is at or below `bound` (None: never)."""
    return next((r["step"] for r in curve if r["ppl"] <= bound), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ar_steps", type=int, default=150, help="N: the AR run's steps")
    parser.add_argument("--adapt_steps", type=int, default=150, help="M: each adapted arm's steps")
    parser.add_argument("--every", type=int, default=50, help="checkpoint (and evaluation) interval")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts per evaluation")
    parser.add_argument("--ppl_tokens", type=int, default=4000, help="validation tokens of each bound")
    parser.add_argument("--workdir", default=None, help="keep the data and runs here (default: a temporary folder)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    n, m = args.ar_steps, args.adapt_steps
    budget = lambda steps: types.SimpleNamespace(steps=steps, every=args.every, prompts=args.prompts,  # noqa: E731
                                                 ppl_tokens=args.ppl_tokens)
    curves: dict[str, dict[int, list[dict]]] = {name: {} for name in ["ar", *ARMS]}
    with tempfile.TemporaryDirectory() as temporary:
        tmp = args.workdir or temporary
        run("-m", "pipelines.corpus", "--output", f"{tmp}/stories.txt", "--num_stories", "5000", "--seed", "0")
        run("-m", "pipelines.preprocess", "--dataset", "tinystories", "--input", f"{tmp}/stories.txt", "--output",
            f"{tmp}/data", "--vocab_size", "4096", "--num_shards", "4")
        for seed in range(args.seeds):
            curves["ar"][seed] = train_and_evaluate(tmp, f"{tmp}/data", "ar", ("configs/tinystories_tiny_ar.yaml",
                                                                                "causal", []), seed, budget(n))
            for name, (config, decoder, adapted, overrides) in ARMS.items():
                start = [f"train.init_from_run={tmp}/ar_seed{seed}"] if adapted else []
                rows = train_and_evaluate(tmp, f"{tmp}/data", name, (config, decoder, [*start, *overrides]), seed,
                                          budget(m if adapted else n + m))
                l2r = left_to_right(f"{tmp}/{name}_seed{seed}", args) if decoder == "dream" else {}
                curves[name][seed] = [{**r, "total_step": r["step"] + (n if adapted else 0),
                                       **({"l2r_story_correctness": l2r[r["step"]]} if l2r else {})} for r in rows]
                if adapted:
                    curves[name][seed].insert(0, {"step": 0, "total_step": n, "ppl": start_bound(
                        f"{tmp}/ar_seed{seed}", config, args.ppl_tokens)})
    result = {"machine": f"{platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s)",
              "ar_steps": n, "adapt_steps": m, "every": args.every, "prompts": args.prompts, "seeds": args.seeds,
              "arms": {name: {"config": c, "decoder": d, "from_ar": a, "overrides": o}
                       for name, (c, d, a, o) in ARMS.items()},
              "curves": curves, "reaches_scratch_final": {}, "goal": {}}
    for arm, twin in TWIN.items():
        result["reaches_scratch_final"][arm] = [reaches(curves[arm][s], curves[twin][s][-1]["ppl"])
                                                for s in range(args.seeds)]
    within = (n + m) / 3
    result["goal"] = {
        "dream_reaches_scratch_within_third": [r is not None and r <= within
                                               for r in result["reaches_scratch_final"]["dream_from_ar"]],
        "shift_beats_no_shift_every_step": [all(d["ppl"] < b["ppl"] for d, b in zip(curves["dream_from_ar"][s],
                                                                                    curves["mdlm_from_ar"][s]))
                                            for s in range(args.seeds)],  # step 0 included
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
