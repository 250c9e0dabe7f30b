"""Decoders (samplers), one registry entry each (registry.py): block-causal ones for models
trained block-causally, full-attention ones for bidirectional models (Dream's read shifted logits),
a causal one for AR models, and tau-leaping for Edit Flows models (editflow.py).
Importing this package registers the built-in decoders."""

from evals.decoders import block_causal, causal, dream, editflow, full_attention  # noqa: F401  (each registers its decoders)
from evals.decoders.registry import (  # noqa: F401
    FULL, Decoder, block_length, fitting, generate, get, is_matched, is_one_token, is_valid, names, parse, plan, program, register,
    resolve)
