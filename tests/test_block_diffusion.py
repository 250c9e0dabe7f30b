"""BD3LM block diffusion: the packed two-stream attention (its structure equals the dense
[2L, 2L] mask, in logits, losses and gradients, at a fraction of the FLOPs), per-block times, MDLM
as the one-block case, no attention across packed documents or into later blocks, and a tiny run
that learns."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer import attention, state, train
from trainer import config as config_lib
from trainer.config import ModelConfig
from trainer.model import Transformer
from trainer.objectives import bd3lm, mdlm, oput, two_stream
from trainer.objectives.bd3lm import BD3LMSettings
from trainer.objectives.oput import OPUTSettings

VOCAB, MASK = 40, 39
# Two packed rows of 12: row 0 holds documents of 5, 4 and 3 tokens, row 1 one of 9 and padding.
SEGMENTS = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3], [1] * 9 + [0] * 3], np.int32)
POSITIONS = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2], [*range(9), 0, 0, 0]], np.int32)
TOKENS = np.random.default_rng(0).integers(3, MASK, SEGMENTS.shape).astype(np.int32)


@pytest.fixture(scope="module")
def model():  # grouped-query attention: 4 query heads share 2 key/value heads
    return Transformer(ModelConfig(vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, mlp_hidden=64,
                                   max_seq_len=64), nnx.Rngs(0))


def dense_two_stream(q, k, v, spec):
    """The reference: one attention over [noisy | clean] under the dense [2L, 2L] mask."""
    return jax.nn.dot_product_attention(q, k, v, mask=attention.two_stream_reference_mask(spec))


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
def test_packed_two_stream_reference_mask_is_exact(block):
    spec = attention.TwoStream(jnp.asarray(SEGMENTS), jnp.asarray(POSITIONS), block)
    mask = np.asarray(attention.two_stream_reference_mask(spec))
    for row in range(2):
        assert np.array_equal(mask[row, 0], slow_mask(SEGMENTS[row], POSITIONS[row], block))
    assert mask.any(-1).all()  # every query (padding included) sees at least one key


@pytest.mark.parametrize("block", [1, 3, 16])
def test_structured_two_stream_attention_equals_the_dense_mask(model, block, monkeypatch):
    """Logits at every real position, the BD3LM NELBO and its gradients: the structured attention
    (no [2L, 2L] matrix) against one attention under the dense reference mask."""
    noisy = np.where(np.arange(12) % 3 == 0, MASK, TOKENS)
    real = SEGMENTS != 0
    batch = {"tokens": jnp.asarray(TOKENS), "tokens_segment_ids": jnp.asarray(SEGMENTS),
             "tokens_positions": jnp.asarray(POSITIONS)}
    graphdef, params = nnx.split(model)
    settings = BD3LMSettings(block_size=block)

    def both():
        logits = _noisy_logits(model, TOKENS, block, noisy)
        loss_and_grads = jax.value_and_grad(lambda p: bd3lm.nelbo(nnx.merge(graphdef, p), batch, jax.random.key(1),
                                                                  MASK, settings)[0])(params)
        return logits, loss_and_grads

    structured, (loss, grads) = both()
    monkeypatch.setattr(attention, "two_stream", dense_two_stream)
    dense, (dense_loss, dense_grads) = both()
    np.testing.assert_allclose(structured[real], dense[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), float(dense_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(dense_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_oput_loss_and_gradients_equal_the_dense_mask(model, monkeypatch):
    rng = np.random.default_rng(2)
    tokens = rng.integers(3, MASK, (3, 16)).astype(np.int32)
    prompt_len = np.array([3, 5, 8], np.int32)
    batch = {"tokens": jnp.asarray(tokens), "prompt_len": jnp.asarray(prompt_len),
             "loss_mask": jnp.asarray(np.arange(16)[None] >= prompt_len[:, None]),
             "truncated": jnp.zeros(3, jnp.int32)}
    settings = OPUTSettings(block_size=4, on_policy_ratio=0.5, noise_range_low=0.5, noise_range_high=0.9)
    graphdef, params = nnx.split(model)
    run = jax.value_and_grad(lambda p: oput.train_loss(nnx.merge(graphdef, p), batch, jax.random.key(3), MASK,
                                                       settings)[0])
    loss, grads = run(params)
    monkeypatch.setattr(attention, "two_stream", dense_two_stream)
    dense_loss, dense_grads = run(params)
    np.testing.assert_allclose(float(loss), float(dense_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(dense_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def _step_flops(objective: list[str]) -> float:
    """XLA's FLOP count of one compiled train step at a shape where attention matters (rows of 1,024
    tokens, hidden 128 x 2 layers, blocks of 16)."""
    cfg = config_lib.load(None, ["run_dir=unused", "data.path=unused", "model.vocab_size=512", "model.hidden=128",
                                 "model.layers=2", "model.heads=2", "model.mlp_hidden=352", "model.max_seq_len=1024",
                                 "data.seq_len=1024", "train.global_batch=2", *objective])
    tx, schedule = state.make_optimizer(cfg.optim, 10)
    abstract = jax.eval_shape(lambda: state.init_state(cfg, tx))
    step = train.make_train_step(state.model_graphdef(cfg), cfg, 511, tx, schedule)
    rows = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
    batch = {"tokens": rows, "tokens_segment_ids": rows, "tokens_positions": rows}
    return step.lower(abstract, batch).compile().cost_analysis()["flops"]


def test_a_bd3lm_step_costs_at_most_2_2_mdlm_steps_in_xla_flops(monkeypatch, capsys):
    """Both streams run every weight (2x an MDLM step), the LM head only the noisy one; attention
    scores cost 2 L^2 + 3 L x block, not the (2L)^2 of a dense mask (which is over 2.2x here)."""
    mdlm_flops = _step_flops(["objective.name=mdlm"])
    bd3lm_flops = _step_flops(["objective.name=bd3lm", "objective.block_size=16"])
    monkeypatch.setattr(attention, "two_stream", dense_two_stream)
    dense_flops = _step_flops(["objective.name=bd3lm", "objective.block_size=16"])
    with capsys.disabled():
        print(f"\nXLA FLOPs per train step: mdlm {mdlm_flops:.4g}, bd3lm {bd3lm_flops:.4g} "
              f"({bd3lm_flops / mdlm_flops:.3f}x), bd3lm under a dense [2L, 2L] mask {dense_flops:.4g} "
              f"({dense_flops / mdlm_flops:.3f}x)")
    assert bd3lm_flops <= 2.2 * mdlm_flops < dense_flops


def test_one_block_per_document_is_mdlm_at_the_same_noise(model):
    cfg = BD3LMSettings(block_size=64)  # longer than any document
    key = jax.random.key(3)
    t_B = jnp.array([0.3, 0.8])
    batch = {"tokens": jnp.asarray(TOKENS), "tokens_segment_ids": jnp.asarray(SEGMENTS),
             "tokens_positions": jnp.asarray(POSITIONS)}
    mdlm_total, mdlm_count = mdlm.nelbo(model, batch, key, MASK, cfg, t_B=t_B)
    bd_total, bd_count = bd3lm.nelbo(model, batch, key, MASK, cfg, t_BL=jnp.broadcast_to(t_B[:, None], SEGMENTS.shape))
    assert int(bd_count) == int(mdlm_count) == int(((SEGMENTS != 0) & (POSITIONS != 0)).sum())
    assert float(mdlm_total) > 0
    np.testing.assert_allclose(float(bd_total), float(mdlm_total), rtol=1e-5)


def _noisy_logits(model, tokens, block, noisy=None):
    positions, segments = jnp.asarray(POSITIONS), jnp.asarray(SEGMENTS)
    noisy = jnp.asarray(tokens if noisy is None else noisy)
    return np.asarray(two_stream.noisy_stream_logits(model, noisy, jnp.asarray(tokens), positions, segments, block))


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
    cfg = BD3LMSettings(block_size=2)
    t = np.asarray(bd3lm.block_times(jax.random.key(0), jnp.asarray(POSITIONS), jnp.asarray(SEGMENTS), cfg))
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
    clipped = BD3LMSettings(block_size=2, noise_range_low=0.45, noise_range_high=0.55)
    t = np.asarray(bd3lm.block_times(jax.random.key(0), jnp.asarray(POSITIONS), jnp.asarray(SEGMENTS), clipped))
    assert (t >= 0.45).all() and (t <= 0.55).all()


def test_a_tiny_bd3lm_run_learns(bd3lm_run):
    rows = [json.loads(line) for line in (bd3lm_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert rows[-1]["ppl_bound"] == pytest.approx(np.exp(rows[-1]["nelbo"]))
