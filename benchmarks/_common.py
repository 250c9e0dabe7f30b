"""What every benchmark script shares: printing its JSON report and saving it with --out, and
loading a run's latest checkpoint."""

from __future__ import annotations

import json
from typing import Any

from evals import runs
from trainer import state


def emit(report: dict[str, Any], out: str | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def latest(run_dir: str):
    """(run config, (graphdef, params)) of the run's newest committed checkpoint."""
    cfg = runs.load_config(run_dir)
    graphdef, params, _ = state.load_params(run_dir, cfg=cfg)
    return cfg, (graphdef, params)
