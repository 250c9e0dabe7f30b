"""Every attention kernel that can run here equals XLA's on the same description: Pallas splash
attention (in interpret mode on CPU) for packed segments, bidirectional and causal, with grouped
key/value heads and padding, in outputs and gradients. (cuDNN runs only on an NVIDIA GPU; block
diffusion's two-stream attention is checked against its dense mask in tests/test_block_diffusion.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer import attention


@pytest.mark.parametrize("causal", [False, True])
def test_splash_equals_xla_on_packed_segments(causal):
    batch, length, heads, kv_heads, size = 2, 128, 4, 2, 64
    q_key, k_key, v_key = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(q_key, (batch, length, heads, size))
    k = jax.random.normal(k_key, (batch, length, kv_heads, size))
    v = jax.random.normal(v_key, (batch, length, kv_heads, size))
    segments = jnp.asarray(np.repeat([[1] * 50 + [2] * 60 + [0] * 18], batch, 0))  # two documents, then padding
    spec = attention.Segments(segments, causal)

    def run(kernel):
        def loss(q, k, v):
            out = kernel(q, k, v)
            return (out ** 2).sum(), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    splash_out, splash_grads = run(lambda q, k, v: attention.splash(q, k, v, spec, interpret=True))
    xla_out, xla_grads = run(lambda q, k, v: attention.attend(q, k, v, spec, "xla"))
    np.testing.assert_allclose(splash_out, xla_out, atol=1e-5)
    for a, b in zip(splash_grads, xla_grads):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_auto_picks_xla_here_and_explicit_kernels_are_refused_where_absent():
    assert attention.resolve("auto", "bfloat16") == {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend(), "xla")
    for kernel, platform in (("cudnn", "gpu"), ("splash", "tpu")):
        if jax.default_backend() != platform:
            with pytest.raises(attention.ConfigError, match=f"model.attention={kernel} needs"):
                attention.resolve(kernel, "bfloat16")
