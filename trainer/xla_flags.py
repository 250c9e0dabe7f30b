"""The XLA flags the trainer sets on GPUs, in one place: the settings of NVIDIA JAX-Toolbox's GPU
performance guide that concern one GPU as much as many (the rest are about collectives).

They must be in XLA_FLAGS before JAX starts its backend, so entry points call `apply` first. XLA
ignores GPU flags on CPU and TPU. A flag already in XLA_FLAGS keeps the user's value. Their effect
on the lent H200 is not measured yet (benchmarks/device.sh prints the flags it ran with)."""

from __future__ import annotations

import os

GPU_FLAGS = {
    # Schedule independent work (e.g. the next layer's weight reads) to overlap compute.
    "--xla_gpu_enable_latency_hiding_scheduler": "true",
    # Double-buffer while loops (scanned layers) so one iteration's work overlaps the next's.
    "--xla_gpu_enable_while_loop_double_buffering": "true",
}


def apply(environ=os.environ) -> str:
    """Adds GPU_FLAGS to XLA_FLAGS (user values win); returns the resulting XLA_FLAGS."""
    current = environ.get("XLA_FLAGS", "")
    set_by_user = {item.split("=", 1)[0] for item in current.split()}
    ours = [f"{flag}={value}" for flag, value in GPU_FLAGS.items() if flag not in set_by_user]
    environ["XLA_FLAGS"] = " ".join([*ours, current]).strip()
    return environ["XLA_FLAGS"]
