"""What a run's latest evaluation says, one row per decoder: the report's table and the summary a
recipe prints at its end.

    python -m evals.summary RUN [RUN ...]

A decoder and its cached twin (spd and spd_cached) give the same tokens by construction: they
appear as one row, with the share of tokens on which the two programs agreed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from evals import decoders, ledger, perplexity, quality


def sampler_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per decoder of a ledger record: its metrics, its label and, for a pair of twins,
    their agreement (the uncached twin's own row is folded into the cached one's)."""
    samplers = record.get("samplers", {})
    folded, rows = {}, []
    for name, metrics in samplers.items():
        decoder = decoders.registry.REGISTRY.entries.get(decoders.parse(name)[0])  # a ledger may name retired ones
        twin = decoder and decoder.cached_twin
        twin_spec = twin and name.replace(decoders.parse(name)[0], twin, 1)
        if twin_spec in samplers:
            folded[twin_spec] = (name, metrics.get(f"agreement_with_{twin}"))
    for name, metrics in samplers.items():
        if name in {uncached for uncached, _ in folded.values()}:
            continue
        label = name
        if name in folded:
            uncached, agreement = folded[name]
            label += f" (= {uncached}" + ("" if agreement is None else f", {agreement:.0%} agreement") + ")"
        rows.append({"name": name, "label": label, **metrics})
    return rows


def _interval(metrics: dict[str, Any], key: str) -> str:
    low, high = metrics.get(f"{key}_interval", (None, None))
    return "" if low is None else f" [{low:.2f}, {high:.2f}]"


def _versus(metrics: dict[str, Any], key: str) -> str:
    ratio = metrics.get(f"{key}_vs_reference")
    return "" if ratio is None else f" = {ratio:.2f}x"


def quality_text(row: dict[str, Any]) -> str:
    """A decoder's quality in words: exact correctness where the data has a checker, diversity,
    gen-ppl (secondary), and whether it writes at the reference's quality."""
    parts = []
    if "story_correctness" in row:
        parts.append(f"correct {row['story_correctness']:.2f}{_interval(row, 'story_correctness')}"
                     f"{_versus(row, 'story_correctness')}, sentences {row['sentence_validity']:.2f}")
    if "distinct_continuations" in row:
        parts.append(f"distinct {row['distinct_continuations']:.2f}{_versus(row, 'distinct_continuations')}, "
                     f"distinct-2 {row['distinct_2']:.3f}{_versus(row, 'distinct_2')}, "
                     f"entropy {row['unigram_entropy']:.2f} bits")
    else:  # a record of an evaluator before the diversity figures
        parts.append(f"distinct-2 {row['distinct_2']:.3f}")
    if "gen_ppl" in row:
        parts.append(f"gen-ppl {row['gen_ppl']:.2f}{_interval(row, 'gen_ppl')}{_versus(row, 'gen_ppl')}")
    if "at_reference_quality" in row:
        parts.append("at reference quality" if row["at_reference_quality"] else "below reference quality")
    return " | ".join(parts)


def text(run_dir: str) -> str:
    """The latest evaluated step of a run as a plain-text table: per decoder, tokens per forward
    and quality, with the real continuations' figures to read diversity against."""
    records = [r for r in ledger.Ledger(run_dir).records() if "error" not in r]
    if not records:
        return f"{run_dir}: not evaluated yet"
    latest = records[-1]
    ppl = latest["perplexity"]
    bound = ", ".join(f"{k} {v:.3f}" for k, v in ppl.items() if k in perplexity.FIGURES)
    reference = latest.get("quality_reference") or {}
    lines = [f"{run_dir} step {latest['step']} ({latest['objective']}): {bound}"]
    if isinstance(reference, dict) and reference.get("sampler"):
        figures = ", ".join(f"{key} {reference[key]:.3f}" for key in quality.REFERENCE_KEYS
                            if reference.get(key) is not None)
        lines.append(f"  quality reference: {reference['sampler']} of {reference['run_dir']} step {reference['step']}"
                     f" ({figures})")
    for row in sampler_rows(latest):
        lines.append(f"  {row['label']:<36} {row['tokens_per_forward']:.2f}{_interval(row, 'tokens_per_forward')} "
                     f"tokens/forward | {quality_text(row)} ({row.get('sequences', '?')} prompts)")
    real = latest.get("real_continuations")
    if real:
        lines.append(f"  {'real continuations':<36} {'':<33}| {quality_text(real)}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.summary", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="Run directories evaluated by python -m evals")
    args = parser.parse_args(argv)
    print("\n".join(text(run_dir) for run_dir in args.run_dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
