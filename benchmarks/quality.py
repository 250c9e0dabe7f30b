"""Equal-budget likelihood: AR, MDLM and BD3LM (block 4 and 16) on real TinyStories.

    python benchmarks/quality.py [--steps N] [--seed S] [--out results.json]

Preprocesses the real TinyStories sample in ../shared/data/tinystories (skipped with a reason
when absent), then trains the same model (size, data, steps, seed, optimizer) with each
objective and scores the validation split with the eval stage: the exact perplexity for AR,
the NELBO bound for the diffusion models (MDLM's; BD3LM's with each block conditioned on the
clean earlier blocks). Prints each figure and its ratio to AR. Anchor (Block Diffusion paper,
LM1B, 110M params): AR 22.83, MDLM <= 31.78 (1.39x), BD3LM <= 28.23 at block 4 (1.24x).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import subprocess
import sys
import tempfile

import jax
from _common import emit, latest

from evals import perplexity
from evals.config import PerplexityConfig
from trainer import data

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"
MODEL = ["model.hidden=128", "model.layers=4", "model.heads=4", "model.mlp_hidden=352", "model.max_seq_len=128",
         "data.seq_len=128", "train.global_batch=16", "optim.lr=2e-3", "optim.warmup_steps=50",
         "wandb.mode=disabled"]
OBJECTIVES = {"ar": ["objective.name=ar"], "mdlm": ["objective.name=mdlm"],
              "bd3lm_16": ["objective.name=bd3lm", "objective.block_size=16"],
              "bd3lm_4": ["objective.name=bd3lm", "objective.block_size=4"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="Training steps of every model.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every run (init, data order, noise).")
    parser.add_argument("--time_samples", type=int, default=8, help="Points of the bound's time grid.")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args()
    source = SHARED / "TinyStoriesV2-GPT4-valid.sample-a.txt"
    machine = f"{platform.machine()} {os.cpu_count()} cpus, {jax.devices()[0].device_kind}"
    if not source.exists():
        emit({"benchmark": "quality", "machine": machine, "skipped": f"real TinyStories sample not at {source}"},
             args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--dataset", "tinystories", "--input",
                        str(source), "--output", f"{tmp}/data", "--vocab_size", "4096", "--validation_fraction",
                        "0.1"], check=True, capture_output=True)
        results = {}
        for name, objective in OBJECTIVES.items():
            run_dir = f"{tmp}/{name}"
            subprocess.run([sys.executable, "-m", "trainer", f"data.path={tmp}/data", f"run_dir={run_dir}", *MODEL,
                            *objective, f"seed={args.seed}", f"train.steps={args.steps}",
                            f"train.checkpoint_every={args.steps}"], check=True, capture_output=True)
            run_cfg, (graphdef, params) = latest(run_dir)
            scored = perplexity.evaluate(graphdef, params, run_cfg, data.load_manifest(run_cfg.data.path),
                                         PerplexityConfig(max_tokens=0, time_samples=args.time_samples))
            results[name] = {"perplexity": round(scored.get("ar_ppl", scored.get("ppl_bound")), 3),
                             "kind": "exact" if name == "ar" else "bound", "tokens": scored["ppl_tokens"]}
    for row in results.values():
        row["vs_ar"] = round(row["perplexity"] / results["ar"]["perplexity"], 3)
    emit({"benchmark": "quality", "machine": machine, "data": str(source.name), "steps": args.steps,
          "seed": args.seed, "model": MODEL, "results": results,
          "anchor_lm1b_110m": {"ar": 22.83, "mdlm": 31.78, "bd3lm_16": 30.60, "bd3lm_4": 28.23}}, args.out)


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
    main()
