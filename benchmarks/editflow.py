"""Edit Flows against MDLM and BD3LM at equal training steps and model size on the built-in corpus.

    python benchmarks/editflow.py [--seeds 3] [--steps 300] [--every 300] [--prompts 64] [--gen_length 96] [--out F]

Trains the tiny model of `configs/tinystories_tiny*.yaml` (same size, data, optimizer and budget)
as Edit Flows (`configs/tinystories_tiny_editflow.yaml`: the trunk plus rate and insertion heads,
inserting the story after its prefix; `editflow_time`: the same with the time as a model input;
`editflow_masks`: from the prefix and 64 masks, the references' prior), MDLM and BD3LM on the quickstart's 5,000 generated stories at --seeds seeds (benchmarks/learning.py
does the training and evaluation). Each checkpoint is decoded after --prompts held-out prompts of 16
tokens with --gen_length (96: 4 in 5 of the real continuations end within it; prompt + 96 fits the
trained 128) forwards per sample: Edit Flows by tau-leaping in that many steps (it chooses the
length, up to --gen_length tokens), MDLM one token per step, BD3LM one token per forward in blocks. Per arm and
seed: story correctness and sentence validity under the corpus's grammar, distinct continuations
and distinct-2, the total-variation distance between the samples' lengths and the real
continuations' (bins of 8 tokens), forwards and tokens per sample, and the validation figure (MDLM,
BD3LM: the perplexity bound; Edit Flows: exp of its loss per token, not a bound and not comparable).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import types

import jax
from _common import emit, run
from learning import ARMS, train_and_evaluate

EDITFLOW_ARMS = {"editflow": ("configs/tinystories_tiny_editflow.yaml", "editflow", []),
                 "editflow_time": ("configs/tinystories_tiny_editflow.yaml", "editflow", ["objective.time_input=true"]),
                 "editflow_masks": ("configs/tinystories_tiny_editflow.yaml", "editflow",
                                    ["objective.prior=masks", "objective.prior_masks=64"]),
                 "mdlm": ARMS["mdlm"], "bd3lm": ARMS["bd3lm"]}
FIGURES = ("story_correctness", "sentence_validity", "distinct_continuations", "distinct_2", "length_tv",
           "mean_length", "forwards_per_sequence", "tokens_per_forward", "ppl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=300, help="checkpoint (and evaluation) interval")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts per evaluation")
    parser.add_argument("--gen_length", type=int, default=96, help="generated positions (and forwards) per sample")
    parser.add_argument("--ppl_tokens", type=int, default=4000, help="validation tokens of each figure")
    parser.add_argument("--workdir", default=None, help="keep the data and runs here (default: a temporary folder)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        tmp = args.workdir or temporary
        run("-m", "pipelines.corpus", "--output", f"{tmp}/stories.txt", "--num_stories", "5000", "--seed", "0")
        run("-m", "pipelines.preprocess", "--dataset", "tinystories", "--input", f"{tmp}/stories.txt", "--output",
            f"{tmp}/data", "--vocab_size", "4096", "--num_shards", "4")
        settings = types.SimpleNamespace(steps=args.steps, every=args.every, prompts=args.prompts,
                                         gen_length=args.gen_length, ppl_tokens=args.ppl_tokens)
        curves = {name: {seed: train_and_evaluate(tmp, f"{tmp}/data", name, arm, seed, settings)
                         for seed in range(args.seeds)} for name, arm in EDITFLOW_ARMS.items()}
    final = {name: {key: [curve[-1][key] for curve in by_seed.values()] for key in FIGURES}
             for name, by_seed in curves.items()}
    emit({"machine": f"{platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s)",
          "steps": args.steps, "every": args.every, "prompts": args.prompts, "gen_length": args.gen_length,
          "seeds": args.seeds,
          "arms": {name: {"config": arm[0], "decoder": arm[1], "overrides": arm[2]}
                   for name, arm in EDITFLOW_ARMS.items()},
          "curves": curves, "final": final,
          "median": {name: {key: statistics.median(values) for key, values in figures.items()}
                     for name, figures in final.items()}}, args.out)


if __name__ == "__main__":
    main()
