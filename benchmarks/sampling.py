"""SPD (compiled and KV-cached) against LLaDA's one-token-per-step remasking, on a trained model.

    python benchmarks/sampling.py [--run_dir MDLM_RUN --ar_run_dir AR_RUN] [--out results.json]

Without run directories it first makes them: the sample corpus, preprocess, and the tiny
MDLM and AR configs trained for --train_steps each (minutes on CPU). Prints JSON: for 128
and 1024 generated tokens, each sampler's forwards, tokens per forward, tokens/s,
generative perplexity under the AR run and distinct-n, plus the ratios the goals name
(remasking forwards / SPD forwards; cached SPD tokens/s / uncached).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile

import jax

from _common import emit, latest
from evals import perplexity, quality, sampling
from evals.config import SamplingConfig
from trainer import data

SAMPLERS = {"spd": sampling.spd_generate, "spd_cached": sampling.spd_generate_cached,
            "remask": sampling.remask_generate}


def make_runs(tmp: str, steps: int) -> tuple[str, str]:
    py = sys.executable
    subprocess.run([py, "-m", "pipelines.corpus", "--output", f"{tmp}/stories.txt", "--num_stories", "5000"],
                   check=True, capture_output=True)
    subprocess.run([py, "-m", "pipelines.preprocess", "--dataset", "tinystories", "--input", f"{tmp}/stories.txt",
                    "--output", f"{tmp}/data"], check=True, capture_output=True)
    runs = []
    for objective in ("mdlm", "ar"):
        run_dir = f"{tmp}/{objective}"
        subprocess.run([py, "-m", "trainer", "--config", "configs/tinystories_tiny.yaml", f"data.path={tmp}/data",
                        f"run_dir={run_dir}", f"train.steps={steps}", f"train.checkpoint_every={steps}",
                        f"objective.name={objective}", "wandb.mode=disabled"], check=True, capture_output=True)
        runs.append(run_dir)
    return runs[0], runs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", help="A trained MDLM run (made if absent).")
    parser.add_argument("--ar_run_dir", help="An AR run on the same data, for gen-ppl (made if absent).")
    parser.add_argument("--train_steps", type=int, default=600, help="Steps per run when making them.")
    parser.add_argument("--samples", type=int, default=4, help="Prompts per setting.")
    parser.add_argument("--threshold", type=float, default=0.5, help="SPD confidence threshold.")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, ar_dir = (args.run_dir, args.ar_run_dir) if args.run_dir else make_runs(tmp, args.train_steps)
        run_cfg, (graphdef, params) = latest(run_dir)
        reference = latest(ar_dir)[1] if ar_dir else None
        manifest = data.load_manifest(run_cfg.data.path)
        ids = data.special_ids(manifest)
        prompt_len = 16
        prompt = perplexity.prompts(run_cfg, manifest, args.samples, prompt_len)
        results = {}
        for gen_length in (128, 1024):
            cfg = SamplingConfig(gen_length=gen_length, block_length=32, steps=32, threshold=args.threshold,
                                 top_k=1, remask_steps=gen_length)
            row = {}
            for name, generate in SAMPLERS.items():
                out = generate(graphdef, params, prompt, cfg, ids["mask"], ids["eos"], jax.random.key(0))
                lengths = sampling.generated_lengths(out, prompt_len, ids["eos"])
                generated = [r[prompt_len:prompt_len + n] for r, n in zip(out.tokens, lengths)]
                row[name] = {
                    "nfe": out.nfe, "seconds": round(out.seconds, 3),
                    "tokens_per_forward": round(float(lengths.mean() / out.nfe), 3),
                    "tokens_per_s": round(float(lengths.sum() / out.seconds), 1),
                    "mean_length": float(lengths.mean()),
                    "distinct_2": round(quality.distinct_n(generated, 2), 3),
                }
                if reference is not None:
                    row[name]["gen_ppl"] = round(quality.generative_perplexity(
                        *reference, out.tokens, prompt_len, lengths), 3)
            row["remask_nfe_over_spd_nfe"] = round(row["remask"]["nfe"] / row["spd"]["nfe"], 3)
            row["cached_speedup"] = round(row["spd_cached"]["tokens_per_s"] / row["spd"]["tokens_per_s"], 3)
            if reference is not None:
                row["spd_gen_ppl_vs_remask"] = round(row["spd"]["gen_ppl"] / row["remask"]["gen_ppl"], 3)
            results[f"gen_{gen_length}"] = row
    report = {"benchmark": "sampling",
              "machine": f"{platform.machine()} {os.cpu_count()} cpus, {jax.devices()[0].device_kind}",
              "threshold": args.threshold, "samples": args.samples, "results": results}
    emit(report, args.out)


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
    main()
