"""How many noise levels the harness's diffusion loglikelihood needs: its spread and cost against K.

    python benchmarks/harness_levels.py [--stories 2000] [--steps 400] [--docs 40] [--out results.json]

Trains a test-sized BD3LM (blocks of 8) and MDLM model (hidden 32 x 2 layers) on generated
stories, then scores the `tinystories_cloze` requests of --docs validation stories (each story's
last word against three others) with the harness's model at K = 2, 8, 32 and 64 stratified noise
levels, three seeds each: the mean per-request standard error (nats), the share of stories whose
chosen word matches the choice at K = 256 (the estimate's stability), and seconds per scoring
pass. What `evals/config.HarnessSettings.samples` (K = 32) was chosen from.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from _common import emit, run

from evals.config import HarnessSettings, SamplingConfig

MODEL = ["model.hidden=32", "model.layers=2", "model.heads=2", "model.mlp_hidden=64", "model.max_seq_len=64",
         "data.seq_len=64", "data.pack_documents=64", "train.global_batch=8", "optim.warmup_steps=5",
         "optim.lr=3e-3", "wandb.mode=disabled"]
OBJECTIVES = {"bd3lm": ["objective.name=bd3lm", "objective.block_size=8"], "mdlm": ["objective.name=mdlm"]}
LEVELS = (2, 8, 32, 64)


def levels(run_dir: str, docs: int) -> dict:
    from evals.harness import checkpoint, model
    from evals.harness.tasks import utils

    ckpt = checkpoint.load(run_dir)
    stories = utils.load_cloze(run_dir=run_dir)["test"].select(range(docs))
    pairs = [(story["context"], " " + choice) for story in stories for choice in story["choices"]]

    def choices(samples: int, seed: int):
        lm = model.DiffusionLM(ckpt, HarnessSettings(samples=samples, seed=seed, batch_size=8), SamplingConfig())
        start = time.perf_counter()
        estimate = lm.score([lm._pair(*p) for p in pairs])  # noqa: SLF001 (the model's own tokenisation)
        return estimate, time.perf_counter() - start

    reference = choices(256, 99)[0].loglikelihood_R.reshape(-1, 4).argmax(1)
    rows = {}
    for samples in LEVELS:
        runs = [choices(samples, seed) for seed in range(3)]
        picks = np.array([e.loglikelihood_R.reshape(-1, 4).argmax(1) for e, _ in runs])
        rows[f"K_{samples}"] = {"mean_stderr_nats": round(float(np.mean([e.stderr_R.mean() for e, _ in runs])), 3),
                                "agrees_with_K_256": round(float((picks == reference).mean()), 3),
                                "seconds": round(statistics.median(s for _, s in runs), 2)}
    return {"requests": len(pairs), **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stories", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--docs", type=int, default=40, help="Validation stories whose cloze requests are scored.")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {"benchmark": "harness_levels", "stories": args.stories, "steps": args.steps, "docs": args.docs}
    with tempfile.TemporaryDirectory() as tmp:
        run("-m", "pipelines.corpus", "--output", f"{tmp}/stories.txt", "--num_stories", str(args.stories),
            "--seed", "1")
        run("-m", "pipelines.preprocess", "--dataset", "tinystories", "--input", f"{tmp}/stories.txt", "--output",
            f"{tmp}/data", "--vocab_size", "320", "--num_shards", "2", "--validation_fraction", "0.1")
        for name, objective in OBJECTIVES.items():
            run("-m", "trainer", f"data.path={tmp}/data", f"run_dir={tmp}/{name}", *MODEL, *objective,
                f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}")
            result[name] = levels(f"{tmp}/{name}", args.docs)
    emit(result, args.out)


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
    main()
