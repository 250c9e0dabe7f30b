"""The two-stream forward shared by block diffusion (BD3LM) and DMax OPUT.

Shapes: B batch, L row length, V vocab. One forward runs [noisy | clean] (2L positions, positions
repeated): a noisy block sees itself and the clean earlier blocks of its document, the clean
stream is block-causal, nothing crosses a packed document boundary (trainer/attention.py computes
this in its structure, without a [2L, 2L] mask), and only the noisy stream gets logits.
Blocks of `block` tokens sit at each document's own positions (position // block), so training
blocks line up with decoding blocks, which start at the prompt's position 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trainer import attention


def noisy_stream_logits(model, noisy_BL: jax.Array, clean_BL: jax.Array, positions_BL: jax.Array,
                        segment_ids_BL: jax.Array, block: int) -> jax.Array:
    """Logits [B, L, V] of the noisy stream from one forward over [noisy | clean]."""
    length = noisy_BL.shape[1]
    inputs = model.embed(jnp.concatenate([noisy_BL, clean_BL], axis=1))
    positions = jnp.concatenate([positions_BL, positions_BL], axis=1)
    spec = attention.TwoStream(segment_ids_BL, positions_BL, block)
    logits, _ = model.forward(inputs, positions, spec, logits_for=length)
    return logits
