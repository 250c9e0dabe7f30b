"""The lm-evaluation-harness tasks `python -m evals` runs on each new checkpoint (harness.tasks):
their scores, for the ledger and the report. lm_eval is imported here, so evals imports this
module only when harness.tasks is set."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import lm_eval
from lm_eval.tasks import TaskManager

from evals.config import HarnessConfig, SamplingConfig
from evals.harness.checkpoint import Checkpoint
from evals.harness.model import DiffusionLM
from trainer.errors import ConfigError

TASKS = pathlib.Path(__file__).parent / "tasks"  # the shipped tasks
SHIPPED = tuple(sorted(p.stem for p in TASKS.glob("*.yaml")))  # their names


def task_manager(names: list[str], metadata: dict[str, Any]) -> TaskManager:
    """The shipped tasks, plus lm_eval's own when a name is not one of them (indexing those takes
    seconds); `metadata` reaches the tasks' data loaders. ConfigError for an unknown name."""
    manager = TaskManager(include_path=str(TASKS), include_defaults=False, metadata=metadata)
    if set(names) - set(manager.all_tasks):
        manager = TaskManager(include_path=str(TASKS), metadata=metadata)
    unknown = sorted(set(names) - set(manager.all_tasks))
    if unknown:
        raise ConfigError(f"harness.tasks: unknown {unknown} (shipped: {', '.join(SHIPPED)}; or lm_eval's own)")
    return manager


def scores(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm_eval's per-task results as {task: {"metric,filter": value}} (None where it has no number)."""
    def number(value):
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    return {task: {key: number(value) for key, value in metrics.items() if "," in key}
            for task, metrics in results["results"].items()}


class Suite:
    def __init__(self, cfg: HarnessConfig, sampling: SamplingConfig, metadata: dict[str, Any]):
        self.cfg, self.sampling = cfg, sampling
        self.names = [name.strip() for name in cfg.tasks.split(",") if name.strip()]
        self.manager = task_manager(self.names, metadata)

    def evaluate(self, ckpt: Checkpoint) -> dict[str, Any]:
        """{"scores": per task, "samples": the bound's noise levels, "bound_stderr": the mean standard
        error of the loglikelihoods it estimated (None for an exact model or no such request)}."""
        lm = DiffusionLM(ckpt, self.cfg, self.sampling)
        results = lm_eval.simple_evaluate(model=lm, tasks=self.names, task_manager=self.manager,
                                          limit=self.cfg.limit or None, log_samples=False, torch_random_seed=None)
        stderr = sum(lm.stderrs) / len(lm.stderrs) if lm.stderrs else None
        return {"scores": scores(results), "samples": None if lm.objective.exact else self.cfg.samples,
                "bound_stderr": stderr}
