"""Training objectives, one module each, found through the registry (registry.py).

Importing this package registers the built-in objectives: mdlm, bd3lm (block diffusion), ar,
oput (DMax on-policy uniform training) and dream (MDLM with an AR model's shifted head)."""

from trainer.objectives import mdlm, bd3lm, ar, oput, dream  # noqa: F401, I001  (each registers itself, in this order)
from trainer.objectives.registry import Objective, Settings, get, names, register  # noqa: F401
