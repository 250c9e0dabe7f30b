"""Does OPUT make soft parallel decoding faster? The DMax claim, on a small model.

    python benchmarks/oput.py [--base_steps N] [--tune_steps M] [--out results.json]

From one MDLM checkpoint trained on trajectory data, fine-tune two copies for the same
number of steps: with OPUT, and with plain MDLM. Decode the validation questions with SPD
(greedy, threshold 0.5, blocks of 32) and report forwards, tokens per forward and
generative perplexity under an AR model trained on the same data. Data: the DMax-layout
sample in ../shared/data/dmax when present, else generated arithmetic trajectories.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import random
import subprocess
import sys
import tempfile

import jax
import numpy as np
from _common import emit

from evals import checkpoints, quality, sampling
from evals.config import SamplingConfig
from trainer import checkpoint, data

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "dmax" / "trajectories-sample.jsonl"
MODEL = ["model.hidden=128", "model.layers=4", "model.heads=4", "model.mlp_hidden=352", "model.max_seq_len=256",
         "data.seq_len=128", "train.global_batch=16", "optim.lr=2e-3", "optim.warmup_steps=30",
         "wandb.mode=disabled", "train.log_every=10", "objective.block_size=32"]


def trajectories(path: str) -> str:
    if SHARED.exists():
        return str(SHARED)
    rng = random.Random(0)
    rows = []
    for _ in range(2000):
        a, b, c = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 9)
        rows.append({"question": f"There are {c} boxes with {a} shells each. Ana adds {b} shells. How many shells?",
                     "answer": f"The boxes hold {c} x {a} = {c * a}. Adding {b} gives {c * a} + {b} = "
                               f"{c * a + b}.\nThe answer is {c * a + b}."})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def train(run_dir: str, *overrides: str) -> None:
    subprocess.run([sys.executable, "-m", "trainer", f"run_dir={run_dir}", *MODEL, *overrides], check=True,
                   capture_output=True)


def questions(data_path: str, count: int) -> np.ndarray:
    """Validation prompts of the most common prompt length (SPD decodes equal-length prompts)."""
    manifest = data.load_manifest(data_path)
    cfg_docs = list(data.documents(data_path, manifest, "validation"))
    prompts = [d["tokens"][: int(d["prompt_len"])] for d in cfg_docs]
    length = collections.Counter(len(p) for p in prompts).most_common(1)[0][0]
    return np.stack([p for p in prompts if len(p) == length][:count]).astype(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_steps", type=int, default=400, help="MDLM steps of the shared start.")
    parser.add_argument("--tune_steps", type=int, default=150, help="Fine-tuning steps of each copy.")
    parser.add_argument("--samples", type=int, default=8, help="Validation questions decoded.")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = trajectories(f"{tmp}/rows.jsonl")
        subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--dataset", "dmax_trajectories",
                        "--input", rows, "--output", f"{tmp}/data", "--vocab_size", "1024"], check=True,
                       capture_output=True)
        common = [f"data.path={tmp}/data"]
        train(f"{tmp}/base", *common, f"train.steps={args.base_steps}", f"train.checkpoint_every={args.base_steps}")
        train(f"{tmp}/ar", *common, "objective.name=ar", f"train.steps={args.base_steps}",
              f"train.checkpoint_every={args.base_steps}")
        tune = [*common, f"train.steps={args.tune_steps}", f"train.checkpoint_every={args.tune_steps}",
                f"train.init_from_run={tmp}/base"]
        train(f"{tmp}/oput", *tune, "objective.name=oput")
        train(f"{tmp}/mdlm", *tune)
        manifest = data.load_manifest(f"{tmp}/data")
        ids = data.special_ids(manifest)
        prompt = questions(f"{tmp}/data", args.samples)
        reference = checkpoints.restore_params(checkpoint.reader(f"{tmp}/ar"), args.base_steps,
                                               checkpoints.load_config(f"{tmp}/ar"))
        cfg = SamplingConfig(gen_length=64, block_length=32, steps=32, threshold=0.5, top_k=1)
        results = {}
        for name in ("base", "mdlm", "oput"):
            run_cfg = checkpoints.load_config(f"{tmp}/{name}")
            mngr = checkpoint.reader(f"{tmp}/{name}")
            graphdef, params = checkpoints.restore_params(mngr, checkpoints.committed_steps(mngr)[-1], run_cfg)
            out = sampling.spd_generate_cached(graphdef, params, prompt, cfg, ids["mask"], ids["eos"],
                                               jax.random.key(0))
            lengths = sampling.generated_lengths(out, prompt.shape[1], ids["eos"])
            results[name] = {
                "nfe": out.nfe,
                "tokens_per_forward": round(float(lengths.mean() / out.nfe), 3),
                "mean_length": float(lengths.mean()),
                "gen_ppl": round(quality.generative_perplexity(*reference, out.tokens, prompt.shape[1], lengths), 3),
            }
    report = {
        "benchmark": "oput",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {jax.devices()[0].device_kind}",
        "data": "shared DMax sample" if SHARED.exists() else "generated arithmetic trajectories",
        "base_steps": args.base_steps, "tune_steps": args.tune_steps, "spd": dict(threshold=0.5, block=32),
        "results": results,
        "tokens_per_forward_oput_over_mdlm": round(results["oput"]["tokens_per_forward"]
                                                   / results["mdlm"]["tokens_per_forward"], 3),
        "gen_ppl_oput_over_mdlm": round(results["oput"]["gen_ppl"] / results["mdlm"]["gen_ppl"], 3),
    }
    emit(report, args.out)


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
    main()
