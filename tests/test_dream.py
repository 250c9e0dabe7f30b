"""Dream: the shift, CART, the loss normalisers, the decoder's schedule and oracles (the reference
numbers are those of ../shared/notes/dream-editflow.md, A5), and the AR -> Dream path end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evals import decoders
from evals.config import SamplingConfig
from evals.decoders import common, dream as dream_decoder, full_attention
from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.model import Transformer
from trainer.objectives import dream, masking, mdlm

MASK, V = 39, 40


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig(vocab_size=V, hidden=32, layers=2, heads=2, mlp_hidden=64, max_seq_len=64),
                       nnx.Rngs(5))


def packed(tokens_BL, segments_BL=None):
    tokens_BL = jnp.asarray(tokens_BL, jnp.int32)
    segments_BL = jnp.ones_like(tokens_BL) if segments_BL is None else jnp.asarray(segments_BL, jnp.int32)
    starts = jnp.pad(segments_BL[:, 1:] != segments_BL[:, :-1], ((0, 0), (1, 0))).at[:, 0].set(True)
    index = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return {"tokens": tokens_BL, "tokens_segment_ids": segments_BL, "tokens_positions": index - first}


def test_the_shift_reads_each_position_from_the_one_before():
    logits = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    shifted = masking.shift_BLV(logits)
    assert (shifted[:, 0] == logits[:, 0]).all() and (shifted[:, 1:] == logits[:, :-1]).all()


def test_under_a_causal_mask_the_shifted_logits_are_the_ar_models_and_bidirectional_ones_are_not(model):
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, MASK)
    segments, positions = jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(12), tokens.shape)
    j = 7
    suffix_masked = tokens.at[:, j:].set(MASK)
    ar = model(tokens, segments, positions, True)
    causal = masking.shift_BLV(model(suffix_masked, segments, positions, True))
    bidirectional = masking.shift_BLV(model(suffix_masked, segments, positions, False))
    assert (causal[:, j] == ar[:, j - 1]).all()  # bit-exact: the same prefix, the same program
    assert not jnp.allclose(bidirectional[:, j], ar[:, j - 1], atol=1e-4)  # the masked right context leaks in


def test_the_first_token_of_each_document_is_never_a_target(model):
    batch = packed(np.full((1, 10), 5), [[1, 1, 1, 1, 2, 2, 2, 3, 3, 0]])
    nll_BL, masked_BL, scored_BL, _ = mdlm.masked_nll_BL(model, batch, jax.random.key(0), MASK,
                                                         dream.DreamSettings(), t_B=jnp.ones(1), shift=True)
    first = np.array([[1, 0, 0, 0, 1, 0, 0, 1, 0, 1]], bool)  # each document's first token, and padding
    assert not np.asarray(masked_BL)[first].any() and np.asarray(masked_BL)[~first].all()
    assert (np.asarray(nll_BL)[first] == 0).all() and (np.asarray(scored_BL) == ~first).all()


def cart_by_kernel(masked, segments, p):
    """CART as the note writes it: w = masked * ((clean within the document) @ G)."""
    L = masked.shape[1]
    distance = np.abs(np.arange(L)[:, None] - np.arange(L)[None])
    kernel = np.where(distance > 0, 0.5 * p * (1 - p) ** (distance - 1.0), 0.0)
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0)
    clean = ~masked
    return masked * np.einsum("bij,bj->bi", kernel[None] * same, clean.astype(float))


@pytest.mark.parametrize("L,i,want", [(20, 5, 0.912574), (20, 0, 0.499430)])
def test_cart_of_one_masked_token_has_the_closed_form(L, i, want):
    masked = np.zeros((1, L), bool)
    masked[0, i] = True
    w = dream.cart_weights_BL(jnp.asarray(masked), jnp.ones((1, L), jnp.int32), 0.3)
    assert float(w[0, i]) == pytest.approx(want, abs=1e-6)
    assert float(w[0, i]) == pytest.approx(0.5 * (1 - 0.7 ** i) + 0.5 * (1 - 0.7 ** (L - 1 - i)), abs=1e-6)


def test_cart_small_cases_and_packed_documents():
    w = dream.cart_weights_BL(jnp.asarray([[False, True, True, False]]), jnp.ones((1, 4), jnp.int32), 0.5)
    np.testing.assert_allclose(w, [[0, 0.375, 0.375, 0]], atol=1e-7)
    assert (dream.cart_weights_BL(jnp.ones((2, 9), bool), jnp.ones((2, 9), jnp.int32), 0.3) == 0).all()
    rng = np.random.default_rng(0)
    masked = rng.random((4, 48)) < 0.5
    segments = np.where(np.arange(48) < 41, np.sort(rng.integers(1, 5, (4, 48)), 1), 0)
    got = dream.cart_weights_BL(jnp.asarray(masked), jnp.asarray(segments), 0.3)
    np.testing.assert_allclose(got, cart_by_kernel(masked & (segments != 0), segments, 0.3), atol=1e-6)


class Uniform(nnx.Module):
    """Logits that are all zero: every token equally likely."""

    def __call__(self, tokens_BL, segment_ids_BL, positions_BL, causal=False):
        return jnp.zeros((*tokens_BL.shape, V))


@pytest.mark.parametrize("weight", dream.TIME_WEIGHTS)
@pytest.mark.parametrize("norm", dream.LOSS_NORMS)
def test_a_uniform_model_scores_log_vocab_times_the_weights_over_each_normaliser(weight, norm):
    batch = packed(np.random.default_rng(1).integers(0, MASK, (3, 16)), [[1] * 10 + [2] * 6, [1] * 16, [1] * 12 + [0] * 4])
    s = dream.DreamSettings(time_weight=weight, loss_norm=norm)
    key = jax.random.key(3)
    total, count, _ = dream.train_loss(Uniform(), batch, key, MASK, s)
    _, masked, scored, weight_B = mdlm.masked_nll_BL(Uniform(), batch, key, MASK, s, shift=True)
    masked, scored = np.asarray(masked), np.asarray(scored)
    w = {"cart": np.asarray(dream.cart_weights_BL(jnp.asarray(masked), batch["tokens_segment_ids"], s.cart_p)),
         "inverse_t": masked * np.asarray(weight_B)[:, None], "none": masked.astype(float)}[weight]
    log_v = math.log(V - 1)  # SUBS: the mask is never predicted
    if norm == "sequence":
        want, want_count = (log_v * w.sum(1) / scored.sum(1)).sum(), 3
    else:
        want = log_v * w.sum()
        want_count = {"token": scored.sum(), "masked": masked.sum(), "batch": 3}[norm]
    assert float(total) == pytest.approx(want, rel=1e-5) and int(count) == want_count


def test_the_evaluated_bound_is_the_inverse_t_nelbo_whatever_the_training_weight(model):
    batch = packed(np.random.default_rng(2).integers(0, MASK, (2, 16)))
    key = jax.random.key(4)
    bounds = [dream.eval_loss(model, batch, key, MASK, dream.DreamSettings(time_weight=w), 0.4) for w in dream.TIME_WEIGHTS]
    assert all(float(b[0]) == float(bounds[0][0]) for b in bounds)
    nll_BL, _, _, weight_B = mdlm.masked_nll_BL(model, batch, key, MASK, dream.DreamSettings(), jnp.full(2, 0.4), True)
    assert float(bounds[0][0]) == pytest.approx(float((nll_BL * weight_B[:, None]).sum()), rel=1e-6)


@pytest.mark.parametrize("length,steps,head,tail", [(128, 128, [0, 1, 1], [1, 1, 2]), (128, 32, [3, 4, 4], [4, 4, 5])])
def test_the_decoders_schedule_matches_dreams(length, steps, head, tail):
    n, counts = jnp.array([length]), []
    for j in range(steps):
        k = int(dream_decoder.unmask_counts(n, jnp.int32(j), steps, 1e-3)[0])
        counts.append(k)
        n = n - k
    assert counts[:3] == head and counts[-3:] == tail and sum(counts) == length


def test_counts_are_per_row_not_a_batch_average():
    k = dream_decoder.unmask_counts(jnp.array([32, 4]), jnp.int32(0), 4, 1e-3)
    assert k.tolist() == [7, 0]  # floor(32 * 0.24975), floor(4 * 0.24975): Dream's batch mean would give both 4


def decode_with(logits_fn, cfg, prompt, eos=-1):
    """full_attention.decode_step's loop driven by `logits_fn(tokens) -> logits` instead of a model."""
    total = prompt.shape[1] + cfg.gen_length
    s = full_attention.start_state(jnp.asarray(prompt), total, MASK)
    while int(s.block) < cfg.gen_length // cfg.block_length and not bool(s.done.all()):
        s = full_attention.decode_step(logits_fn(s.tokens), s, jax.random.key(0), prompt.shape[1], cfg, MASK, eos,
                                       dream_decoder.schedule_commit, dream_decoder.confidence)
    return s


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("alg_temp", [0.0, 0.5])
def test_one_hot_logits_reproduce_the_target_with_every_alg(alg, alg_temp):
    rng = np.random.default_rng(0)
    target = rng.integers(0, MASK, (3, 4 + 24))
    # The shifted logits are one-hot on the target: position i-1 holds token i's one-hot.
    one_hot = jnp.asarray(np.roll(np.eye(V)[target] * 20.0, -1, axis=1))
    cfg = SamplingConfig(gen_length=24, block_length=8, remask_steps=12, alg=alg, alg_temp=alg_temp)
    s = decode_with(lambda tokens: masking.shift_BLV(one_hot), cfg, target[:, :4])
    assert (np.asarray(s.tokens) == target).all()
    forwards = np.asarray(s.forwards)  # each block's 12 / 3 steps, the last unmasking the rest (origin: at most)
    assert (forwards <= 12).all() if alg == "origin" else (forwards == 12).all()


def test_maskgit_plus_greedy_unmasks_in_descending_confidence():
    confidence = np.random.default_rng(3).permutation(16) + 1.0  # position i's logit margin
    logits = np.zeros((1, 2 + 16, V), np.float32)
    logits[0, 2:, 7] = confidence
    cfg = SamplingConfig(gen_length=16, block_length=16)  # one token per step (k = 0 at the first, 2 at the last)
    s = decode_with(lambda tokens: jnp.asarray(logits), cfg, np.array([[1, 2]]))
    order = np.asarray(s.decoded_at)[0, 2:]
    assert (np.argsort(-confidence, kind="stable") == np.argsort(order, kind="stable")).all()


def test_the_dream_decoder_leaves_no_mask_and_never_changes_the_prompt(model):
    graphdef, params = nnx.split(model)
    prompt = np.random.default_rng(0).integers(0, MASK, (3, 6)).astype(np.int32)
    for steps in (0, 8):
        cfg = SamplingConfig(gen_length=16, block_length=8, remask_steps=steps, alg="entropy")
        build = decoders.get("dream").build
        out = common.run(build(graphdef, prompt.shape, cfg, MASK, -1), nnx.to_pure_dict(params), prompt,
                         jax.random.key(0), cfg)
        assert (out.tokens[:, :6] == prompt).all() and not (out.tokens == MASK).any()
        assert (out.forwards == (steps or 16)).all() and (out.decoded_at[:, 6:] > 0).all()


def test_shifted_decoders_fit_only_shifted_objectives():
    assert decoders.fitting("dream") == ("dream", "dream_threshold")
    assert "dream" not in decoders.fitting("mdlm") and not decoders.is_matched("dream", "mdlm")
    from trainer import config as config_lib

    run_cfg = config_lib.load(None, ["objective.name=dream"])
    with pytest.raises(ConfigError, match="Dream's shift"):
        decoders.plan("remask", SamplingConfig(), run_cfg)
    with pytest.raises(ConfigError, match="Dream's shift"):
        decoders.plan("dream", SamplingConfig(), dataclasses.replace(run_cfg, objective=mdlm.MDLMSettings()))
    assert decoders.plan("auto", SamplingConfig(), run_cfg)[0] == ["dream", "dream_threshold"]


def test_the_dream_program_commits_the_most_confident_shifted_predictions_first(model):
    graphdef, params = nnx.split(model)
    prompt = np.random.default_rng(1).integers(0, MASK, (2, 6)).astype(np.int32)
    cfg = SamplingConfig(gen_length=16, block_length=16, remask_steps=4)  # the first step unmasks 3 per row
    out = common.run(decoders.get("dream").build(graphdef, prompt.shape, cfg, MASK, -1), nnx.to_pure_dict(params),
                     prompt, jax.random.key(0), cfg)
    start = jnp.concatenate([jnp.asarray(prompt), jnp.full((2, 16), MASK, jnp.int32)], 1)
    logits = masking.shift_BLV(model(start, jnp.ones_like(start), jnp.broadcast_to(jnp.arange(22), start.shape)))
    logits = np.asarray(logits.at[..., MASK].set(-jnp.inf))[:, 6:]
    confidence = np.exp(logits.max(-1)) / np.exp(logits).sum(-1)
    for row in range(2):
        first = np.flatnonzero(out.decoded_at[row, 6:] == 1)
        assert sorted(first) == sorted(np.argsort(-confidence[row])[:3])
        assert (out.tokens[row, 6 + first] == logits[row, first].argmax(-1)).all()


@pytest.fixture(scope="module")
def ar_run(tiny_dataset, tmp_path_factory):
    from tests.conftest import TINY_MODEL
    from trainer import config as config_lib
    from trainer import train

    run_dir = tmp_path_factory.mktemp("dream") / "ar"
    cfg = config_lib.load(None, [f"data.path={tiny_dataset}", f"run_dir={run_dir}", *TINY_MODEL, "objective.name=ar",
                                 "train.steps=150", "train.checkpoint_every=150", "train.log_every=50"])
    assert train.run(cfg) == 0
    return run_dir


def test_an_ar_runs_params_start_dream_below_log_vocab_and_below_the_same_weights_unshifted(ar_run):
    from evals import perplexity
    from evals.config import PerplexityConfig
    from trainer import config as config_lib
    from trainer import data, state

    run_cfg = config_lib.load_run(ar_run)
    manifest = data.load_manifest(run_cfg.data.path)
    weights = state.load_params(str(ar_run))
    nats = {}
    for name in ("dream", "mdlm"):
        cfg = dataclasses.replace(run_cfg, objective=config_lib.load(None, [f"objective.name={name}"]).objective)
        nats[name] = perplexity.evaluate(weights.graphdef, weights.params, cfg, manifest,
                                         PerplexityConfig(max_tokens=1500, time_samples=4))["nats_per_token"]
    log_v = math.log(run_cfg.model.vocab_size)
    # Measured: 5.2 nats with the shift, 6.1 without, log V = 6.7 (bidirectional attention disturbs this
    # small model's AR features; the next-token head still carries over only with the shift).
    assert nats["dream"] < log_v - 1 and nats["dream"] < nats["mdlm"] - 0.4, (nats, log_v)


def test_an_ar_run_and_its_export_start_dream_with_the_same_params_and_first_loss(ar_run, tmp_path):
    from tests.conftest import TINY_MODEL
    from trainer import config as config_lib
    from trainer import export, state, train

    assert export.main(["--run_dir", str(ar_run), "--output", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["diffusion_lm"]["shifted_logits"] is False
    data_path = config_lib.load_run(ar_run).data.path
    common_overrides = [f"data.path={data_path}", *TINY_MODEL, "objective.name=dream", "train.steps=1",
                        "train.checkpoint_every=1"]
    for name, source in (("from_run", f"train.init_from_run={ar_run}"), ("from_export", f"model.init_from={tmp_path / 'hf'}")):
        assert train.run(config_lib.load(None, [*common_overrides, f"run_dir={tmp_path / name}", source])) == 0
    first = [json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]
             for name in ("from_run", "from_export")]
    assert first[0] == first[1]
    a, b = (state.load_params(str(tmp_path / name)).params for name in ("from_run", "from_export"))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def dream_run(ar_run, tmp_path_factory):
    from tests.conftest import TINY_MODEL
    from trainer import config as config_lib
    from trainer import train

    run_dir = tmp_path_factory.mktemp("dream") / "dream"
    cfg = config_lib.load(None, [f"data.path={config_lib.load_run(ar_run).data.path}", f"run_dir={run_dir}",
                                 *TINY_MODEL, "objective.name=dream", f"train.init_from_run={ar_run}",
                                 "train.steps=5", "train.checkpoint_every=5"])
    assert train.run(cfg) == 0
    return run_dir


def generate(capsys, *argv) -> tuple[int, str, str]:
    from evals import generate as cli

    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_continues_prompts_for_a_run_and_its_export_alike(ar_run, tmp_path, capsys):
    from trainer import export

    assert export.main(["--run_dir", str(ar_run), "--output", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    prompts = ["--prompt", "Once upon a time", "--prompt", "One day, a little", "--prompt", "Tom"]
    code, from_run, _ = generate(capsys, "--run_dir", ar_run, *prompts, "gen_length=12")
    assert code == 0
    code, from_export, _ = generate(capsys, "--run_dir", tmp_path / "hf", *prompts, "gen_length=12")
    assert code == 0
    texts = [line for line in from_run.splitlines() if not line.startswith("  ")]
    asked = ["Once upon a time", "One day, a little", "Tom"]
    assert len(texts) == 3 and all(t.startswith(p) and len(t) > len(p) for t, p in zip(texts, asked))  # in order
    assert from_run.count("[causal:") == 3 and "1.00 tokens/forward" in from_run
    strip_time = lambda out: [line.rsplit(",", 1)[0] for line in out.splitlines()]  # noqa: E731
    assert strip_time(from_run) == strip_time(from_export)


def test_generate_infills_mask_spans_and_traces_each_forward(dream_run, capsys):
    code, out, _ = generate(capsys, "--run_dir", dream_run, "--infill", "--trace", "--prompt",
                            "Once upon a time, there was a <|mask|>*3 named Tom.")
    assert code == 0
    text, *trace, cost = out.splitlines()
    assert text.startswith("Once upon a time, there was a") and text.endswith(" named Tom.") and "<|mask|>" not in text
    assert "[dream: 3 tokens in 3 forwards" in cost
    assert len(trace) == 3 and trace[0].count("_") >= 2 and "_" not in trace[-1]


@pytest.mark.parametrize("argv,message", [
    (["--sampler", "nope", "--prompt", "x"], "sampler 'nope' is not a registered decoder"),
    (["--sampler", "remask", "--prompt", "x"], "Dream's shift"),
    (["--prompt", "x", "gen_length=500"], "gen_length=500 exceed the 64 positions the model was trained on"),
    (["--prompt", "no gap here", "--infill"], "has no mask span"),
    (["--prompt", "x", "--step", "3"], "no committed checkpoint at step 3"),
    (["--prompt", "x", "alg=best"], "sampling.alg must be one of"),
])
def test_generate_refuses_bad_requests_in_one_line(dream_run, capsys, argv, message):
    code, out, err = generate(capsys, "--run_dir", dream_run, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out


def test_generate_cannot_infill_with_a_causal_model(ar_run, capsys):
    code, _, err = generate(capsys, "--run_dir", ar_run, "--infill", "--prompt", "a <|mask|> b")
    assert code == 2 and "cannot see a gap's right side" in err
