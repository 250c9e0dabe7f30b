"""A toy decoder, as a user would add one: this file is all it takes (the extending test registers
it). Full attention, one token per forward: the leftmost masked position of the current block."""

from __future__ import annotations

import jax.numpy as jnp

from evals.decoders import full_attention, registry


def leftmost_commit(conf_BT, candidate_BT, j, cfg, key):
    """The first masked position of the block, whatever the model's confidence."""
    first = jnp.argmax(candidate_BT, axis=1)
    return candidate_BT & (jnp.arange(candidate_BT.shape[1]) == first[:, None])


registry.register(registry.Decoder(
    "left_to_right", full_attention.program(leftmost_commit), attention=registry.FULL,
    fits=(registry.BIDIRECTIONAL,), one_token=lambda cfg: True))
