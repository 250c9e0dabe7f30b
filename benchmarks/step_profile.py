"""Where a CPU train step's time goes: forward + backward of each part of the model, timed alone.

    python benchmarks/step_profile.py [--steps N] [--out results.json]

For the tiny and medium shapes of benchmarks/train_step.py (MDLM, float32): the whole step, then
the attention sublayer (projections, RoPE, dense [B,1,L,L] mask, softmax) and the SwiGLU
sublayer of one block times the layer count, and the output head with the float32 log-softmax
over the vocabulary. Each part prints its seconds, its share of the step, its matmul FLOP/s and
the ratio to this machine's measured float32 matmul peak, so the lowest ratio is where the step
loses its time.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from _common import emit
from flax import nnx
from train_step import SHAPES, VOCAB, shape_config, step_flops

from trainer import observe
from trainer.attention import Segments
from trainer.model import Attention, SwiGLU


def timed_grad(loss, args, steps: int) -> float:
    """Seconds of one compiled forward + backward of `loss(weights, x)`: gradients of both, as in training."""
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(grad(*args))
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(grad(*args))
    return (time.perf_counter() - start) / steps


def parts(name: str, steps: int, peak: float) -> dict:
    hidden, layers, heads, mlp, seq, batch = SHAPES[name]
    cfg = shape_config(SHAPES[name], "float32")
    step = step_flops(cfg, steps)
    rngs = nnx.Rngs(0)
    x = jax.random.normal(jax.random.key(0), (batch, seq, hidden))
    positions = jnp.tile(jnp.arange(seq), (batch, 1))
    mask = Segments(jnp.ones((batch, seq), jnp.int32), causal=False)
    attention, attention_weights = nnx.split(Attention(cfg.model, rngs))
    swiglu, swiglu_weights = nnx.split(SwiGLU(cfg.model, rngs))
    embedding = jax.random.normal(jax.random.key(1), (VOCAB, hidden)) * 0.02
    targets = jax.random.randint(jax.random.key(2), (batch, seq), 0, VOCAB)

    def head_loss(embedding_VD, x_BLD):
        logp_BLV = jax.nn.log_softmax((x_BLD @ embedding_VD.T).astype(jnp.float32))
        return -jnp.take_along_axis(logp_BLV, targets[..., None], -1).mean()

    tokens = batch * seq
    attention_flops = 6 * tokens * 4 * hidden * hidden + 12 * tokens * hidden * seq  # weights + scores
    measured = {
        "attention_x_layers": (layers * timed_grad(
            lambda w, x: nnx.merge(attention, w)(x, positions, mask)[0].sum(), (attention_weights, x), steps),
            layers * attention_flops),
        "swiglu_x_layers": (layers * timed_grad(lambda w, x: nnx.merge(swiglu, w)(x).sum(), (swiglu_weights, x), steps),
                            layers * 6 * tokens * 3 * hidden * mlp),
        "head_and_log_softmax": (timed_grad(head_loss, (embedding, x), steps), 6 * tokens * hidden * VOCAB),
    }
    report = {"step_seconds": step["step_seconds"], "step_mfu": round(step["model_flops_per_s"] / peak, 3)}
    for part, (seconds, flops) in measured.items():
        report[part] = {"seconds": round(seconds, 4), "share_of_step": round(seconds / step["step_seconds"], 3),
                        "mfu": round(flops / seconds / peak, 3)}
    report["rest_share_of_step"] = round(1 - sum(v[0] for v in measured.values()) / step["step_seconds"], 3)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="Timed repetitions per part.")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args()
    peak = observe.measure_matmul_flops("float32")
    emit({"benchmark": "step_profile", "matmul_flops_per_s": round(peak),
          **{name: parts(name, args.steps, peak) for name in SHAPES}}, args.out)


if __name__ == "__main__":
    main()
