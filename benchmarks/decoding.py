"""The speed/quality frontier of decoding: DMax's recipe against its base model and MDLM.

    python benchmarks/decoding.py [--corpus generated|shared|arithmetic] [--seeds 3] [--out results.json] [--svg F]

Runs DMax's recipe (recipes/dmax.sh) on a corpus, the quickstart's 5,000 generated stories, the
real TinyStories sample in ../shared/data (skipped with a reason when absent) or 5,000 built-in
arithmetic word problems (pipelines/arithmetic.py; DMax's kind of task), at --seeds seeds:
each trains a block-diffusion base model (`configs/tinystories_tiny_bd3lm.yaml`), lets it answer
--prompts train prompts (on the generated corpus as the quickstart does: sampled at temperature 1,
only the answers the grammar accepts kept; on arithmetic greedy, only answers ending on the record's final
number kept), and fine-tunes it with OPUT on its own answers; one AR twin (seed 0's)
judges them all. The tiny MDLM model of the same shape is the stories' reference. Every model then
decodes the same prompts (the first 16 tokens of held-out documents; on arithmetic the held-out
questions, accuracy being the exact match of the final number) for exactly --gen_length tokens with
the decoders that fit its objective, the threshold decoders at each of --thresholds. Per row:
tokens per forward per sequence (as if decoded alone), tokens/s of the batch, story correctness
and sentence validity (every sample parsed against the generated corpus's grammar; absent on the
shared corpus), distinct continuations, distinct-2, unigram entropy, generative perplexity under
the AR judge (secondary) and mean length, with 90% bootstrap intervals over the prompts; the
summary gives min / median / max over the seeds. A row is at the base's quality when its story
correctness (accuracy) is >= 0.95x and its distinct continuations and distinct-2 >= 0.9x the base's one-token
decoding's (evals/quality.py). Goals (each OPUT model against its own base, median over the
seeds): OPUT's threshold and SPD decoding at the base's quality at >= 3 tokens per forward and
>= 2x what the base's own threshold decoder commits at its quality (DMax: 2.7x). Also (on stories): the
cached decoders' time per forward against a bare forward of the same model and cache shape (goal
<= 1.25x), and an ablation of OPUT fine-tunes from seed 0's base with one setting changed each, of
the fine-tune or of the trajectories it learns from (--ablation, on by default): the validation
bound, one-token quality and speeds at the base's quality. The frontier (tokens per forward vs story correctness or accuracy, one curve per model and decoder)
is written as SVG.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile

import jax
import numpy as np
from _common import ROOT, bare_forward_seconds, emit, latest, run
from oput import questions
from tokenizers import Tokenizer

from evals import decoders, perplexity, quality, report
from evals.decoders.common import generated_lengths
from evals import runs as runs_lib
from evals.config import PerplexityConfig, SamplingConfig
from pipelines import arithmetic
from trainer import data

SHARED = ROOT.parent / "shared" / "data" / "tinystories" / "TinyStoriesV2-GPT4-valid.sample-a.txt"
PROMPT_LEN = 16


def prepare_data(tmp: str, corpus: str) -> str:
    """The corpus preprocessed into `tmp`/data (its path): 5,000 generated stories, the real
    TinyStories sample, or 5,000 arithmetic problems of which 5% are held out (the questions decoded)."""
    if corpus == "arithmetic":
        source = pathlib.Path(f"{tmp}/problems.jsonl")
        source.write_text("".join(json.dumps(row) + "\n" for row in arithmetic.generate_problems(5000, seed=0)))
        run("-m", "pipelines.preprocess", "--dataset", "dmax_trajectories", "--input", str(source), "--output",
            f"{tmp}/data", "--vocab_size", "512", "--num_shards", "4", "--validation_fraction", "0.05")
    else:
        source = f"{tmp}/stories.txt" if corpus == "generated" else str(SHARED)
        if corpus == "generated":
            run("-m", "pipelines.corpus", "--output", source, "--num_stories", "5000", "--seed", "0")
        run("-m", "pipelines.preprocess", "--dataset", "tinystories", "--input", source, "--output",
            f"{tmp}/data", "--vocab_size", "4096", "--num_shards", "4")
    return f"{tmp}/data"


def make_runs(tmp: str, args) -> dict[str, str]:
    """The recipe at each seed (its base, trajectories and OPUT; the AR judge is seed 0's for all)
    and MDLM."""
    prepare_data(tmp, args.corpus)
    runs = {}
    for seed in range(args.seeds):
        recipe = f"{tmp}/recipe_seed{seed}"
        env = {**os.environ, "DATA": f"{tmp}/data", "RUN": recipe, "PYTHON": sys.executable, "EVALS": "0",
               "BASE_STEPS": str(args.steps), "JUDGE_STEPS": str(args.steps), "PROMPTS": str(args.prompts),
               "OPUT_STEPS": str(args.oput_steps), "TRAIN_ARGS": f"wandb.mode=disabled seed={seed}",
               "JUDGE": runs.get("judge", ""),
               "TRAJ_ARGS": " ".join(TRAJ_ARGS[args.corpus])}
        run("bash", "recipes/dmax.sh", env=env)
        runs.setdefault("judge", f"{recipe}/judge")
        runs[f"base_seed{seed}"], runs[f"oput_seed{seed}"] = f"{recipe}/base", f"{recipe}/oput"
    if args.corpus == "arithmetic":  # MDLM is the stories' reference only
        return runs
    runs["mdlm"] = f"{tmp}/mdlm"
    run("-m", "trainer", "--config", "configs/tinystories_tiny.yaml", f"run_dir={runs['mdlm']}",
        f"data.path={tmp}/data", f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}",
        "wandb.mode=disabled")
    return runs


# OPUT fine-tunes of seed 0's base, one setting changed each: of the fine-tune, or (`trajectories.`
# keys) of the trajectories it learns from, made again from the same base: what OPUT's quality, its
# diversity and its speed depend on.
TRAJECTORIES = "trajectories."
SAMPLED_CORRECT = ["sampler=one_token", "sampling.temperature=1.0", "keep=correct"]  # quickstart.sh's TRAJ_ARGS
TRAJ_ARGS = {  # the recipe's trajectories per corpus, where they can be checked only right answers kept
    "generated": SAMPLED_CORRECT,  # sampled, the answers the grammar accepts
    "arithmetic": ["keep=correct"],  # greedy (an answer is right or wrong), the final number the record's
    "shared": [],
}
ABLATION = {
    "recipe": [],
    "greedy trajectories": [f"{TRAJECTORIES}sampler=threshold"],  # the recipe's without TRAJ_ARGS
    # sampled most confident first: one seed made OPUT faster and its answers narrower (README, the quickstart)
    "trajectories by confidence": [f"{TRAJECTORIES}{o}" for o in (*SAMPLED_CORRECT, "sampling.order=confidence")],
    "lr 1e-4": ["optim.lr=1e-4"],
    "no rollout": ["objective.on_policy_ratio=0"],
    "noise 0.3..0.9": ["objective.noise_range_low=0.3", "objective.noise_range_high=0.9"],
}


def ablation_runs(tmp: str, args) -> dict[str, str]:
    """Trains the ABLATION fine-tunes from seed 0's base (after make_runs)."""
    recipe = f"{tmp}/recipe_seed0"
    runs = {}
    for name, overrides in ABLATION.items():
        if name == "recipe":
            runs[name] = f"{recipe}/oput"
            continue
        runs[name] = f"{tmp}/ablation/{name.replace(' ', '_')}"
        rows = [o[len(TRAJECTORIES):] for o in overrides if o.startswith(TRAJECTORIES)]
        overrides = [o for o in overrides if not o.startswith(TRAJECTORIES)]
        trajectories = f"{recipe}/trajectories_data"
        if rows:  # the recipe's trajectories stage again, with these settings
            trajectories = f"{runs[name]}_trajectories_data"
            run("-m", "evals.trajectories", "--run_dir", f"{recipe}/base", "--output", f"{runs[name]}_trajectories",
                f"num_prompts={args.prompts}", *rows)
            index = json.loads(pathlib.Path(f"{runs[name]}_trajectories/trajectories.json").read_text())
            run("-m", "pipelines.preprocess", "--dataset", "dmax_trajectories", "--input",
                f"{runs[name]}_trajectories/part-*", "--output", trajectories, "--tokenizer", f"{tmp}/data/tokenizer.json",
                "--prompt_suffix", index["prompt_suffix"], "--num_shards", "2", "--validation_fraction", "0.05")
        run("-m", "trainer", "--config", "configs/tinystories_tiny_oput.yaml", f"run_dir={runs[name]}",
            f"data.path={trajectories}", f"train.init_from_run={recipe}/base",
            f"train.steps={args.oput_steps}", f"train.checkpoint_every={args.oput_steps}", "wandb.mode=disabled",
            *overrides)
    return runs


def ablation_row(table: dict, bound: float, reference: dict) -> dict:
    """One fine-tune's bound, one-token quality against the base's, and best speeds at its quality."""
    rows = table["rows"]
    return {"ppl_bound": round(bound, 3),
            "one_token_vs_base": {k: round(v, 3) if isinstance(v, float) else v
                                  for k, v in quality.versus_reference(rows["one_token"], reference).items()},
            **{f"{sampler}_tokens_per_forward_at_base_quality": best_at_quality(rows, sampler, reference)[1]
               for sampler in ("threshold", "spd_cached")}}


def story_scorer(prompt, ids, judge, prompts: quality.Prompts):
    """score(spec, model, settings): one decoder's row on the story prompts [N, PROMPT_LEN]."""
    def score(spec: str, model, settings: SamplingConfig) -> dict:
        out = decoders.generate(spec, *model, prompt, settings, ids["mask"], ids["eos"], jax.random.key(0))
        return quality.sampler_metrics(out, PROMPT_LEN, ids["eos"], judge, prompts)
    return score


def answer_scorer(groups: dict, ids, judge, tokenizer: Tokenizer):
    """score(spec, model, settings): one decoder's row on the held-out questions (`groups`: prompt
    length -> (prompts, reference final numbers)): accuracy of the generated final number, with the
    same speed, diversity and gen-ppl columns as the stories'."""
    def score(spec: str, model, settings: SamplingConfig) -> dict:
        lengths, forwards, generated, correct, nll, seconds = [], [], [], [], [], 0.0
        for prompt_len, (prompt, answers) in groups.items():
            out = decoders.generate(spec, *model, prompt, settings, ids["mask"], ids["eos"], jax.random.key(0))
            n = generated_lengths(out, prompt_len, ids["eos"])
            lengths.append(n)
            forwards.append(out.forwards)
            nll.append(quality.generated_nll(*judge, out.tokens, prompt_len, n))
            seconds += out.seconds
            for row, length, answer in zip(out.tokens, n, answers):
                generated.append(row[prompt_len:prompt_len + length])
                correct.append(bool(answer) and quality.final_number(tokenizer.decode(generated[-1].tolist())) == answer)
        lengths, forwards, nll, right = (np.concatenate(lengths), np.concatenate(forwards), np.concatenate(nll),
                                         np.array(correct, float))
        return {"tokens_per_forward": float(lengths.sum() / forwards.sum()),
                "tokens_per_forward_interval": quality.pooled_interval(lengths, forwards),
                "tokens_per_s": float(lengths.sum() / seconds), "mean_length": float(lengths.mean()),
                "sequences": len(lengths), **quality.diversity(generated),
                "accuracy": float(right.mean()), "accuracy_interval": quality.pooled_interval(right, np.ones_like(right)),
                "gen_ppl": float(np.exp(nll.sum() / lengths.sum())),
                "gen_ppl_interval": quality.pooled_interval(nll, lengths, np.exp)}
    return score


def decode_table(run_dir: str, score, thresholds: list[float], gen_length: int, block_length: int = 0) -> dict:
    """Every matched sampler of the run (threshold samplers at each threshold), each scored by
    `score` (story_scorer, answer_scorer), in blocks of `block_length` (0: the run's own)."""
    run_cfg, model = latest(run_dir)
    # A decoder with a cached twin is left out: the twin gives the same tokens, faster.
    names = [n for n in decoders.fitting(run_cfg.objective.name) if decoders.get(n).cached_twin is None]
    base = SamplingConfig(prompt_tokens=PROMPT_LEN, gen_length=gen_length, top_k=1, block_length=block_length)
    _, base = decoders.plan(",".join(names), base, run_cfg)
    rows = {}
    for name in names:
        for spec in [name] if decoders.is_one_token(name, base) else [f"{name}@{t}" for t in thresholds]:
            row = score(spec, model, base)
            row.pop("story_errors", None)
            rows[spec] = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
    return {"objective": run_cfg.objective.name, "block_length": base.block_length, "revise": base.revise,
            "rows": rows}


def decoder_overhead(run_dir: str, prompt, ids, gen_length: int) -> dict:
    """The cached decoders' time per forward against a bare jitted forward of the same model, block
    and KV-cache shape (what the decoding loop adds), at batch 1 and at the prompts' batch; the best
    of three timed runs each."""
    run_cfg, (graphdef, params) = latest(run_dir)
    settings = SamplingConfig(prompt_tokens=PROMPT_LEN, gen_length=gen_length)
    _, settings = decoders.plan("one_token", settings, run_cfg)
    width = settings.block_length
    total = -(-(PROMPT_LEN + gen_length) // width) * width
    result = {}
    for batch in (1, len(prompt)):
        bare = min(bare_forward_seconds(graphdef, params, batch, total, width, repeats=50) for _ in range(3))
        row = {"bare_forward_ms": round(bare * 1e3, 3)}
        for name in ("one_token", "spd_cached@0.9"):
            runs = [decoders.generate(name, graphdef, params, prompt[:batch], settings, ids["mask"], -1,
                                      jax.random.key(0)) for _ in range(3)]  # no EOS: every forward counts
            per_forward = min(r.seconds / r.batch_forwards for r in runs)
            row[name] = {"ms_per_forward": round(per_forward * 1e3, 3), "vs_bare": round(per_forward / bare, 3)}
        result[f"batch_{batch}"] = row
    worst = max(v["vs_bare"] for row in result.values() for v in row.values() if isinstance(v, dict))
    return {**result, "goal": "decoder time per forward <= 1.25x a bare forward", "worst_vs_bare": worst,
            "met": worst <= 1.25}


def spread(tables: list[dict]) -> dict:
    """Per row, min / median / max over the seeds' tables of each figure."""
    rows = {}
    for name in tables[0]["rows"]:
        rows[name] = {key: {"min": min(v), "median": statistics.median(v), "max": max(v)}
                      for key in ("tokens_per_forward", *quality.EXACT_KEYS, "distinct_continuations", "distinct_2",
                                  "gen_ppl", "tokens_per_s")
                      for v in [[t["rows"][name][key] for t in tables if key in t["rows"][name]]] if v}
    return {"objective": tables[0]["objective"], "revise": tables[0]["revise"], "seeds": len(tables), "rows": rows}


def best_at_quality(rows: dict, sampler: str, reference: dict) -> tuple[str | None, float]:
    """(the fastest row of `sampler` at any threshold at the reference's quality, its tokens/forward)."""
    within = {n: r for n, r in rows.items() if n.split("@")[0] == sampler
              and quality.versus_reference(r, reference).get("at_reference_quality")}
    name = max(within, key=lambda n: within[n]["tokens_per_forward"], default=None)
    return name, (within[name]["tokens_per_forward"] if name else 0.0)


def goals(per_seed: dict, seeds: int) -> dict:
    """The recipe's goals, per seed against that seed's base model's one-token decoding, and by the
    median over seeds: OPUT's threshold and SPD decoding at the base's quality at >= 3 tokens per
    forward and >= 2x the tokens per forward of the base's own threshold decoder at its quality."""
    references = [per_seed[f"base_seed{i}"]["rows"]["one_token"] for i in range(seeds)]
    exact = quality.exact_key(references[0])
    if exact is None:
        return {"skipped": "no exact quality measure on this corpus (the grammar checker knows the generated one)"}
    oput = [per_seed[f"oput_seed{i}"]["rows"] for i in range(seeds)]
    base_threshold = [best_at_quality(per_seed[f"base_seed{i}"]["rows"], "threshold", ref)
                      for i, ref in enumerate(references)]
    out = {f"reference_{exact}_per_seed": [r.get(exact) for r in references],
           "base_threshold_at_its_quality": {"best_rows": [n for n, _ in base_threshold],
                                             "tokens_per_forward_per_seed": [t for _, t in base_threshold]},
           "oput_one_token_at_base_quality": [quality.versus_reference(rows["one_token"], ref).get("at_reference_quality")
                                              for rows, ref in zip(oput, references)]}
    for sampler in ("spd_cached", "threshold"):
        per = [best_at_quality(rows, sampler, ref) for rows, ref in zip(oput, references)]
        speeds = [tpf for _, tpf in per]
        gains = [tpf / base if base else 0.0 for tpf, (_, base) in zip(speeds, base_threshold)]
        median, gain = statistics.median(speeds), statistics.median(gains)
        out[f"oput_{sampler}"] = {
            "goal": f"OPUT {sampler} at the base's quality: >= 3 tokens/forward and >= 2x the base's threshold decoder",
            "best_rows": [n for n, _ in per], "tokens_per_forward_per_seed": speeds, "median": median,
            "vs_base_threshold_per_seed": [round(g, 3) for g in gains], "vs_base_threshold_median": round(gain, 3),
            "met": median >= 3.0 and gain >= 2.0}
    return out


def frontier_svg(results: dict) -> str:
    """Tokens per forward against the exact measure (story correctness, or accuracy), else against
    distinct-2 (real TinyStories: collapse shows there, where the judge's gen-ppl would reward it)."""
    series = {}
    key = next((k for k in quality.EXACT_KEYS for table in results.values() for r in table["rows"].values() if k in r),
               "distinct_2")
    for model, table in results.items():
        rows = table["rows"]
        for sampler in sorted({n.split("@")[0] for n in rows}):  # a set's order varies between runs
            points = [(r["tokens_per_forward"], r[key]) for n, r in rows.items()
                      if n.split("@")[0] == sampler and key in r]
            if not points:
                continue
            if isinstance(points[0][0], dict):  # a spread over seeds: plot the medians
                points = [(x["median"], y["median"]) for x, y in points]
            series[f"{model} {sampler}"] = sorted(points)
    return report.plot(series, "tokens per forward (per sequence)", key.replace("_", " "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=("generated", "shared", "arithmetic"), default="generated",
                        help="The generated stories, real TinyStories (../shared/data), or the built-in arithmetic "
                             "word problems (pipelines/arithmetic.py).")
    parser.add_argument("--steps", type=int, default=600,
                        help="Steps of the base, the judge and MDLM (the recipe's: the base then writes mostly correct stories).")
    parser.add_argument("--oput_steps", type=int, default=100, help="Steps of each OPUT fine-tune.")
    parser.add_argument("--prompts", type=int, default=2048, help="Trajectories the base model generates.")
    parser.add_argument("--seeds", type=int, default=3,
                        help="Recipe runs (seeds 0..N-1), each with its own base, trajectories and OPUT fine-tune.")
    parser.add_argument("--eval_prompts", type=int, default=32,
                        help="Held-out prompts decoded per setting (arithmetic: at most this many questions).")
    parser.add_argument("--gen_length", type=int, default=0,
                        help="Tokens generated per prompt (0: 112 after a story's 16 tokens, the trained length; "
                             "64 after a question, past its longest answer).")
    parser.add_argument("--thresholds", default="0.5,0.7,0.9", help="Comma-separated thresholds.")
    parser.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                        help="Also train and decode the OPUT ablation (one setting changed per fine-tune).")
    parser.add_argument("--svg", default=str(ROOT / "benchmarks" / "frontier.svg"), help="Where the plot goes.")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args()
    machine = f"{platform.machine()} {os.cpu_count()} cpus, {jax.devices()[0].device_kind}"
    if args.corpus == "shared" and not SHARED.exists():
        emit({"benchmark": "decoding", "machine": machine, "skipped": f"real TinyStories sample not at {SHARED}"},
             args.out)
        return
    thresholds = [float(t) for t in args.thresholds.split(",")]
    args.gen_length = args.gen_length or (64 if args.corpus == "arithmetic" else 112)
    with tempfile.TemporaryDirectory() as tmp:
        runs = make_runs(tmp, args)
        judge = latest(runs.pop("judge"))[1]
        base_cfg = latest(runs["base_seed0"])[0]
        manifest = data.load_manifest(base_cfg.data.path)
        ids = data.special_ids(manifest)
        tokenizer = runs_lib.tokenizer(base_cfg.data.path, manifest)
        overhead, real = {}, {}
        if args.corpus == "arithmetic":
            score = answer_scorer(questions(base_cfg.data.path, tokenizer, args.eval_prompts), ids, judge, tokenizer)
        else:
            documents = perplexity.prompt_documents(base_cfg, manifest, args.eval_prompts, PROMPT_LEN)
            prompt = perplexity.prompt_rows(documents, PROMPT_LEN)
            prompts = quality.read_prompts(tokenizer, documents, PROMPT_LEN, args.gen_length, ids)
            score, real = story_scorer(prompt, ids, judge, prompts), quality.real_continuations(prompts)
            overhead = decoder_overhead(runs["base_seed0"], prompt, ids, args.gen_length)
        # MDLM, trained without blocks, decodes semi-autoregressively in the base's blocks (its default
        # 32 does not divide the 112 tokens of a whole story).
        tables = {name: decode_table(run_dir, score, thresholds, args.gen_length,
                                     base_cfg.objective.block_size if name == "mdlm" else 0)
                  for name, run_dir in runs.items()}
        ablation = {}
        if args.ablation:
            reference = tables["base_seed0"]["rows"]["one_token"]
            for name, run_dir in ablation_runs(tmp, args).items():
                run_cfg, model = latest(run_dir)
                run_cfg.data.path = base_cfg.data.path  # scored on the text's validation split, like the recipe
                bound = perplexity.evaluate(*model, run_cfg, manifest, PerplexityConfig())["ppl_bound"]
                table = decode_table(run_dir, score, thresholds, args.gen_length)
                ablation[name] = ablation_row(table, bound, reference)
    per_seed = {name: table for name, table in tables.items() if name != "mdlm"}
    summary = {model: spread([per_seed[f"{model}_seed{i}"] for i in range(args.seeds)]) for model in ("base", "oput")}
    if "mdlm" in tables:
        summary["mdlm"] = tables["mdlm"]
    pathlib.Path(args.svg).write_text(frontier_svg(summary))
    emit({"benchmark": "decoding", "machine": machine, "corpus": args.corpus, "steps": args.steps,
          "oput_steps": args.oput_steps, "trajectories": args.prompts, "seeds": args.seeds,
          "eval_prompts": args.eval_prompts, "gen_length": args.gen_length, "thresholds": thresholds,
          "real_continuations": real, "summary": summary, "per_seed": per_seed, "goals": goals(per_seed, args.seeds), "decoder_overhead": overhead,
          "ablation": ablation, "svg": os.path.relpath(args.svg, ROOT)}, args.out)


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
    main()
