"""BD3LM block diffusion: the packed two-stream mask, per-block times, MDLM as the one-block
case, no attention across packed documents or into later blocks, and a tiny run that learns."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer import block_diffusion, loss
from trainer.config import ModelConfig, ObjectiveConfig
from trainer.model import Transformer

VOCAB, MASK = 40, 39
# Two packed rows of 12: row 0 holds documents of 5, 4 and 3 tokens, row 1 one of 9 and padding.
SEGMENTS = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3], [1] * 9 + [0] * 3], np.int32)
POSITIONS = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2], [*range(9), 0, 0, 0]], np.int32)
TOKENS = np.random.default_rng(0).integers(3, MASK, SEGMENTS.shape).astype(np.int32)


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig(vocab_size=VOCAB, hidden=32, layers=2, heads=2, mlp_hidden=64, max_seq_len=64),
                       nnx.Rngs(0))


def slow_mask(segments, positions, block):
    length = len(segments)
    allowed = np.zeros((2 * length, 2 * length), bool)
    for q in range(2 * length):
        for k in range(2 * length):
            q_noisy, k_noisy = q < length, k < length
            bq, bk = positions[q % length] // block, positions[k % length] // block
            if segments[q % length] != segments[k % length]:
                continue
            allowed[q, k] = ((q_noisy == k_noisy and bq == bk) or (q_noisy and not k_noisy and bq > bk)
                             or (not q_noisy and not k_noisy and bq >= bk))
    return allowed


@pytest.mark.parametrize("block", [1, 2, 3, 16])
def test_packed_two_stream_mask_is_exact(block):
    mask = np.asarray(block_diffusion.two_stream_mask(jnp.asarray(POSITIONS), jnp.asarray(SEGMENTS), block))
    for row in range(2):
        assert np.array_equal(mask[row, 0], slow_mask(SEGMENTS[row], POSITIONS[row], block))
    assert mask.any(-1).all()  # every query (padding included) sees at least one key


def test_one_block_per_document_is_mdlm_at_the_same_noise(model):
    cfg = ObjectiveConfig(name="bd3lm", block_size=64)  # longer than any document
    key = jax.random.key(3)
    t_B = jnp.array([0.3, 0.8])
    mdlm_total, mdlm_count = loss.mdlm_loss(
        lambda toks, causal: model(toks, jnp.asarray(SEGMENTS), jnp.asarray(POSITIONS), causal),
        jnp.asarray(TOKENS), jnp.asarray(SEGMENTS), key, MASK, cfg, t_B=t_B)
    bd_total, bd_count = block_diffusion.bd3lm_loss(
        model, jnp.asarray(TOKENS), jnp.asarray(SEGMENTS), jnp.asarray(POSITIONS), key, MASK, cfg,
        t_BL=jnp.broadcast_to(t_B[:, None], SEGMENTS.shape))
    assert int(bd_count) == int(mdlm_count) == int((SEGMENTS != 0).sum())
    assert float(mdlm_total) > 0
    np.testing.assert_allclose(float(bd_total), float(mdlm_total), rtol=1e-5)


def _noisy_logits(model, tokens, block, noisy=None):
    positions, segments = jnp.asarray(POSITIONS), jnp.asarray(SEGMENTS)
    mask = block_diffusion.two_stream_mask(positions, segments, block)
    noisy = jnp.asarray(tokens if noisy is None else noisy)
    return np.asarray(block_diffusion.noisy_stream_logits(model, noisy, jnp.asarray(tokens), positions, mask))


def test_no_attention_across_packed_documents(model):
    noisy = np.where(np.arange(12) % 3 == 0, MASK, TOKENS)
    before = _noisy_logits(model, TOKENS, 2, noisy)
    changed_tokens, changed_noisy = TOKENS.copy(), noisy.copy()
    changed_tokens[0, 5:9] = (TOKENS[0, 5:9] + 1) % MASK  # document 2 of row 0, both streams
    changed_noisy[0, 5:9] = (noisy[0, 5:9] + 1) % MASK
    after = _noisy_logits(model, changed_tokens, 2, changed_noisy)
    untouched = np.ones(12, bool)
    untouched[5:9] = False
    np.testing.assert_array_equal(after[0, untouched], before[0, untouched])
    np.testing.assert_array_equal(after[1], before[1])
    assert not np.allclose(after[0, 5:9], before[0, 5:9])  # the perturbation itself is seen


def test_a_block_sees_only_itself_and_clean_earlier_blocks(model):
    noisy = np.full_like(TOKENS, MASK)
    before = _noisy_logits(model, TOKENS, 3, noisy)
    later = TOKENS.copy()
    later[1, 6:9] = (TOKENS[1, 6:9] + 1) % MASK  # the clean third block of row 1's document
    after = _noisy_logits(model, later, 3, noisy)
    np.testing.assert_array_equal(after[1, :9], before[1, :9])  # no block reads a clean later/own block
    earlier = TOKENS.copy()
    earlier[1, 0:3] = (TOKENS[1, 0:3] + 1) % MASK  # the clean first block: later blocks condition on it
    after = _noisy_logits(model, earlier, 3, noisy)
    np.testing.assert_array_equal(after[1, :3], before[1, :3])
    assert not np.allclose(after[1, 3:9], before[1, 3:9])


def test_block_times_one_per_document_block_spread_over_the_batch():
    cfg = ObjectiveConfig(name="bd3lm", block_size=2)
    t = np.asarray(block_diffusion.block_times(jax.random.key(0), jnp.asarray(POSITIONS), jnp.asarray(SEGMENTS),
                                               2, cfg))
    blocks = [(r, SEGMENTS[r, i], POSITIONS[r, i] // 2) for r in range(2) for i in range(12)]
    by_block = {}
    for (r, i), b in zip(np.ndindex(2, 12), blocks):
        by_block.setdefault(b, set()).add(float(t[r, i]))
    assert all(len(v) == 1 for v in by_block.values())  # constant within a block
    values = sorted(v.pop() for v in by_block.values())
    n = len(values)
    # Antithetic: one per stratum [i/n, (i+1)/n) of the unit interval (before the eps map).
    strata = np.floor((np.array(values) - cfg.eps) / (1 - cfg.eps) * n)
    assert sorted(strata.tolist()) == list(range(n))
    clipped = ObjectiveConfig(name="bd3lm", block_size=2, noise_range_low=0.45, noise_range_high=0.55)
    t = np.asarray(block_diffusion.block_times(jax.random.key(0), jnp.asarray(POSITIONS), jnp.asarray(SEGMENTS),
                                               2, clipped))
    assert (t >= 0.45).all() and (t <= 0.55).all()


def test_a_tiny_bd3lm_run_learns(bd3lm_run):
    rows = [json.loads(line) for line in (bd3lm_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert rows[-1]["ppl_bound"] == pytest.approx(np.exp(rows[-1]["nelbo"]))
