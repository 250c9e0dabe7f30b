"""What every benchmark script shares: running a stage of the project, printing its JSON report and
saving it with --out, loading a run's latest checkpoint, and a bare forward of a model with the
decoders' shapes."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from evals import runs
from evals.decoders.block_causal import block_causal_mask
from trainer import attention, state
from trainer.model import head_dim, kv_heads


ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*command: str, env: dict | None = None) -> None:
    """Runs a stage from the repository root (`-m module ...` with this Python, else a program); on
    failure its last error lines end the benchmark."""
    command = (sys.executable, *command) if command[0] == "-m" else command
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode:
        sys.exit(f"{' '.join(command[:3])} failed: {' | '.join(result.stderr.strip().splitlines()[-3:])}")


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


def bare_forward_seconds(graphdef, params, batch: int, total: int, width: int, repeats: int = 20) -> float:
    """Seconds per jitted forward of one block of `width` tokens against a KV cache of `total`
    positions: the model alone, with the decoder's shapes."""
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    shape = (batch, total, kv_heads(cfg), head_dim(cfg))
    caches = [(jnp.zeros(shape, cfg.compute_dtype),) * 2 for _ in range(cfg.layers)]
    start_at = total - 2 * width

    @jax.jit
    def forward(params, x, caches):
        positions = jnp.broadcast_to(start_at + jnp.arange(width), (batch, width))
        mask = attention.Dense(block_causal_mask(total, width, total, start_at, width))
        logits, _ = nnx.merge(graphdef, params).forward(x, positions, mask, [(k, v, start_at) for k, v in caches])
        return logits

    x = jnp.zeros((batch, width, cfg.hidden), cfg.compute_dtype)
    jax.block_until_ready(forward(params, x, caches))
    start = time.perf_counter()
    for _ in range(repeats):
        out = forward(params, x, caches)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats
