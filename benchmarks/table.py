"""The README's benchmark table, rendered from benchmarks/latest.json (never typed by hand).

    python benchmarks/table.py           # rewrite the table between the README's markers
    python benchmarks/table.py --check   # exit 1 when the README's table is not what latest.json gives
"""

from __future__ import annotations

import argparse
import json
import statistics
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- benchmarks:begin (python benchmarks/table.py) -->", "<!-- benchmarks:end -->"
Row = tuple[str, str, str, str]  # benchmark, figure, baseline, ratio


def _m(x: float) -> str:
    return f"{x / 1e6:.2f}M"


def preprocess(r: dict) -> list[Row]:
    raw = r["raw_encode_batch_tokens_per_s"]
    rows = [(f"preprocess, {n.split('_')[1]} worker(s), {_m(r['input_tokens_1x'])} tokens",
             f"{_m(job['tokens_per_s'])} tokens/s", f"`{r.get('raw_path', 'encode_batch')}` {_m(raw)} tokens/s",
             f"{job['ratio_vs_raw_encode_batch']}") for n, job in r["job"].items()]
    rss = r["peak_rss_mib"]
    return rows + [("preprocess peak RSS, 1x -> 4x input", f"{rss['1x']:.0f} -> {rss['4x']:.0f} MiB", "",
                    f"{rss['ratio_4x_vs_1x']}")]


def train_step(r: dict) -> list[Row]:
    peak = f"fp32 matmul {r['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s"
    rows = [(f"train step, {name} ({c['params_m']}M params, {c['tokens_per_step']} tokens/step)",
             f"{c['model_flops_per_s'] / 1e9:.0f} GFLOP/s", peak, f"{c['mfu_vs_measured_matmul']}")
            for name, c in r["configs"].items()]
    rows += loader(r["loader"])
    scaling = r["device_scaling"]
    rows.append(("tiny train step on 4 simulated devices (fsdp)", f"{scaling['devices_4_tokens_per_s']} tokens/s",
                 f"1 device {scaling['devices_1_tokens_per_s']} tokens/s", f"{scaling['ratio_4_vs_1']}"))
    return rows


def loader(r: dict) -> list[Row]:
    workers = sorted(int(k.rsplit("_", 1)[1]) for k in r if k.startswith("grain_packed_tokens_per_s_workers_"))
    rates = " / ".join(_m(r[f"grain_packed_tokens_per_s_workers_{w}"]) for w in workers)
    label = f"Grain packed batches, {' / '.join(map(str, workers))} workers"
    rows = [(label, f"{rates} tokens/s", f"raw ArrayRecord bulk read {_m(r['raw_arrayrecord_tokens_per_s'])} tokens/s",
             " / ".join(str(r[f"ratio_workers_{w}"]) for w in workers))]
    baselines = {"numpy_packed": "numpy first-fit packer", "same_packer": "the loader's packer without Grain"}
    rows += [(label, f"{rates} tokens/s", f"{name} {_m(r[f'{key}_tokens_per_s'])} tokens/s",
              " / ".join(str(r[f"ratio_vs_{key}_workers_{w}"]) for w in workers))
             for key, name in baselines.items() if f"{key}_tokens_per_s" in r]
    if "loader_processes_per_8_chip_host" in r:
        rows.append(("loader processes for the seed config on an 8-chip host",
                     str(r["loader_processes_per_8_chip_host"]),
                     f"{_m(r['seed_host_tokens_per_s'])} tokens/s (8 chips at 45% MFU)", ""))
    return rows


def device(r: dict) -> list[Row]:
    """benchmarks/device.sh on an accelerator: the seed-shaped step per objective and shape, cached
    decoding per forward against a bare forward, the 4-worker loader."""
    train = r["train_step"]
    peak = f"peak {train['peak_flops_per_s'] / 1e12:.0f} TFLOP/s ({train['peak_source']})"
    rows = [(f"device {r['chip']}: seed-shaped train step, {name} ({c.get('attention', '')}, remat {train['remat']})",
             c.get("error") or f"{c['tokens_per_s']} tokens/s, {c['step_seconds']} s/step, compile "
                               f"{c['compile_seconds']} s, {c.get('device_peak_gib', c.get('xla_memory_gib'))} GiB",
             peak, "" if "error" in c else f"MFU {c['mfu']} (executed {c['mfu_executed']})")
            for name, c in train["configs"].items()]
    for batch, row in ((k, v) for k, v in r["decoding"].items() if k.startswith("batch_")):
        rows += [(f"device {r['chip']}: {name} decoding, {batch.replace('_', ' ')}",
                  f"{row[name]['ms_per_forward']} ms/forward, {row[name]['tokens_per_s']} tokens/s",
                  f"bare forward {row['bare_forward_ms']} ms", f"{row[name]['per_forward_vs_bare']}")
                 for name in ("spd_cached", "one_token")]
    return rows + [(f"device {r['chip']}: {label}", figure, base, ratio) for label, figure, base, ratio
                   in loader(r["loader"])]


def _spread(value: dict | float, digits: int = 2) -> str:
    if isinstance(value, dict):
        return f"{value['median']:.{digits}f} [{value['min']:.{digits}f}, {value['max']:.{digits}f}]"
    return f"{value:.{digits}f}"


EXACT = {"story_correctness": "correct", "accuracy": "accuracy"}  # decoding's exact measures, as the table names them


def decoding(r: dict) -> list[Row]:
    """Per model and decoder (the fastest threshold that keeps the base's quality where one does):
    tokens per forward and quality, median [min, max] over the seeds; the goals per seed."""
    if "skipped" in r:
        return [(f"decoding ({r.get('corpus', 'shared')} corpus)", "skipped", r["skipped"], "")]
    summary, corpus, real = r["summary"], r["corpus"], r["real_continuations"]
    rows = []
    for model, table in summary.items():
        for name, row in table["rows"].items():
            if "@" in name and name.split("@")[1] != "0.9" and model != "oput":
                continue  # the base's and MDLM's parallel decoders at the default threshold only
            exact = "".join(f", {label} {_spread(row[key])}" for key, label in EXACT.items() if key in row)
            rows.append((f"decoding ({corpus}): {model} {name}" + (f", {table['seeds']} seeds" if "seeds" in table else ""),
                         f"{_spread(row['tokens_per_forward'])} tokens/forward{exact}, distinct-2 "
                         f"{_spread(row['distinct_2'], 3)}",
                         f"real continuations: distinct-2 {real['distinct_2']:.3f}" if real else "", ""))
    goals = r["goals"]
    if "skipped" in goals:
        return rows + [(f"decoding ({corpus}) goals", "skipped", goals["skipped"], "")] + _overhead(r)
    base = goals["base_threshold_at_its_quality"]["tokens_per_forward_per_seed"]
    for sampler in ("threshold", "spd_cached"):
        goal = goals[f"oput_{sampler}"]
        rows.append((f"decoding ({corpus}) goal: {goal['goal']}",
                     f"median {goal['median']:.2f} tokens/forward, per seed "
                     + ", ".join(f"{v:.2f}" for v in goal["tokens_per_forward_per_seed"]),
                     "base threshold at its quality, per seed " + ", ".join(f"{v:.2f}" for v in base),
                     f"{goal['vs_base_threshold_median']} ({'met' if goal['met'] else 'not met'})"))
    rows += _overhead(r)
    for name, row in r.get("ablation", {}).items():
        rows.append((f"OPUT ablation ({corpus}): {name}", f"bound {row['ppl_bound']:.2f}, threshold "
                     f"{row['threshold_tokens_per_forward_at_base_quality']:.2f} / SPD "
                     f"{row['spd_cached_tokens_per_forward_at_base_quality']:.2f} tokens/forward at the base's quality",
                     "one-token correctness vs the base's",
                     f"{row['one_token_vs_base'].get('story_correctness_vs_reference', '-')}"))
    return rows


def ceiling(r: dict) -> list[Row]:
    """Per corpus, the tokens per forward a model as sure as its AR twin reaches at most, per threshold."""
    rows = []
    for corpus, c in r["results"].items():
        keys = sorted((k for k in c if k.startswith("threshold_")), key=lambda k: -float(k.split("_")[1]))
        rows.append((f"decoding ceiling ({corpus}, blocks of {c['block']}): a model as sure as its AR twin "
                     f"({r['ar_steps']} steps), {c['documents']} held-out documents",
                     " / ".join(f"{c[k]['tokens_per_forward_ceiling']:.2f}" for k in keys)
                     + " tokens/forward at threshold " + " / ".join(k.split("_")[1] for k in keys),
                     " / ".join(f"{c[k]['unsure_per_document']:.1f}" for k in keys)
                     + f" unsure positions in {c[keys[0]]['generated_per_document']:.0f} generated tokens", ""))
    return rows


def _overhead(r: dict) -> list[Row]:
    overhead = r.get("decoder_overhead")
    if not overhead:
        return []
    return [(f"decoding ({r['corpus']}): cached decoder time per forward vs a bare forward (worst of batch 1 / "
             f"{[k for k in overhead if k.startswith('batch_')][-1][6:]}, one_token and spd_cached)",
             f"{overhead['worst_vs_bare']}x", "goal <= 1.25x", "met" if overhead["met"] else "not met")]


def quality(r: dict) -> list[Row]:
    if "skipped" in r:
        return [("equal-budget perplexity", "skipped", r["skipped"], "")]
    ar = r["results"]["ar"]["perplexity"]
    return [(f"equal-budget validation perplexity ({r['steps']} steps), {name}",
             f"{'<= ' if row['kind'] == 'bound' else ''}{row['perplexity']:.2f}", f"AR {ar:.2f}", f"{row['vs_ar']}")
            for name, row in r["results"].items() if name != "ar"]


def oput(r: dict) -> list[Row]:
    spd = {name: row["spd"] for name, row in r["results"].items()}
    return [
        ("OPUT on DMax data: SPD tokens/forward, OPUT vs plain MDLM fine-tune",
         f"{spd['oput']['tokens_per_forward']}", f"{spd['mdlm']['tokens_per_forward']}",
         f"{r['tokens_per_forward_oput_over_mdlm']}"),
        ("OPUT on DMax data: SPD gen-ppl, OPUT vs plain MDLM fine-tune", f"{spd['oput']['gen_ppl']}",
         f"{spd['mdlm']['gen_ppl']}", f"{r['gen_ppl_oput_over_mdlm']}"),
        ("OPUT on DMax data: SPD tokens/forward, OPUT vs no rollout", f"{spd['oput']['tokens_per_forward']}",
         f"{spd['block']['tokens_per_forward']}", f"{r['tokens_per_forward_oput_over_block']}"),
    ]


def learning(r: dict) -> list[Row]:
    """Steps to each story-correctness level per arm and seed, against the AR twin's; the last
    evaluated step's correctness."""
    rows = []
    ar = r["steps_to"].get("ar", {})
    stories = f"{r.get('gen_length', 64)}-token"  # runs before --gen_length generated 64 tokens
    for name, levels in r["steps_to"].items():
        for level, steps in levels.items():
            ratio = r["vs_ar"].get(name, {}).get(level, {}).get("median")
            rows.append((f"learning: {name}, steps to {stories} story correctness >= {level} ({r['seeds']} seeds)",
                         ", ".join("-" if s is None else str(s) for s in steps),
                         "AR " + ", ".join("-" if s is None else str(s) for s in ar.get(level, [])) if name != "ar" else "",
                         "" if name == "ar" else ("not reached" if ratio is None else f"{ratio:.2f}")))
    for name, by_seed in r["curves"].items():
        last = [curve[-1] for curve in by_seed.values()]
        rows.append((f"learning: {name}, {stories} story correctness at step {last[0]['step']}",
                     ", ".join(f"{c['story_correctness']:.2f}" for c in last),
                     "sentence validity " + ", ".join(f"{c['sentence_validity']:.2f}" for c in last), ""))
    return rows


def adaptation(r: dict) -> list[Row]:
    """Each arm's bound and story correctness at N + M total steps against its from-scratch twin's;
    the adapted Dream's steps to its twin's final bound, against the goal of (N + M) / 3."""
    total, seeds = r["ar_steps"] + r["adapt_steps"], r["seeds"]
    twins = {"dream_from_ar": "dream_scratch", "dream_from_ar_lr4e-4": "dream_scratch", "mdlm_from_ar": "mdlm_scratch"}
    last = {name: [curve[-1] for curve in by_seed.values()] for name, by_seed in r["curves"].items()}
    rows = [(f"adaptation: the AR run at {r['ar_steps']} steps, perplexity and story correctness ({seeds} seeds)",
             ", ".join(f"{c['ppl']:.2f}" for c in last["ar"]),
             "story correctness " + ", ".join(f"{c['story_correctness']:.2f}" for c in last["ar"]), "")]
    for name in r["arms"]:
        twin = twins.get(name)
        first = [curve[0] for curve in r["curves"][name].values() if curve[0]["step"] == 0]
        if first:  # results before the step-0 bound have none
            rows.append((f"adaptation: {name}, bound of the AR weights it starts from (step 0)",
                         ", ".join(f"{c['ppl']:.2f}" for c in first), "", ""))
        figure = ", ".join(f"{c['ppl']:.2f}" for c in last[name])
        baseline = f"{twin} " + ", ".join(f"{c['ppl']:.2f}" for c in last[twin]) if twin else ""
        ratio = f"{statistics.median(a['ppl'] / b['ppl'] for a, b in zip(last[name], last[twin])):.3f}" if twin else ""
        rows.append((f"adaptation (AR {r['ar_steps']} + {r['adapt_steps']} steps): {name}, bound at {total} total "
                     f"steps ({seeds} seeds)", figure, baseline, ratio))
        l2r = "" if "l2r_story_correctness" not in last[name][0] else " (left to right: " + ", ".join(
            f"{c['l2r_story_correctness']:.2f}" for c in last[name]) + ")"
        rows.append((f"adaptation: {name}, story correctness at {total} total steps ({r['arms'][name]['decoder']})",
                     ", ".join(f"{c['story_correctness']:.2f}" for c in last[name]) + l2r,
                     "distinct-2 " + ", ".join(f"{c['distinct_2']:.2f}" for c in last[name]), ""))
    within = r["goal"]["dream_reaches_scratch_within_third"]
    reached = r["reaches_scratch_final"]["dream_from_ar"]
    rows.append(("adaptation goal: Dream from AR reaches Dream-from-scratch's final bound within (N + M) / 3 steps",
                 ", ".join("-" if s is None else str(s) for s in reached), f"<= {total / 3:.0f} steps",
                 "met" if all(within) else f"met at {sum(within)} of {seeds} seeds"))
    shift = r["goal"]["shift_beats_no_shift_every_step"]
    rows.append(("adaptation goal: Dream's bound below MDLM's at every step, both from AR",
                 ", ".join("yes" if ok else "no" for ok in shift), "", "met" if all(shift) else
                 f"met at {sum(shift)} of {seeds} seeds"))
    return rows


def editflow(r: dict) -> list[Row]:
    """Edit Flows' final figures per seed (and its variants') beside MDLM's and BD3LM's at the same
    steps and size."""
    f, seeds = r["final"], r["seeds"]

    def each(name, key, digits=2):
        return ", ".join(f"{v:.{digits}f}" for v in f[name][key])

    def ours(key, digits=2):
        return each("editflow", key, digits) + "".join(
            f"; {words} {each(name, key, digits)}" for name, words in
            (("editflow_time", "with t as input"), ("editflow_masks", "from 64 masks")) if name in f)

    rows = []
    for key, label, digits in (("story_correctness", "story correctness", 2),
                               ("sentence_validity", "sentence validity", 2), ("distinct_2", "distinct-2", 2),
                               ("length_tv", "length distance (TV) to the real continuations", 2),
                               ("mean_length", "mean generated length", 1),
                               ("forwards_per_sequence", "forwards per sample", 0)):
        rows.append((f"Edit Flows at {r['steps']} steps: {label} ({seeds} seeds)", ours(key, digits),
                     f"MDLM {each('mdlm', key, digits)}; BD3LM {each('bd3lm', key, digits)}", ""))
    rows.append((f"Edit Flows at {r['steps']} steps: validation exp(loss per token), not a bound", ours("ppl"),
                 f"bounds: MDLM {each('mdlm', 'ppl')}; BD3LM {each('bd3lm', 'ppl')}", ""))
    return rows


def harness_levels(r: dict) -> list[Row]:
    """The harness's diffusion loglikelihood per number of noise levels K."""
    return [(f"harness loglikelihood, {model}, K = {key[2:]} noise levels ({r[model]['requests']} cloze requests)",
             f"stderr {row['mean_stderr_nats']} nats, {row['seconds']} s", "choice at K = 256",
             f"{row['agrees_with_K_256']} agree")
            for model in ("bd3lm", "mdlm") for key, row in r[model].items() if key.startswith("K_")]


RENDER = {"preprocess": preprocess, "train_step": train_step, "decoding": decoding, "decoding_shared": decoding,
          "decoding_arithmetic": decoding, "ceiling": ceiling,
          "quality": quality, "oput": oput, "harness_levels": harness_levels, "learning": learning,
          "adaptation": adaptation, "editflow": editflow}


def render(latest: dict) -> str:
    dates = sorted({r["date"][:10] for r in latest["results"].values() if "date" in r})
    when = f"run {' to '.join(dict.fromkeys([dates[0], dates[-1]]))}" if dates else latest["date"]
    lines = [f"From `benchmarks/latest.json` ({when}, {latest['machine']}"
             f"{', quick' if latest.get('quick') else ''}):", "",
             "| benchmark | figure | baseline | ratio |", "|---|---|---|---|"]
    for name, result in latest["results"].items():
        if "error" in result:
            lines.append(f"| {name} | failed | {' '.join(result['error'])} | |")
            continue
        lines += [f"| {' | '.join(cells)} |" for cells in RENDER[name](result)]
    if "device" in latest:
        lines += [f"| {' | '.join(cells)} |" for cells in device(latest["device"])]
    return "\n".join(lines)


def readme_table(readme: str) -> str:
    return readme[readme.index(BEGIN) + len(BEGIN):readme.index(END)].strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Only compare; exit 1 when they differ.")
    args = parser.parse_args()
    table = render(json.loads((ROOT / "benchmarks" / "latest.json").read_text()))
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text()
    if args.check:
        return 0 if readme_table(readme) == table else 1
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    readme_path.write_text(f"{readme[:start]}\n{table}\n{readme[end:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
