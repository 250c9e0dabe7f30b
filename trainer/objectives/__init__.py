"""Training objectives, one module each, found through the registry (registry.py).

Importing this package registers the built-in objectives: mdlm, bd3lm (block diffusion), ar,
oput (DMax on-policy uniform training), dream (MDLM with an AR model's shifted head) and
editflow (Edit Flows: insertions, deletions and substitutions)."""

from trainer.objectives import mdlm, bd3lm, ar, oput, dream, editflow  # noqa: F401, I001  (each registers itself, in this order)
from trainer.objectives.registry import Objective, Settings, get, names, register  # noqa: F401
