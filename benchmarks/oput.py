"""Does OPUT make soft parallel decoding faster? The DMax claim, on a small model.

    python benchmarks/oput.py [--base_steps N] [--tune_steps M] [--seed S] [--threshold T] [--out results.json]

From one MDLM checkpoint trained on trajectory data, fine-tune three copies for the same
number of steps: with OPUT, with plain MDLM, and with OPUT's block diffusion without the
on-policy rollout (`on_policy_ratio=0`, the ablation). Decode every validation question of
the four models with SPD (greedy, threshold 0.5, blocks of 32) and with one-token-per-step
remasking (the MDLM models only), and report tokens per forward, final-answer accuracy
against the reference response, the share of answers in the response's shape, and
generative perplexity under an AR model trained on the same data. Data: the
DMax-layout sample in ../shared/data/dmax when present, else generated arithmetic
trajectories.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import os
import pathlib
import platform
import random
import re
import sys
import tempfile

import jax
import numpy as np
from _common import emit, latest, run
from tokenizers import Tokenizer

from evals import decoders, quality
from evals.decoders.common import generated_lengths
from evals.config import SamplingConfig
from trainer import data

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "dmax" / "trajectories-sample.jsonl"
MODEL = ["model.hidden=128", "model.layers=4", "model.heads=4", "model.mlp_hidden=352", "model.max_seq_len=256",
         "data.seq_len=128", "train.global_batch=16", "optim.lr=2e-3", "optim.warmup_steps=30",
         "wandb.mode=disabled", "train.log_every=10"]


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
    run("-m", "trainer", f"run_dir={run_dir}", *MODEL, *overrides)


ANSWER = re.compile(r"answer is\s*(-?\d+)")
WELL_FORMED = re.compile(r"\S.*\nThe answer is -?\d+\.", re.DOTALL)  # the trajectories' response shape


def questions(data_path: str, tokenizer: Tokenizer, limit: int = 0) -> dict[int, tuple[np.ndarray, list[str]]]:
    """The first `limit` (0: all) validation prompts grouped by length (SPD decodes equal-length
    prompts), each group with the reference answers' final numbers ("" where the response has none)."""
    groups = collections.defaultdict(list)
    docs = data.documents(data_path, data.load_manifest(data_path), "validation")
    for doc in itertools.islice(docs, limit or None):
        prompt_len = int(doc["prompt_len"])
        groups[prompt_len].append((doc["tokens"][:prompt_len], quality.final_number(tokenizer.decode(
            doc["tokens"][prompt_len:].tolist()))))
    return {length: (np.stack([p for p, _ in rows]).astype(np.int32), [a for _, a in rows])
            for length, rows in sorted(groups.items())}


def final_answer(text: str) -> str:
    found = ANSWER.findall(text)
    return found[-1] if found else ""


def decode_all(sampler: str, model, groups, cfg: SamplingConfig, ids, reference, tokenizer) -> dict:
    """Every question decoded; each sequence is charged the forwards it needed (as if decoded alone)."""
    tokens = charged = correct = well_formed = 0
    nll = 0.0
    texts = []
    for prompt_len, (prompt, answers) in groups.items():
        out = decoders.generate(sampler, *model, prompt, cfg, ids["mask"], ids["eos"], jax.random.key(0))
        lengths = generated_lengths(out, prompt_len, ids["eos"])
        nll += float(quality.generated_nll(*reference, out.tokens, prompt_len, lengths).sum())
        tokens += int(lengths.sum())
        charged += int(out.forwards.sum())
        for row, answer in zip(out.tokens, answers):
            text = tokenizer.decode(row[prompt_len:].tolist())
            correct += bool(answer) and final_answer(text) == answer
            well_formed += bool(WELL_FORMED.fullmatch(text.strip()))
            texts.append(text)
    questions_count = sum(len(p) for p, _ in groups.values())
    return {
        "tokens_per_forward": round(tokens / charged, 3),
        "mean_length": round(tokens / questions_count, 2),
        "gen_ppl": round(math.exp(nll / tokens), 3),
        "accuracy": round(correct / questions_count, 3),
        "well_formed": round(well_formed / questions_count, 3),
        "samples": texts[:2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_steps", type=int, default=400, help="MDLM steps of the shared start.")
    parser.add_argument("--tune_steps", type=int, default=150, help="Fine-tuning steps of each copy.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every training run (init, data, noise).")
    parser.add_argument("--threshold", type=float, default=0.5, help="SPD confidence threshold.")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = trajectories(f"{tmp}/rows.jsonl")
        run("-m", "pipelines.preprocess", "--dataset", "dmax_trajectories", "--input", rows, "--output",
            f"{tmp}/data", "--vocab_size", "1024", "--validation_fraction", "0.1")
        common = [f"data.path={tmp}/data", f"seed={args.seed}"]
        train(f"{tmp}/base", *common, f"train.steps={args.base_steps}", f"train.checkpoint_every={args.base_steps}")
        train(f"{tmp}/ar", *common, "objective.name=ar", f"train.steps={args.base_steps}",
              f"train.checkpoint_every={args.base_steps}")
        tune = [*common, f"train.steps={args.tune_steps}", f"train.checkpoint_every={args.tune_steps}",
                f"train.init_from_run={tmp}/base"]
        oput = ["objective.name=oput", "objective.block_size=32", "objective.noise_range_low=0.75",
                "objective.noise_range_high=0.75"]
        train(f"{tmp}/oput", *tune, *oput)
        train(f"{tmp}/block", *tune, *oput, "objective.on_policy_ratio=0")
        train(f"{tmp}/mdlm", *tune)
        manifest = data.load_manifest(f"{tmp}/data")
        ids = data.special_ids(manifest)
        tokenizer = Tokenizer.from_file(f"{tmp}/data/{manifest['tokenizer']['file']}")
        groups = questions(f"{tmp}/data", tokenizer)
        reference = latest(f"{tmp}/ar")[1]
        cfg = SamplingConfig(gen_length=64, block_length=32, steps=32, threshold=args.threshold, top_k=1,
                             remask_steps=64)
        results = {}
        for name in ("base", "mdlm", "block", "oput"):
            model = latest(f"{tmp}/{name}")[1]
            # Remasking attends bidirectionally over the whole sequence: the MDLM models' training
            # view, not the block-causal one of block diffusion, so it is their baseline only.
            samplers = {"spd": "spd_cached", **({"remask": "remask"} if name in ("base", "mdlm") else {})}
            results[name] = {label: decode_all(sampler, model, groups, cfg, ids, reference, tokenizer)
                             for label, sampler in samplers.items()}
    spd = {name: row["spd"] for name, row in results.items()}
    report = {
        "benchmark": "oput",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {jax.devices()[0].device_kind}",
        "data": "shared DMax sample" if SHARED.exists() else "generated arithmetic trajectories",
        "seed": args.seed, "base_steps": args.base_steps, "tune_steps": args.tune_steps,
        "questions": sum(len(p) for p, _ in groups.values()),
        "spd": dict(threshold=args.threshold, block=32, top_k=1), "remask": dict(steps=64, block=32),
        "results": results,
        "tokens_per_forward_oput_over_mdlm": round(spd["oput"]["tokens_per_forward"]
                                                   / spd["mdlm"]["tokens_per_forward"], 3),
        "gen_ppl_oput_over_mdlm": round(spd["oput"]["gen_ppl"] / spd["mdlm"]["gen_ppl"], 3),
        "accuracy_oput_minus_mdlm": round(spd["oput"]["accuracy"] - spd["mdlm"]["accuracy"], 3),
        "tokens_per_forward_oput_over_block": round(spd["oput"]["tokens_per_forward"]
                                                    / spd["block"]["tokens_per_forward"], 3),
        "gen_ppl_oput_over_block": round(spd["oput"]["gen_ppl"] / spd["block"]["gen_ppl"], 3),
    }
    emit(report, args.out)


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
    main()
