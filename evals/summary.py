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

from evals import decoders, ledger


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


def text(run_dir: str) -> str:
    """The latest evaluated step of a run as a plain-text table."""
    records = [r for r in ledger.Ledger(run_dir).records() if "error" not in r]
    if not records:
        return f"{run_dir}: not evaluated yet"
    latest = records[-1]
    ppl = latest["perplexity"]
    bound = ", ".join(f"{k} {v:.3f}" for k, v in ppl.items() if k in ("ppl_bound", "ar_ppl"))
    reference = latest.get("quality_reference") or {}
    lines = [f"{run_dir} step {latest['step']} ({latest['objective']}): {bound}"]
    if isinstance(reference, dict) and reference.get("gen_ppl") is not None:
        lines.append(f"  quality reference: {reference['sampler']} of {reference['run_dir']} step {reference['step']}, "
                     f"gen-ppl {reference['gen_ppl']:.3f}")
    for row in sampler_rows(latest):
        quality = (f"gen-ppl {row['gen_ppl']:.3f}{_interval(row, 'gen_ppl')}"
                   f" = {row['gen_ppl_vs_reference']:.2f}x reference" if "gen_ppl_vs_reference" in row else
                   f"gen-ppl {row['gen_ppl']:.3f}" if "gen_ppl" in row else "no judge")
        lines.append(f"  {row['label']:<36} {row['tokens_per_forward']:.2f}{_interval(row, 'tokens_per_forward')} "
                     f"tokens/forward, {quality}, distinct-2 {row['distinct_2']:.3f} "
                     f"({row.get('sequences', '?')} prompts)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.summary", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="Run directories evaluated by python -m evals")
    args = parser.parse_args(argv)
    print("\n".join(text(run_dir) for run_dir in args.run_dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
