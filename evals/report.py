"""RUN/evals/report.html: self-contained (no network) view of the ledger."""

from __future__ import annotations

import html
from typing import Any

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}.sample{white-space:pre-wrap;background:#fafafa;border-left:3px solid #888;padding:6px}
.tok{display:inline-block;margin:1px;padding:1px 3px;border-radius:3px;font-family:monospace}
"""


def _plot(points: list[tuple[int, float]], label: str) -> str:
    if not points:
        return "<p>No perplexity yet.</p>"
    width, height, pad = 640, 240, 40
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    lo, hi = min(values), max(values)
    span_s, span_v = max(max(steps) - min(steps), 1), max(hi - lo, 1e-9)
    xy = [(pad + (s - min(steps)) / span_s * (width - 2 * pad), height - pad - (v - lo) / span_v * (height - 2 * pad))
          for s, v in points]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3"><title>step {s}: {v:.3f}</title></circle>'
                   for (x, y), (s, v) in zip(xy, points))
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="{label} vs step">'
            f'<polyline points="{line}" fill="none" stroke="#36c" stroke-width="2"/>{dots}'
            f'<text x="{pad}" y="15">{label}: {hi:.2f} (max) to {lo:.2f} (min)</text>'
            f'<text x="{pad}" y="{height - 10}">step {min(steps)}</text>'
            f'<text x="{width - pad}" y="{height - 10}" text-anchor="end">step {max(steps)}</text></svg>')


def _sampler_table(samplers: dict[str, dict[str, Any]]) -> str:
    columns = ["nfe", "tokens_per_forward", "tokens_per_s", "mean_length", "gen_ppl", "distinct_2"]
    head = "".join(f"<th>{c}</th>" for c in ["sampler", *columns])
    rows = "".join(
        "<tr><th>" + html.escape(name) + "</th>"
        + "".join(f"<td>{_fmt(m.get(c))}</td>" for c in columns) + "</tr>"
        for name, m in samplers.items())
    return f"<table><tr>{head}</tr>{rows}</table>"


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if isinstance(value, float) else f"{value:,}"


def _trace(trace: dict[str, Any]) -> str:
    """Each generated token coloured by the forward pass that first fixed it; revisions in the tooltip."""
    last = max(trace["decoded_at"]) or 1
    cells = []
    for token, at, revised in zip(trace["tokens"], trace["decoded_at"], trace["revisions"]):
        if at == 0:
            style, title = "background:#ddd", "prompt"
        else:
            hue = int(240 * (1 - at / last))
            style, title = f"background:hsl({hue},70%,80%)", f"fixed at pass {at}, revised {revised}x"
        cells.append(f'<span class="tok" style="{style}" title="{title}">{html.escape(token)}</span>')
    return ("<p>Colour = the pass that first decoded the token (blue early, red late; grey = prompt); "
            "hover for the pass and how often a draft was revised.</p>" + "".join(cells))


def render(records: list[dict[str, Any]], run_dir: str) -> str:
    records = sorted(records, key=lambda r: r["step"])
    metric = "ppl_bound" if any("ppl_bound" in r["perplexity"] for r in records) else "ar_ppl"
    points = [(r["step"], r["perplexity"][metric]) for r in records if metric in r["perplexity"]]
    parts = [f"<h1>Evaluation of {html.escape(run_dir)}</h1>",
             f"<h2>Validation {metric} vs step</h2>", _plot(points, metric)]
    latest = records[-1] if records else None
    if latest and latest.get("samplers"):
        parts += [f"<h2>Samplers at step {latest['step']}</h2>", _sampler_table(latest["samplers"])]
        by_sampler = latest.get("samples_by_sampler") or {"spd": latest["samples"]}
        for name, samples in by_sampler.items():
            parts += [f"<h2>Latest samples: {html.escape(name)}</h2>",
                      *[f'<div class="sample">{html.escape(s)}</div>' for s in samples]]
        if latest.get("trace"):
            parts += ["<h2>Draft and polish: one SPD sample, pass by pass</h2>", _trace(latest["trace"])]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>evals</title><style>{_STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
