"""RUN/evals/report.html: self-contained (no network) view of the ledger."""

from __future__ import annotations

import html
from typing import Any

from evals import perplexity, quality
from evals.summary import sampler_rows

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1250px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f4f4f4}.sample{white-space:pre-wrap;background:#fafafa;border-left:3px solid #888;padding:6px}
.tok{display:inline-block;margin:1px;padding:1px 3px;border-radius:3px;font-family:monospace;white-space:pre}
.mismatched{color:#b00;font-weight:bold}.ok{color:#070}
"""
SHOWN = 4  # samples shown per decoder
_COLOURS = ["#36c", "#d62", "#393", "#939", "#c93", "#099", "#666"]


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


def plot(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, lines: bool = True,
         level: tuple[str, float] | None = None) -> str:
    """An SVG chart of named (x, y) series with labelled axes, tick values and a legend; each
    point's values are in its tooltip. `level`: a labelled horizontal line at a reference value."""
    points = [p for values in series.values() for p in values]
    if not points:
        return "<p>Nothing to plot yet.</p>"
    width, height, left, right, top, bottom = 680, 300, 70, 150, 20, 50
    xs, ys = [x for x, _ in points], [y for _, y in points] + ([level[1]] if level else [])
    x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
    x_span, y_span = (x_hi - x_lo) or 1.0, (y_hi - y_lo) or 1.0
    sx = lambda x: left + (x - x_lo) / x_span * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - (y - y_lo) / y_span * (height - top - bottom)  # noqa: E731
    parts = [f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#444"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#444"/>']
    for x in _ticks(x_lo, x_hi) if x_hi > x_lo else [x_lo]:
        parts.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle" font-size="11">'
                     f'{x:.4g}</text>')
    for y in _ticks(y_lo, y_hi) if y_hi > y_lo else [y_lo]:
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="11">{y:.4g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">'
                 f'{html.escape(x_label)}</text>')
    parts.append(f'<text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + height - bottom) / 2})">{html.escape(y_label)}</text>')
    if level:
        y = sy(level[1])
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#888" '
                     f'stroke-dasharray="5,4"/><text x="{width - right - 4}" y="{y - 4:.1f}" text-anchor="end" '
                     f'font-size="11">{html.escape(level[0])} {level[1]:.4g}</text>')
    for i, (name, values) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        xy = [(sx(x), sy(y)) for x, y in values]
        if lines and len(xy) > 1:
            parts.append(f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in xy)}" fill="none" '
                         f'stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="4" fill="{colour}"><title>{html.escape(name)}: '
                  f'{x_label} {x:.4g}, {y_label} {y:.4g}</title></circle>' for (a, b), (x, y) in zip(xy, values)]
        legend_y = top + 18 * i
        parts.append(f'<rect x="{width - right + 12}" y="{legend_y}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{width - right + 28}" y="{legend_y + 10}" font-size="12">{html.escape(name)}</text>')
    return (f'<svg width="{width}" height="{height}" role="img" '
            f'aria-label="{html.escape(y_label)} vs {html.escape(x_label)}">{"".join(parts)}</svg>')


_COLUMNS = {"tokens per forward": "tokens_per_forward", "story correctness": "story_correctness",
            "x reference": "story_correctness_vs_reference", "sentence validity": "sentence_validity",
            "distinct continuations": "distinct_continuations", "distinct-2": "distinct_2",
            "unigram entropy (bits)": "unigram_entropy", "gen-ppl": "gen_ppl", "gen-ppl x reference": "gen_ppl_vs_reference",
            "at reference quality": "at_reference_quality", "mean length": "mean_length", "tokens/s": "tokens_per_s"}


def _sampler_table(rows: list[dict[str, Any]], reference: dict[str, Any] | None, run_dir: str,
                   real: dict[str, Any] | None) -> str:
    columns = {c: key for c, key in _COLUMNS.items() if any(key in m for m in rows)}  # none the data lacks
    head = "".join(f"<th>{c}</th>" for c in ["decoder", *columns])
    cells = []
    for m in rows:
        label = html.escape(m["label"])
        if reference and reference.get("run_dir") == run_dir and m["name"] == reference.get("sampler"):
            label += " (reference)"
        if m.get("matched") is False:
            label += f' <span class="mismatched">mismatched ({html.escape(str(m.get("attention")))})</span>'
        cells.append(f"<tr><th>{label}</th>" + "".join(f"<td>{_fmt(m.get(key))}{_band(m, key)}</td>"
                                                      for key in columns.values()) + "</tr>")
    if real:
        cells.append("<tr><th>real continuations</th>" + "".join(f"<td>{_fmt(real.get(key))}</td>"
                                                                 for key in columns.values()) + "</tr>")
    where = (f"{reference['sampler']} of {html.escape(str(reference['run_dir']))} at step {reference['step']}"
             if reference and reference.get("sampler") else "none")
    note = ("<p>Per sequence, as if decoded alone: tokens per forward = generated tokens (to the first EOS) / "
            "forwards the sequence needed, KV-cache writes included; [brackets]: 90% bootstrap interval over the "
            "prompts. Story correctness: share of samples that parse without an error against the built-in "
            "corpus's grammar (absent for other data); sentence validity: valid / complete generated sentences. "
            "Distinct continuations: unique samples / samples; distinct-2 and unigram entropy pooled over the "
            "samples, against the real continuations of the same prompts. gen-ppl (secondary: it finds repeated "
            f"words likely): perplexity under the AR judge. x reference: ratio to the quality reference ({where}); "
            f"at reference quality: story correctness >= {quality.CORRECTNESS_SHARE}x and distinct continuations "
            f"and distinct-2 >= {quality.DIVERSITY_SHARE}x the reference's. A mismatched decoder decodes with "
            "another attention than the model was trained with.</p>")
    return f"<table><tr>{head}</tr>{''.join(cells)}</table>{note}"


def _band(metrics: dict[str, Any], key: str) -> str:
    low, high = metrics.get(f"{key}_interval", (None, None))
    return "" if low is None else f" <small>[{low:,.2f}, {high:,.2f}]</small>"


def _verdict(error: str | None) -> str:
    """A sample's verdict under the corpus grammar (nothing where the data has no checker)."""
    if error is None:
        return ""
    return ('<div class="ok">correct</div>' if not error
            else f'<div class="mismatched">first error: {html.escape(error)}</div>')


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    return f"{value:,.2f}" if isinstance(value, float) else f"{value:,}"


def _harness_table(harness: dict[str, Any]) -> str:
    """lm-evaluation-harness scores: one row per task and metric (lm_eval's `metric,filter`), with its
    standard error."""
    rows = []
    for task, metrics in harness.get("scores", {}).items():
        for key, value in metrics.items():
            metric, _, filtered = key.partition(",")
            if metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filtered}")
            rows.append(f"<tr><th>{html.escape(task)}</th><td>{html.escape(key)}</td><td>{_fmt(value)}</td>"
                        f"<td>{_fmt(stderr)}</td></tr>")
    samples = harness.get("samples")
    note = (f"<p>Diffusion loglikelihoods are bounds estimated at {samples} noise levels (mean standard error "
            f"{_fmt(harness.get('bound_stderr'))} nats); AR ones are exact.</p>" if samples else "")
    return ("<table><tr><th>task</th><th>metric,filter</th><th>value</th><th>stderr</th></tr>"
            f"{''.join(rows)}</table>{note}")


def _trace(trace: dict[str, Any]) -> str:
    """Each generated token coloured by the forward pass that first fixed it; revisions in the tooltip."""
    last = max(trace["decoded_at"]) or 1
    cells = []
    for piece, at, revised in zip(trace.get("pieces", trace.get("tokens", [])), trace["decoded_at"],
                                  trace["revisions"]):
        if at == 0:
            style, title = "background:#ddd", "prompt"
        else:
            hue = int(240 * (1 - at / last))
            style, title = f"background:hsl({hue},70%,80%)", f"fixed at pass {at}, revised {revised}x"
        cells.append(f'<span class="tok" style="{style}" title="{title}">{html.escape(piece)}</span>')
    return ("<p>Colour = the pass that first decoded the token (blue early, red late; grey = prompt); "
            "hover for the pass and how often a draft was revised.</p>" + "".join(cells))


def render(records: list[dict[str, Any]], run_dir: str) -> str:
    failed = [r for r in sorted(records, key=lambda r: r["step"]) if "error" in r]
    records = sorted((r for r in records if "error" not in r), key=lambda r: r["step"])
    metric = perplexity.figure(records[-1]["perplexity"])[0] if records else "ppl_bound"
    points = [(r["step"], r["perplexity"][metric]) for r in records if metric in r["perplexity"]]
    parts = [f"<h1>Evaluation of {html.escape(run_dir)}</h1>",
             f"<h2>Validation {metric} vs step</h2>", plot({metric: points}, "training step", metric)]
    if failed:
        parts += ["<h2>Steps not evaluated</h2>",
                  *[f"<p>step {r['step']}: {html.escape(r['error'])}</p>" for r in failed]]
    latest = records[-1] if records else None
    if latest and latest.get("harness"):
        parts += [f"<h2>lm-evaluation-harness at step {latest['step']}</h2>", _harness_table(latest["harness"])]
    if latest and latest.get("samplers"):
        rows = sampler_rows(latest)
        reference = latest.get("quality_reference")
        reference = reference if isinstance(reference, dict) else None  # older ledgers named a sampler
        parts += [f"<h2>Decoders at step {latest['step']}: speed and quality</h2>",
                  _sampler_table(rows, reference, run_dir, latest.get("real_continuations"))]
        # The frontier on the exact measure where there is one, else on the judge's.
        key, label = (("story_correctness", "story correctness") if any("story_correctness" in m for m in rows)
                      else ("gen_ppl", "gen-ppl (AR judge)"))
        scored: dict[str, list[tuple[float, float]]] = {}  # one curve per decoder through its thresholds
        for m in rows:
            if key in m:
                scored.setdefault(m["name"].split("@")[0], []).append((m["tokens_per_forward"], m[key]))
        if scored:
            level = ("reference (one-token)", reference[key]) if reference and reference.get(key) else None
            parts.append(plot({k: sorted(v) for k, v in scored.items()}, "tokens per forward", label, level=level))
        by_name = {m["name"]: m for m in rows}
        for name, samples in latest.get("samples_by_sampler", {}).items():
            if name not in by_name:
                continue
            errors = by_name[name].get("story_errors") or [None] * len(samples)
            parts += [f"<h2>Latest samples: {html.escape(name)} (the first {min(len(samples), SHOWN)})</h2>",
                      *[f'<div class="sample">{html.escape(s)}{_verdict(e)}</div>'
                        for s, e in zip(samples[:SHOWN], errors)]]
        if latest.get("trace"):
            traced = html.escape(latest["trace"].get("sampler", ""))
            parts += [f"<h2>Draft and polish: one {traced} sample, pass by pass</h2>", _trace(latest["trace"])]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>evals</title><style>{_STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
