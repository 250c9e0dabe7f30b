"""DMax OPUT: exact two-stream mask, supervision, on-policy gating, training and exact resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import TINY_MODEL
from trainer import config as config_lib
from trainer import data, train
from trainer.config import ModelConfig
from trainer import attention
from trainer.objectives import oput
from trainer.objectives.oput import OPUTSettings
from trainer.model import Transformer


def slow_mask(length: int, block: int) -> np.ndarray:
    allowed = np.zeros((2 * length, 2 * length), bool)
    for q in range(2 * length):
        for k in range(2 * length):
            q_noisy, k_noisy = q < length, k < length
            bq, bk = (q % length) // block, (k % length) // block
            if q_noisy == k_noisy and bq == bk:
                allowed[q, k] = True
            elif q_noisy and not k_noisy and bq > bk:
                allowed[q, k] = True
            elif not q_noisy and not k_noisy and bq >= bk:
                allowed[q, k] = True
    return allowed


@pytest.mark.parametrize("length,block", [(8, 2), (12, 4), (16, 16), (6, 1)])
def test_two_stream_mask_is_exact(length, block):
    positions = jnp.arange(length)[None]
    mask = attention.two_stream_reference_mask(attention.TwoStream(jnp.ones_like(positions), positions, block))
    assert np.array_equal(np.asarray(mask)[0, 0], slow_mask(length, block))


class FixedLogits:
    """A stand-in model whose noisy-stream logits are a given table: shows which positions the
    loss reads."""

    def __init__(self, table):
        self.table = table

    def embed(self, tokens):
        return tokens[..., None].astype(jnp.float32)

    def forward(self, inputs, positions, mask, logits_for=None):
        length = self.table.shape[1]
        logits = jnp.concatenate([self.table + 0.0 * inputs[:, :length], jnp.zeros_like(self.table)], axis=1)
        return logits[:, :logits_for], None


class RecordingLogits(FixedLogits):
    """FixedLogits that keeps the token inputs of every forward (rollout first, then training)."""

    def __init__(self, table):
        super().__init__(table)
        self.inputs = []

    def embed(self, tokens):
        self.inputs.append(tokens)
        return super().embed(tokens)


def test_the_training_forward_reads_the_rollouts_drafts():
    """On-policy examples: every masked position of the training forward's noisy stream holds the
    rollout's greedy draft (not the mask); off-policy ones keep their masks; clean streams are clean."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, 11, (4, 16)).astype(np.int32)
    batch = _batch(tokens, [2, 2, 2, 2], np.ones((4, 16), bool))
    table = jnp.asarray(rng.normal(size=(4, 16, 12)), jnp.float32)
    drafts = np.asarray(jnp.argmax(table, axis=-1))
    for ratio, expect_drafts in ((1.0, True), (0.0, False)):
        model = RecordingLogits(table)
        settings = OPUTSettings(block_size=4, on_policy_ratio=ratio, noise_range_low=0.6, noise_range_high=0.6)
        _, _, sums = oput.train_loss(model, batch, jax.random.key(5), 11, settings)
        rollout, training = (np.asarray(x) for x in model.inputs)
        masked = rollout[:, :16] == 11
        assert masked.sum() > 0 and (training[:, 16:] == tokens).all()
        if expect_drafts:
            assert (training[:, :16][masked] == drafts[masked]).all() and int(sums["replaced"]) == masked.sum()
        else:
            assert (training[:, :16][masked] == 11).all() and int(sums["replaced"]) == 0
        assert (training[:, :16][~masked] == tokens[~masked]).all()


def _batch(tokens, prompt_len, loss_mask):
    return {"tokens": jnp.asarray(tokens), "prompt_len": jnp.asarray(prompt_len),
            "loss_mask": jnp.asarray(loss_mask), "truncated": jnp.zeros(len(tokens), jnp.int32)}


def test_loss_covers_only_the_response_and_its_first_eos():
    row = data._TrajectoryRow(seq_len=16, eos_id=2, supervised_eos=3)
    example = row.map({"tokens": np.array([1, 7, 7, 7, 9, 9, 2], np.int32), "prompt_len": np.int32(4)})
    assert example["tokens"].tolist() == [1, 7, 7, 7, 9, 9, 2] + [2] * 9
    assert example["loss_mask"].tolist() == [False] * 4 + [True] * 6 + [False] * 6
    batch = _batch(example["tokens"][None].repeat(2, 0), [4, 4], example["loss_mask"][None].repeat(2, 0))
    table = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 12)), jnp.float32)
    cfg = OPUTSettings(block_size=4, on_policy_ratio=0.5)
    grads = jax.grad(lambda t: oput.train_loss(FixedLogits(t), batch, jax.random.key(0), 11, cfg)[0])(table)
    touched = np.abs(np.asarray(grads)).sum(-1) > 0
    assert np.array_equal(touched, np.asarray(batch["loss_mask"]))  # prompt and padding carry no loss


def test_on_policy_ratio_zero_is_plain_block_diffusion_on_the_same_noise():
    cfg_model = ModelConfig(vocab_size=30, hidden=32, layers=2, heads=2, mlp_hidden=64, max_seq_len=64)
    model = Transformer(cfg_model, nnx.Rngs(0))
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 29, (3, 16)).astype(np.int32)
    prompt_len = np.array([3, 5, 8], np.int32)
    loss_mask = np.arange(16)[None] >= prompt_len[:, None]
    batch = _batch(tokens, prompt_len, loss_mask)
    key = jax.random.key(4)
    cfg = OPUTSettings(block_size=4, on_policy_ratio=0.0, noise_range_low=0.3, noise_range_high=0.9)
    total, count, sums = oput.train_loss(model, batch, key, 29, cfg)
    # Plain block diffusion, written out: the same noise, the slow mask, cross-entropy in numpy.
    noisy, masked = oput.add_noise(jax.random.split(key)[0], batch["tokens"], batch["prompt_len"], cfg, 29)
    inputs = model.embed(jnp.concatenate([noisy, batch["tokens"]], 1))
    positions = jnp.tile(jnp.arange(16), (3, 2))
    logits = np.asarray(model.forward(inputs, positions, attention.Dense(jnp.asarray(slow_mask(16, 4))[None, None]))[0])[:, :16]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(total), nll[loss_mask].sum(), rtol=1e-5)
    assert int(count) == loss_mask.sum() and int(sums["replaced"]) == 0
    assert (np.asarray(masked)[~loss_mask] == False).all()  # noqa: E712  the prompt is never masked
    all_on = oput.train_loss(model, batch, key, 29, OPUTSettings(
        block_size=4, on_policy_ratio=1.0, noise_range_low=0.3, noise_range_high=0.9))[2]
    assert int(all_on["replaced"]) == int(np.asarray(masked).sum()) > 0


def _overrides(trajectory_dataset, run_dir):
    return [f"data.path={trajectory_dataset}", f"run_dir={run_dir}", *TINY_MODEL, "objective.name=oput",
            "objective.block_size=16", "objective.supervised_eos=8", "objective.noise_range_low=0.75",
            "objective.noise_range_high=0.75"]


def test_a_tiny_oput_run_learns(trajectory_dataset, tmp_path):
    cfg = config_lib.load(None, [*_overrides(trajectory_dataset, tmp_path / "run"), "train.steps=50",
                                 "train.checkpoint_every=50"])
    assert train.run(cfg) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.5
    assert 0.1 < np.mean([r["replaced_fraction"] for r in rows]) < 0.7  # about ratio x rate
    assert {"loss_masked", "loss_on_policy", "truncated_examples"} <= set(rows[-1])


def test_oput_needs_trajectory_records(tiny_dataset, tmp_path, capsys):
    from trainer import __main__ as cli

    assert cli.main([*_overrides(tiny_dataset, tmp_path / "run"), "train.steps=2"]) == 2
    assert "needs prompt/response records" in capsys.readouterr().err


@pytest.mark.slow
def test_oput_kill_9_and_resume_is_bitwise_identical(trajectory_dataset, tmp_path):
    def start(name, log):
        return subprocess.Popen([sys.executable, "-m", "trainer", *_overrides(trajectory_dataset, tmp_path / name),
                                 "train.steps=24", "train.checkpoint_every=8"],
                                stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT)

    assert start("straight", "straight.log").wait(timeout=600) == 0
    job = start("killed", "killed.log")
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "killed" / "checkpoints" / "8").is_dir():
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL
    assert start("killed", "resumed.log").wait(timeout=600) == 0
    resumed_at = int((tmp_path / "resumed.log").read_text().split("resuming at step ")[1].split(";")[0])
    assert resumed_at >= 8  # restored from a checkpoint, not retrained from step 0
    read = lambda name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in read("killed")] == [r["loss"] for r in read("straight")]
    assert [r["replaced_fraction"] for r in read("killed")] == [r["replaced_fraction"] for r in read("straight")]
