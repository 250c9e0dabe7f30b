"""The objective registry: one entry per training objective, carrying everything the trainer,
the loader, the evals and the decoders ask about it. Nothing outside an objective's own module
compares objective names; they read its entry.

Adding an objective: one module that builds an `Objective` and calls `register` (see mdlm.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from trainer.registry import Registry

# The attention an objective trains with; decoders declare which of these they fit.
BIDIRECTIONAL, CAUSAL, BLOCK_CAUSAL = "bidirectional", "causal", "block_causal"
# The rows an objective reads from the loader (trainer/data.py builds them); EDIT: one example per row as
# Edit Flows' aligned columns (z0, z1).
PACKED, TRAJECTORY, EDIT = "packed", "trajectory", "edit"


@dataclasses.dataclass
class Settings:
    """Base of every objective's settings (`objective.*` config keys); subclasses add fields, one
    comment each, and override `rules`."""

    name: str = "mdlm"  # the registered objective (trainer/objectives)

    def rules(self, cfg) -> list[tuple[bool, str, str]]:
        """(condition that must hold, key, message) for the whole config `cfg`."""
        return []


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    settings: type[Settings]  # its settings dataclass: the `objective.*` keys a config may set
    attention: str  # BIDIRECTIONAL | CAUSAL | BLOCK_CAUSAL: how the model attends, in training and decoding
    batch: str  # PACKED (text rows with segment ids) | TRAJECTORY (prompt/response rows)
    # (model, batch, key, mask_id, settings) -> (summed loss, token count, summed diagnostics)
    train_loss: Callable[..., tuple[Any, Any, dict]]
    # (model, batch, key, mask_id, settings, t) -> (summed NLL, token count): at diffusion time t of the
    # evals' fixed grid, or exact (t unused) when `exact`
    eval_loss: Callable[..., tuple[Any, Any]]
    # (model config, seq_len) -> training FLOPs per token the step executes (forward + backward, every
    # stream and rollout); trainer/model.py's train_flops_per_token is the token-once count
    flops_per_token: Callable[[Any, int], float]
    # (model, batch, key, mask_id, settings, t) -> loss_BL: each position's share of eval_loss's summed NLL
    # (0 where nothing is scored). An optional batch["scored"] (bool [B, L]) limits noising and scoring to
    # those positions, the rest staying clean context: how the harness (evals/harness) scores a continuation
    # given its context. None: the objective cannot be scored by position (the harness refuses it).
    token_loss: Callable[..., Any] | None = None
    exact: bool = False  # eval_loss is the exact NLL (AR), not a bound at grid times
    bound: bool = True  # eval_loss bounds the NLL (evals: ppl_bound); False: a training loss only (loss_ppl)
    revises: bool = False  # its loss covers every position, so decoders may revise decoded drafts (SPD)
    # Position i's token is predicted by the logits of position i-1 (Dream's shift, an AR head's reading):
    # only decoders that read logits so (Decoder.shifted) fit it, and they fit nothing else.
    shift: bool = False
    # The model carries Edit Flows' rate and insertion heads (model.EditHeads): only decoders with
    # `edit_heads` fit it, and they fit nothing else.
    edit_heads: bool = False
    # settings -> the keyword arguments of the model its runs train (model.Transformer: Edit Flows' heads)
    model_options: Callable[[Settings], dict] = lambda settings: {}
    block_size: Callable[[Settings], int | None] = lambda settings: None  # decoding blocks it was trained with
    # Per-step figures from the summed diagnostics of train_loss (jax arrays in, jax arrays out).
    report: Callable[[dict], dict] = lambda sums: {}
    # metrics.jsonl fields of a logged step beyond loss/lr/...: (mean loss, reported figures, settings) -> floats
    log: Callable[[float, dict, Settings], dict] = lambda loss, reported, settings: {}


REGISTRY: Registry[Objective] = Registry("objective", "objective.name")
register, get, names = REGISTRY.register, REGISTRY.get, REGISTRY.names
