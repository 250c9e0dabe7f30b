"""Edit Flows (Havasu et al. 2025): a continuous-time Markov chain over edits (substitute, delete,
insert after a row) that carries x0 (a shared prefix, then nothing or K masks) to a document x1
of whatever length it has. Reference: ../shared/notes/dream-editflow.md, part B.

Host side (the loader, as a Grain transform): x0 and x1 are aligned once per example into
equal-length columns z0, z1 (Needleman-Wunsch, unit costs, gaps as early as ties allow), padded
to the row length. Device side, fixed shapes only: a time t per row, z_t = z1 in each column with
probability kappa_t, x_t = z_t without blanks, the edits still to make, and the loss

    w_t * [ sum over rows of x_t of (r_sub + r_del + r_ins)
            - sum over remaining edits of (log r_op + log Q_op(token)) ] / denominator,

w_t = min(kappa'_t / (1 - kappa_t + 1e-6), max_w). It drops the edits' parameter-free terms and
clips w, so it is the references' training objective, not a likelihood bound (README, "Edit
Flows"). Shapes: B batch, L row length (= columns Z), V vocab.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from trainer.model import train_flops_per_token
from trainer.objectives import registry

KAPPAS = ("linear", "cubic", "cosine")
PRIORS = ("empty", "masks")
NORMALIZE = ("position", "none")
BLANK, PADCOL = -1, -2  # a column's empty side (the edit's other side is a token); a column past the row's end
SUB, DEL, INS = 0, 1, 2  # the rate heads' order


@dataclasses.dataclass
class EditFlowSettings(registry.Settings):
    name: str = "editflow"
    kappa: str = "cubic"  # linear | cubic | cosine: the path's schedule kappa_t (the decoder's rates use it too)
    max_w: float = 20.0  # clip of the weight kappa'/(1 - kappa) (the references' 20)
    eps: float = 1e-3  # training times t ~ (1 - eps) U[0, 1); evals' grid starts here
    prior: str = "empty"  # empty | masks: x0 is the shared prefix alone, or followed by prior_masks MASK tokens
    prior_masks: int = 16  # K of the masks prior (the decoder starts from as many)
    # The shared prefix of a text example, never edited: uniform in [1, prompt_max] tokens (BOS first), so a
    # decoding prompt up to this length is a state the model trained from. Trajectories share their prompt.
    prompt_max: int = 16
    normalize: str = "position"  # position: a row's loss / len(x1) (the references') | none
    time_input: bool = False  # the model also reads t (the references' models do not; benchmarks/editflow.py measures it)

    def rules(self, cfg):
        return [(self.kappa in KAPPAS, "objective.kappa", f"must be one of {', '.join(KAPPAS)}"),
                (self.max_w > 0, "objective.max_w", "must be positive"),
                (0 < self.eps < 1, "objective.eps", "must be in (0, 1)"),
                (self.prior in PRIORS, "objective.prior", f"must be one of {', '.join(PRIORS)}"),
                (self.prompt_max >= 1, "objective.prompt_max", "must be at least 1"),
                (self.normalize in NORMALIZE, "objective.normalize", f"must be one of {', '.join(NORMALIZE)}"),
                (0 <= self.prior_masks and self.prompt_max + self.prior_masks < cfg.data.seq_len,
                 "objective.prior_masks", f"must be >= 0 with objective.prompt_max + prior_masks < data.seq_len "
                                          f"({cfg.data.seq_len})")]


# Schedules -----------------------------------------------------------------------------------

def kappa(t, schedule: str):
    """(kappa_t, d kappa_t / dt): 0 at t=0 (x0), 1 at t=1 (x1). cubic is Cubic(a=1, b=1) of the notes."""
    if schedule == "linear":
        return t, jnp.ones_like(t)
    if schedule == "cubic":
        return 2 * t**3 - 3 * t**2 + 2 * t, 6 * t**2 - 6 * t + 2
    if schedule == "cosine":
        return 1 - jnp.cos(math.pi * t / 2), (math.pi / 2) * jnp.sin(math.pi * t / 2)
    raise ValueError(f"unknown kappa schedule {schedule}")


def weight(t, schedule: str, max_w: float):
    """w_t = kappa'_t / (1 - kappa_t + 1e-6), clipped at max_w: the rate of a still-wrong column."""
    k, dk = kappa(t, schedule)
    return jnp.minimum(dk / (1 - k + 1e-6), max_w)


# Host: alignment and columns -----------------------------------------------------------------

def align(x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A minimum-edit alignment (match 0, substitution 1, gap 1) as equal-length columns (z0, z1),
    BLANK on a gap's side. Ties prefer diagonal > delete > insert from the end, so gaps land early."""
    n, m = len(x0), len(x1)
    cost = np.zeros((n + 1, m + 1), np.int64)
    cost[0] = np.arange(m + 1)
    j = np.arange(m + 1)
    for i in range(1, n + 1):
        # Each row vectorised: diagonal and up moves, then the left moves as a running minimum.
        best = np.full(m + 1, i, np.int64)
        best[1:] = np.minimum(cost[i - 1, :-1] + (x0[i - 1] != x1), cost[i - 1, 1:] + 1)
        cost[i] = j + np.minimum.accumulate(best - j)
    z0, z1, i, k = [], [], n, m
    while i or k:
        if i and k and cost[i, k] == cost[i - 1, k - 1] + (x0[i - 1] != x1[k - 1]):
            i, k = i - 1, k - 1
            z0.append(x0[i]), z1.append(x1[k])
        elif i and cost[i, k] == cost[i - 1, k] + 1:
            i -= 1
            z0.append(x0[i]), z1.append(BLANK)
        else:
            k -= 1
            z0.append(BLANK), z1.append(x1[k])
    return np.array(z0[::-1], np.int32), np.array(z1[::-1], np.int32)


def columns(x1: np.ndarray, prompt_len: int, s: EditFlowSettings, mask_id: int, width: int) -> dict[str, np.ndarray]:
    """One example as fixed-width columns: x1 (cut to fit `width` columns), x0 = its first `prompt_len`
    tokens + the prior, aligned after the shared prefix; PADCOL past the end."""
    masks = s.prior_masks if s.prior == "masks" else 0
    prompt_len = min(prompt_len, width - masks - 1)
    cut = np.asarray(x1, np.int32)[:width]
    while True:  # K masks against m tokens align in max(K, m) columns (more only if x1 holds masks)
        z0_rest, z1_rest = align(np.full(masks, mask_id, np.int32), cut[prompt_len:])
        if prompt_len + len(z0_rest) <= width:
            break
        cut = cut[:len(cut) - (prompt_len + len(z0_rest) - width)]  # each token cut shortens it by at most 1
    z0 = np.full(width, PADCOL, np.int32)
    z1 = np.full(width, PADCOL, np.int32)
    used = prompt_len + len(z0_rest)
    z0[:used] = np.concatenate([cut[:prompt_len], z0_rest])
    z1[:used] = np.concatenate([cut[:prompt_len], z1_rest])
    return {"z0": z0, "z1": z1, "x1_len": np.int32(len(cut)), "prompt_len": np.int32(prompt_len),
            "truncated": np.int32(len(cut) < len(x1)),
            # for the loader's token counts (trainer tokens/s, evals' perplexity tokens)
            "tokens_segment_ids": (np.arange(width) < len(cut)).astype(np.int32)}


def example_prompt_len(prompt_len: int, length: int, s: EditFlowSettings, rng: np.random.Generator) -> int:
    """A trajectory's own prompt, else a uniform prefix of 1..prompt_max tokens (at most all but one)."""
    if prompt_len > 0:
        return prompt_len
    return int(rng.integers(1, max(min(s.prompt_max, length - 1), 1) + 1))


# Device: x_t, the remaining edits, the loss --------------------------------------------------

def sample_xt(key, z0_BZ, z1_BZ, kappa_B, pad_id: int):
    """(x_t [B, Z] (pad past n_t), n_t [B], z_t [B, Z]): each column takes z1 with probability kappa,
    else z0; x_t is z_t's non-blank tokens in column order."""
    valid = z1_BZ != PADCOL
    zt_BZ = jnp.where(jax.random.uniform(key, z0_BZ.shape) < kappa_B[:, None], z1_BZ, z0_BZ)
    nonblank = (zt_BZ != BLANK) & valid
    row = jnp.cumsum(nonblank, 1) - 1
    width = z0_BZ.shape[1]
    target = jnp.where(nonblank, row, width)
    xt_BZ = jnp.full_like(z0_BZ, pad_id).at[jnp.arange(z0_BZ.shape[0])[:, None], target].set(zt_BZ, mode="drop")
    return xt_BZ, nonblank.sum(1), jnp.where(valid, zt_BZ, PADCOL)


def remaining_edits(zt_BZ, z1_BZ):
    """Per column (kind [B, Z] in {-1 none, SUB, DEL, INS}, row of x_t it acts on, token): INS after row
    max(nb - 1, 0), DEL and SUB at row nb, nb = the non-blank columns of z_t before it."""
    valid = z1_BZ != PADCOL
    nonblank = (zt_BZ != BLANK) & valid
    nb = jnp.cumsum(nonblank, 1) - nonblank
    todo = valid & (zt_BZ != z1_BZ)
    ins, dele = todo & (zt_BZ == BLANK), todo & (z1_BZ == BLANK)
    kind = jnp.where(ins, INS, jnp.where(dele, DEL, jnp.where(todo, SUB, -1)))
    row = jnp.where(ins, jnp.maximum(nb - 1, 0), nb)
    return kind, jnp.minimum(row, zt_BZ.shape[1] - 1), jnp.maximum(z1_BZ, 0)


def loss_B(sub_logits_BLV, ins_logits_BLV, rates_BL3, n_B, kind_BZ, row_BZ, tok_BZ, w_B, denom_B):
    """Each row's loss (module docstring) from the model's outputs over x_t and the remaining edits."""
    live = jnp.arange(rates_BL3.shape[1])[None, :] < n_B[:, None]
    survival_B = jnp.where(live[..., None], rates_BL3, 0.0).sum((1, 2))
    log_rate_BL3 = jnp.log(jnp.maximum(rates_BL3, 1e-12))

    def at_rows(x_BL):
        return jnp.take_along_axis(x_BL, row_BZ, 1)

    def log_q(logits_BLV):  # log softmax at (row, token) without the [B, L, V] softmax
        picked = jnp.take_along_axis(jnp.take_along_axis(logits_BLV, row_BZ[..., None], 1), tok_BZ[..., None], 2)
        return picked[..., 0] - at_rows(jax.nn.logsumexp(logits_BLV, -1))

    log_rate_BZ3 = jnp.take_along_axis(log_rate_BL3, row_BZ[..., None], 1)
    log_rate_BZ = jnp.take_along_axis(log_rate_BZ3, jnp.maximum(kind_BZ, 0)[..., None], 2)[..., 0]
    log_tok_BZ = jnp.where(kind_BZ == SUB, log_q(sub_logits_BLV), jnp.where(kind_BZ == INS, log_q(ins_logits_BLV), 0.0))
    edits_B = jnp.where(kind_BZ >= 0, log_rate_BZ + log_tok_BZ, 0.0).sum(1)
    return w_B * (survival_B - edits_B) / denom_B


def row_losses(model, batch, key, mask_id: int, s: EditFlowSettings, t_B=None):
    """(each example's loss [B], its x1 length [B]) at times t_B (sampled when None)."""
    z0_BZ, z1_BZ = batch["z0"], batch["z1"]
    batch_size, width = z0_BZ.shape
    time_key, column_key = jax.random.split(key)
    if t_B is None:  # antithetic: one uniform shifted by i/B covers [0, 1) evenly
        t_B = (1 - s.eps) * ((jax.random.uniform(time_key, ()) + jnp.arange(batch_size) / batch_size) % 1.0)
    kappa_B, _ = kappa(t_B, s.kappa)
    xt_BZ, n_B, zt_BZ = sample_xt(column_key, z0_BZ, z1_BZ, kappa_B, mask_id)
    positions = jnp.broadcast_to(jnp.arange(width), (batch_size, width))
    segments = (positions < n_B[:, None]).astype(jnp.int32)
    sub_BLV, ins_BLV, rates_BL3 = model.edit_outputs(xt_BZ, segments, positions, t_B)
    kind, row, tok = remaining_edits(zt_BZ, z1_BZ)
    x1_len = batch["x1_len"].astype(jnp.float32)
    denom = x1_len if s.normalize == "position" else jnp.ones_like(x1_len)
    return loss_B(sub_BLV, ins_BLV, rates_BL3, n_B, kind, row, tok, weight(t_B, s.kappa, s.max_w), denom), x1_len


def train_loss(model, batch, key, mask_id, s: EditFlowSettings):
    """(summed row losses, rows, diagnostics): the trainer's mean over rows, as the references'."""
    losses_B, _ = row_losses(model, batch, key, mask_id, s)
    return losses_B.sum(), jnp.asarray(losses_B.shape[0]), {"truncated": batch["truncated"].sum()}


def eval_loss(model, batch, key, mask_id, s: EditFlowSettings, t):
    """(the unnormalised loss at time t summed over rows, their x1 tokens): nats per x1 token."""
    unnormalised = dataclasses.replace(s, normalize="none")
    t_B = jnp.full((batch["z0"].shape[0],), jnp.minimum(t, 1 - s.eps))
    losses_B, x1_len = row_losses(model, batch, key, mask_id, unnormalised, t_B)
    return losses_B.sum(), x1_len.sum()


def flops_per_token(model_cfg, seq_len: int) -> float:
    """The trunk's, plus the insertion and rate heads (6 FLOPs per weight)."""
    return train_flops_per_token(model_cfg, seq_len) + 6 * model_cfg.hidden * (model_cfg.vocab_size + 3)


EDITFLOW = registry.register(registry.Objective(
    name="editflow", settings=EditFlowSettings, attention=registry.BIDIRECTIONAL, batch=registry.EDIT,
    train_loss=train_loss, eval_loss=eval_loss, flops_per_token=flops_per_token, edit_heads=True, bound=False,
    model_options=lambda s: {"edit_heads": True, "time_input": s.time_input},
    report=lambda sums: {"truncated_examples": sums["truncated"]},
    log=lambda loss, reported, s: {"truncated_examples": float(reported["truncated_examples"])}))
