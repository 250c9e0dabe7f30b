"""Side effects of watching a run: metrics.jsonl, the progress bar, wandb, and MFU's denominator."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from trainer.files import write_whole

# Dense bf16 peak FLOP/s of accelerators whose spec sheet we trust; others are measured.
_KNOWN_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5": 197e12, "TPU v4": 275e12}


def measure_matmul_flops(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """This machine's dense matmul FLOP/s in `dtype`: the denominator of MFU where no spec applies."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        matmul(a).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def device_peak_flops(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure came from)."""
    kind = jax.devices()[0].device_kind
    for name, flops in _KNOWN_PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops, f"spec sheet ({kind})"
    return measure_matmul_flops(dtype), f"measured {dtype} matmul ({kind})"


class MetricsLog:
    """metrics.jsonl in the run directory; on resume, lines past the restored step are dropped
    so the file reads as if the run had never stopped."""

    def __init__(self, run_dir: str, resume_step: int):
        self._path = epath.Path(run_dir) / "metrics.jsonl"
        self._lines: list[str] = []
        if self._path.exists():
            for line in self._path.read_text().splitlines():
                try:
                    step = json.loads(line)["step"] if line.strip() else None
                except (json.JSONDecodeError, KeyError, TypeError):
                    print(f"warning: dropped a damaged line of {self._path}: {line[:60]!r}")
                    continue
                if step is not None and step <= resume_step:
                    self._lines.append(line)
        write_whole(self._path, "".join(line + "\n" for line in self._lines))
        # Object stores (gs://) cannot append: there each write replaces the whole file.
        self._append = "://" not in str(self._path)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        self._lines.append(line)
        if self._append:
            with self._path.open("a") as f:
                f.write(line + "\n")
        else:
            write_whole(self._path, "".join(x + "\n" for x in self._lines))


class Wandb:
    """wandb logging keyed by training step; offline unless configured or WANDB_MODE says otherwise."""

    def __init__(self, run_dir: str, project: str, mode: str, config: dict[str, Any], job_type: str = "train"):
        """One wandb run per (run directory, job type), grouped by run directory: the eval stage
        logs beside a live trainer without two processes writing one wandb run."""
        self._run = None
        mode = os.environ.get("WANDB_MODE") or mode
        if mode == "disabled":
            return
        import wandb  # heavy: only imported when logging is on

        remote = "://" in run_dir
        group = hashlib.sha256((run_dir if remote else os.path.abspath(run_dir)).encode()).hexdigest()[:16]
        if remote:  # wandb writes local files only
            directory = epath.Path(os.environ.get("WANDB_DIR", "wandb")) / f"{group}-{job_type}"
        else:
            directory = epath.Path(run_dir) / ("" if job_type == "train" else job_type)
        directory.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=project, dir=str(directory), mode=mode, config=config,
                               id=f"{group}-{job_type}", group=group, job_type=job_type,
                               resume="allow", settings=wandb.Settings(silent=True))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
