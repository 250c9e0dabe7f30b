"""The eval stage: SPD implementations agree, decode rules hold, the bound is exact and
deterministic, the ledger is idempotent, and a watcher keeps up with a live trainer."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evals import __main__ as cli
from evals import compiled, decoders, perplexity, runs
from evals import config as eval_config
from evals.config import PerplexityConfig, SamplingConfig
from evals.decoders import block_causal, common
from tests.conftest import TINY_MODEL
from trainer import data, state, train
from trainer import config as config_lib
from trainer.config import ModelConfig
from trainer.model import Transformer

EVAL_SMALL = ["perplexity.max_tokens=1500", "perplexity.time_samples=2", "sampling.num_samples=2",
              "sampling.gen_length=16", "sampling.block_length=8", "sampling.steps=8", "wandb_mode=disabled"]
MASK, EOS = 39, 2


@pytest.fixture(scope="module")
def random_model():
    cfg = ModelConfig(vocab_size=40, hidden=32, layers=2, heads=2, mlp_hidden=64, max_seq_len=128)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(3)))
    return graphdef, nnx.to_pure_dict(params)


PROMPT = np.random.default_rng(0).integers(4, 39, (3, 5)).astype(np.int32)
SETTINGS = [
    dict(gen_length=32, block_length=16),
    dict(gen_length=32, block_length=16, threshold=0.05),
    dict(gen_length=20, block_length=4, threshold=0.02, confidence_stop=0.05),
    dict(gen_length=32, block_length=8, temperature=1.0, top_k=3, threshold=0.1),
    dict(gen_length=24, block_length=8, steps=3, suppress_mask=False),
    dict(gen_length=21, block_length=8, threshold=0.05),  # the last block is cut at prompt + generation
]


def run_program(build, model, cfg, eos=EOS, prompt=PROMPT, key=1):
    return common.run(build(model[0], prompt.shape, cfg, MASK, eos), model[1], prompt, jax.random.key(key), cfg)


@pytest.mark.parametrize("rule,settings,eos", [(block_causal.SPD, s, (EOS, -1)[i % 2]) for i, s in enumerate(SETTINGS)]
                         + [(block_causal.THRESHOLD, SETTINGS[2], EOS), (block_causal.THRESHOLD, SETTINGS[5], -1)])
def test_cached_and_uncached_programs_give_identical_tokens(random_model, settings, eos, rule):
    cfg = SamplingConfig(**settings)
    plain = run_program(block_causal.uncached(rule), random_model, cfg, eos)
    cached = run_program(block_causal.cached(rule), random_model, cfg, eos)
    assert np.array_equal(plain.tokens, cached.tokens)
    assert np.array_equal(plain.decoded_at, cached.decoded_at)
    # Cache writes ride along with the next block's first pass: no extra forwards.
    assert np.array_equal(plain.forwards, cached.forwards) and plain.batch_forwards == cached.batch_forwards
    assert plain.tokens.shape == (3, 5 + cfg.gen_length)
    assert (plain.tokens[:, :5] == PROMPT).all()
    if settings.get("suppress_mask", True):
        assert not (plain.tokens == MASK).any()


def test_spd_with_threshold_above_one_decodes_one_position_per_pass_leftmost_first(random_model):
    cfg = SamplingConfig(gen_length=24, block_length=8, steps=8, threshold=1.5)
    out = decoders.generate("spd", *random_model, PROMPT, cfg, MASK, -1, jax.random.key(0))
    for row in out.decoded_at:
        generated = row[5:]
        assert len(set(generated.tolist())) == len(generated)  # one position per pass
        for block_start in range(8, 32, 8):  # blocks at absolute positions; the first is partial
            block = row[max(block_start - 8, 5):block_start]
            assert (np.diff(block) > 0).all()  # leftmost first
    assert (out.forwards >= 24).all()  # every block takes at least as many passes as it has masks


def test_one_token_commits_exactly_one_token_per_decoding_forward(random_model):
    cfg = SamplingConfig(gen_length=24, block_length=8, threshold=0.01)  # one_token ignores the threshold
    out = decoders.generate("one_token", *random_model, PROMPT, cfg, MASK, -1, jax.random.key(0))
    for row in out.decoded_at:
        assert row[5:].tolist() == list(range(1, 25))  # one position per pass, none revised, left to right
    assert (out.forwards == 24).all() and out.batch_forwards == 24  # cache writes ride along with passes
    by_confidence = decoders.generate("one_token", *random_model, PROMPT, dataclasses.replace(cfg, order="confidence"),
                                      MASK, -1, jax.random.key(0))
    assert all(sorted(row[5:].tolist()) == list(range(1, 25)) for row in by_confidence.decoded_at)
    assert any(row[5:].tolist() != list(range(1, 25)) for row in by_confidence.decoded_at)  # another order
    fast = decoders.generate("threshold", *random_model, PROMPT, cfg, MASK, -1, jax.random.key(0))
    assert (fast.forwards < out.forwards).all()  # a low threshold commits several tokens per pass


def test_one_token_takes_one_pass_per_position_of_a_block_wider_than_the_old_pass_cap(random_model):
    """Blocks of 64 (59 + 64 generated positions): one pass per position, never a final pass that
    commits the rest at once (the threshold decoders run until their block is decoded)."""
    cfg = SamplingConfig(gen_length=123, block_length=64)
    out = decoders.generate("one_token", *random_model, PROMPT, cfg, MASK, -1, jax.random.key(0))
    assert (out.forwards == 123).all() and out.batch_forwards == 123
    for row in out.decoded_at:
        assert sorted(row[5:].tolist()) == list(range(1, 124))


def test_spd_passes_are_capped_at_the_block_width_by_default(random_model):
    cfg = SamplingConfig(gen_length=59, block_length=64, threshold=1.5, revise="yes", confidence_stop=2.0)
    out = decoders.generate("spd", *random_model, PROMPT, cfg, MASK, -1, jax.random.key(0))
    assert 59 <= out.batch_forwards <= 64  # 59 masks decoded one per pass, then revisions up to the cap
    capped = decoders.generate("spd", *random_model, PROMPT, dataclasses.replace(cfg, steps=10), MASK, -1,
                               jax.random.key(0))
    assert capped.batch_forwards == 10 and not (capped.tokens == MASK).any()  # leftovers from the last pass


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_the_token_choice_equals_argmax_and_softmax_without_materialising_them(temperature):
    """`choose` reads the logits once: its tokens (the lowest index on ties), probabilities and
    top-k are jnp.argmax's and the softmax's, with the mask suppressed."""
    logits = jax.random.normal(jax.random.key(0), (3, 8, 40)) * 3
    logits = logits.at[:, :2, 7].set(50.0).at[:, :2, 9].set(50.0).at[:, 2, MASK].set(60.0)  # ties; a mask win
    cfg = SamplingConfig(temperature=temperature)
    choice = common.choose(logits, jax.random.key(1), cfg, MASK)
    suppressed = logits.at[..., MASK].set(-jnp.inf)
    probs = jax.nn.softmax(suppressed, -1)
    greedy = jnp.argmax(suppressed, -1)
    np.testing.assert_array_equal(choice.argmax, greedy)
    assert (choice.argmax[:, :2] == 7).all() and (choice.argmax != MASK).all()
    np.testing.assert_allclose(choice.p_max, probs.max(-1), rtol=1e-6)
    np.testing.assert_allclose(choice.conf, jnp.take_along_axis(probs, choice.x0[..., None], -1)[..., 0], rtol=1e-5)
    if temperature == 0:
        np.testing.assert_array_equal(choice.x0, greedy)
    else:
        noisy = suppressed / temperature + jax.random.gumbel(jax.random.key(1), logits.shape)
        np.testing.assert_array_equal(choice.x0, jnp.argmax(noisy, -1))
    for k in (1, 3):
        p, ids = common.top_k_probs(choice, k)
        want_p, want_ids = jax.lax.top_k(probs, k)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(p, want_p, rtol=1e-5)


def test_soft_inputs_only_where_the_model_revises():
    """A SUBS model (revise: no) sees each decoded position as its committed token's embedding; a model
    that revises (OPUT) sees the soft top-k mix there, or its draft's embedding with spd_inputs=hard.
    Masked positions are the mask embedding."""
    embedding = jax.random.normal(jax.random.key(0), (12, 4))
    tokens = jnp.array([[3, 5, 11, 11]])
    result = block_causal.Pass(tokens=tokens, masked=jnp.array([[False, False, True, True]]),
                               newly=None, revised=None, stop=None, x0=tokens,
                               topk_p=jnp.array([[[0.6, 0.3]] * 4]), topk_ids=jnp.array([[[5, 3]] * 4]))
    in_a = jnp.ones((1, 4), bool)
    hard = block_causal.soft_inputs(embedding, result, in_a, SamplingConfig(revise="no"), 11)
    np.testing.assert_array_equal(hard, embedding[tokens])
    soft = block_causal.soft_inputs(embedding, result, in_a, SamplingConfig(revise="yes"), 11)
    np.testing.assert_array_equal(soft[:, 2:], embedding[tokens][:, 2:])
    assert not np.allclose(soft[:, :2], embedding[tokens][:, :2])
    drafts = block_causal.soft_inputs(embedding, result, in_a, SamplingConfig(revise="yes", spd_inputs="hard"), 11)
    np.testing.assert_array_equal(drafts, embedding[tokens])


@pytest.mark.parametrize("name", ["spd", "spd_cached"])
def test_spd_revises_drafts_only_when_told(random_model, name):
    cfg = SamplingConfig(gen_length=32, block_length=8, threshold=0.05, confidence_stop=2.0)
    revising = decoders.generate(name, *random_model, PROMPT, dataclasses.replace(cfg, revise="yes"), MASK, -1,
                                 jax.random.key(0))
    assert revising.revisions.sum() > 0
    fixed = decoders.generate(name, *random_model, PROMPT, dataclasses.replace(cfg, revise="no"), MASK, -1,
                              jax.random.key(0))
    assert fixed.revisions.sum() == 0


def test_a_sequence_is_charged_only_the_passes_it_needed(random_model):
    cfg = SamplingConfig(gen_length=32, block_length=8, threshold=0.05)
    together = decoders.generate("spd_cached", *random_model, PROMPT, cfg, MASK, EOS, jax.random.key(0))
    alone = [decoders.generate("spd_cached", *random_model, PROMPT[i:i + 1], cfg, MASK, EOS, jax.random.key(0))
             for i in range(len(PROMPT))]
    assert together.forwards.tolist() == [a.batch_forwards for a in alone]
    assert len(set(together.forwards.tolist())) > 1  # they differ: the batch ran as many as the slowest
    assert together.batch_forwards >= together.forwards.max() > together.forwards.min()


def test_generation_stops_after_eos_and_fills_it(random_model):
    cfg = SamplingConfig(gen_length=32, block_length=8)
    out = decoders.generate("spd", *random_model, PROMPT, cfg, MASK, EOS, jax.random.key(0))
    for row in out.tokens[:, 5:]:
        hits = np.flatnonzero(row == EOS)
        if len(hits):
            assert (row[hits[0]:] == EOS).all()
    lengths = common.generated_lengths(out, 5, EOS)
    assert ((lengths >= 1) & (lengths <= 32)).all()


def test_remasking_commits_one_token_per_step_within_blocks(random_model):
    cfg = SamplingConfig(gen_length=16, block_length=8)  # remask_steps 0 = one token per step
    out = decoders.generate("remask", *random_model, PROMPT, cfg, MASK, -1, jax.random.key(0))
    assert out.batch_forwards == 16 and (out.forwards == 16).all()
    for row in out.decoded_at:
        assert sorted(row[5:].tolist()) == list(range(1, 17))
        assert row[5:13].max() < row[13:].min()  # block 1 is finished before block 2 starts


@pytest.mark.timeout(300, method="thread")  # the defect this pins was a decoding loop that never ended
@pytest.mark.parametrize("name", ["remask", "threshold_full"])
def test_full_attention_decoders_finish_when_the_model_predicts_the_mask_token(random_model, name):
    graphdef, params = random_model
    params = jax.tree.map(lambda x: x, params)
    params["embed"]["embedding"] = params["embed"]["embedding"].at[MASK].multiply(50.0)  # tied head: MASK wins
    cfg = SamplingConfig(gen_length=16, block_length=8, threshold=0.05, suppress_mask=False)
    out = decoders.generate(name, graphdef, params, PROMPT, cfg, MASK, -1, jax.random.key(0))
    assert (out.tokens[:, 5:] == MASK).any()  # the mask id was committed as a token
    assert (out.decoded_at[:, 5:] > 0).all() and (out.forwards <= 16).all()  # each position decoded once


def test_full_attention_threshold_commits_confident_tokens_within_blocks(random_model):
    cfg = SamplingConfig(gen_length=16, block_length=8, threshold=0.05)
    out = decoders.generate("threshold_full", *random_model, PROMPT, cfg, MASK, -1, jax.random.key(0))
    assert (out.forwards < 16).all() and out.batch_forwards >= out.forwards.max()
    for row in out.decoded_at:
        assert row[5:13].max() < row[13:].min()
    strict = decoders.generate("threshold_full", *random_model, PROMPT, dataclasses.replace(cfg, threshold=2.0),
                               MASK, -1, jax.random.key(0))
    one = decoders.generate("remask", *random_model, PROMPT, cfg, MASK, -1, jax.random.key(0))
    assert np.array_equal(strict.tokens, one.tokens)  # above 1: the most confident token only, like remasking


@pytest.mark.parametrize("name", ["spd", "threshold", "remask"])  # one of each program kind
def test_samplers_reuse_their_program_across_checkpoints_but_not_the_weights(random_model, name):
    cfg = SamplingConfig(gen_length=16, block_length=8, remask_steps=4)
    graphdef, params = random_model
    other = jax.tree.map(lambda x: x[::-1] if x.ndim == 2 else x, params)  # a new "checkpoint"
    compiled._FUNCTIONS.clear()
    first = decoders.generate(name, graphdef, params, PROMPT, cfg, MASK, EOS, jax.random.key(0))
    second = decoders.generate(name, graphdef, other, PROMPT, cfg, MASK, EOS, jax.random.key(0))
    assert len(compiled._FUNCTIONS) == 1  # one program, two weight sets
    compiled._FUNCTIONS.clear()
    fresh = decoders.generate(name, graphdef, other, PROMPT, cfg, MASK, EOS, jax.random.key(0))
    assert np.array_equal(second.tokens, fresh.tokens) and np.array_equal(second.forwards, fresh.forwards)
    assert not np.array_equal(first.tokens, second.tokens)


def test_samplers_follow_the_objective_and_refuse_impossible_settings(tiny_dataset, tmp_path):
    overrides = [f"data.path={tiny_dataset}", f"run_dir={tmp_path}", *TINY_MODEL]
    run = config_lib.load(None, overrides)
    cfg = SamplingConfig(gen_length=32, prompt_tokens=8)
    names, resolved = decoders.plan("auto", cfg, run)
    assert names == ["remask", "threshold_full"] and resolved.block_length == 32  # MDLM: full attention
    run = config_lib.load(None, [*overrides, "objective.name=bd3lm", "objective.block_size=16"])
    names, resolved = decoders.plan("auto", cfg, run)
    assert names == ["one_token", "threshold", "spd", "spd_cached"] and resolved.block_length == 16
    assert decoders.plan("remask,spd", cfg, run)[0] == ["remask", "spd"]
    assert decoders.plan("spd_cached@0.5,one_token", cfg, run)[0] == ["spd_cached@0.5", "one_token"]
    with pytest.raises(config_lib.ConfigError, match="unknown"):
        decoders.plan("spd@fast", cfg, run)
    assert not decoders.is_matched("remask", "bd3lm") and decoders.is_matched("spd", "oput")
    with pytest.raises(config_lib.ConfigError, match="unknown"):
        decoders.plan("spd,nope", cfg, run)
    with pytest.raises(config_lib.ConfigError, match="trained on"):
        decoders.plan("auto", dataclasses.replace(cfg, gen_length=60), run)  # 8 + 60 > data.seq_len 64
    with pytest.raises(config_lib.ConfigError, match="multiple of sampling.block_length"):
        decoders.plan("remask", dataclasses.replace(cfg, gen_length=24), run)


# --------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evals") / "run"
    cfg = config_lib.load(None, [f"data.path={tiny_dataset}", f"run_dir={run_dir}", *TINY_MODEL,
                                 "train.steps=20", "train.checkpoint_every=10", "train.log_every=10"])
    assert train.run(cfg) == 0
    return run_dir


def test_perplexity_bound_is_deterministic_and_equals_a_direct_computation(trained_run):
    run_cfg = runs.load_config(str(trained_run))
    manifest = data.load_manifest(run_cfg.data.path)
    graphdef, params, _ = state.load_params(str(trained_run), 20, run_cfg)
    cfg = PerplexityConfig(max_tokens=600, time_samples=3, batch_size=2, seed=5)
    first = perplexity.evaluate(graphdef, params, run_cfg, manifest, cfg)
    assert first == perplexity.evaluate(graphdef, params, run_cfg, manifest, cfg)
    # A run trained with data.eos_fill is scored on its documents only: the fill's EOS never count
    # (the rows a fill would change come last: the whole split is read).
    filled = dataclasses.replace(run_cfg, data=dataclasses.replace(run_cfg.data, eos_fill=True))
    longer = dataclasses.replace(cfg, max_tokens=0, time_samples=1, batch_size=8)
    assert (perplexity.evaluate(graphdef, params, filled, manifest, longer)
            == perplexity.evaluate(graphdef, params, run_cfg, manifest, longer))

    # Direct: the same rows, grid and keys, with masks and NLL computed here in numpy.
    model = nnx.merge(graphdef, params)
    mask_id = manifest["tokenizer"]["special_ids"]["mask"]
    eps = run_cfg.objective.eps
    grid = eps + (1 - eps) * (np.arange(3) + 0.5) / 3
    total, count, seen = 0.0, 0, 0
    rows = data.packed_dataset(run_cfg, manifest, "validation", 2, shuffle=False, repeat=False)
    for index, batch in enumerate(rows):
        if seen >= 600:
            break
        tokens, segments = batch["tokens"], batch["tokens_segment_ids"]
        real = segments != 0
        scored = real & (batch["tokens_positions"] != 0)  # each piece's first token is context
        seen += int(real.sum())
        for k, t in enumerate(grid):
            _, mask_key = jax.random.split(jax.random.fold_in(jax.random.key(5), index * 3 + k))
            masked = np.asarray(jax.random.uniform(mask_key, tokens.shape)) < (1 - eps) * t
            masked &= scored
            logits = np.array(model(jnp.where(masked, mask_id, tokens), segments, batch["tokens_positions"]))
            logits[..., mask_id] = -np.inf
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            nll = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
            total += float((nll * masked).sum() / t)
            count += int(scored.sum())
    assert first["ppl_tokens"] == seen
    np.testing.assert_allclose(first["nats_per_token"], total / count, rtol=1e-4)
    np.testing.assert_allclose(first["ppl_bound"], np.exp(total / count), rtol=1e-4)


def test_ar_exact_perplexity_is_the_sum_of_next_token_losses(tiny_dataset, tmp_path):
    run_cfg = config_lib.load(None, [f"data.path={tiny_dataset}", f"run_dir={tmp_path}", *TINY_MODEL,
                                     "objective.name=ar"])
    manifest = data.load_manifest(run_cfg.data.path)
    run_cfg.model.vocab_size = manifest["tokenizer"]["vocab_size"]
    params = state.init_state(run_cfg, state.make_optimizer(run_cfg.optim, 1)[0])["params"]  # untrained: any params
    graphdef = state.model_graphdef(run_cfg)
    result = perplexity.evaluate(graphdef, params, run_cfg, manifest, PerplexityConfig(max_tokens=0, batch_size=4))
    model = nnx.merge(graphdef, params)
    total, count = 0.0, 0
    for batch in data.packed_dataset(run_cfg, manifest, "validation", 4, shuffle=False, repeat=False):
        tokens, segments = batch["tokens"], batch["tokens_segment_ids"]
        logits = np.array(model(tokens, segments, batch["tokens_positions"], causal=True), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for row in range(len(tokens)):
            for i in range(1, tokens.shape[1]):  # each token predicted from its own document's earlier ones
                if segments[row, i] != 0 and segments[row, i] == segments[row, i - 1]:
                    total -= logp[row, i - 1, tokens[row, i]]
                    count += 1
    assert result["ppl_tokens"] == manifest["splits"]["validation"]["num_tokens"] and count > 1000
    np.testing.assert_allclose(result["nats_per_token"], total / count, rtol=1e-5)
    np.testing.assert_allclose(result["ar_ppl"], np.exp(total / count), rtol=1e-5)


def test_once_fills_the_ledger_idempotently_and_writes_the_report(trained_run, capsys):
    assert cli.main(["--run_dir", str(trained_run), "--once", *EVAL_SMALL]) == 0
    ledger = trained_run / "evals" / "ledger.jsonl"
    lines = ledger.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [10, 20]
    latest = records[-1]
    assert list(latest["samplers"]) == ["remask", "threshold_full"]  # MDLM: the full-attention samplers
    assert all(m["matched"] and m["attention"] == "full" for m in latest["samplers"].values())
    assert latest["samplers"]["remask"]["tokens_per_forward"] <= 1.0
    assert np.isfinite(latest["perplexity"]["ppl_bound"]) and len(latest["samples"]) == 2
    assert all(isinstance(s, str) and s for s in latest["samples"])
    assert latest["checkpoint"].endswith("checkpoints/20") and "total" in latest["wall_seconds"]
    capsys.readouterr()
    assert cli.main(["--run_dir", str(trained_run), "--once", *EVAL_SMALL]) == 0
    assert "every committed checkpoint is evaluated (2)" in capsys.readouterr().out
    assert ledger.read_text().splitlines() == lines  # never twice, never lost
    page = (trained_run / "evals" / "report.html").read_text()
    assert "<svg" in page and "threshold_full" in page and "Draft and polish" in page
    assert "training step" in page and "mismatched<" not in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_latest_evaluates_only_the_newest_committed_step(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("evals"))
    assert cli.main(["--run_dir", str(run), "--once", "--latest", *EVAL_SMALL]) == 0
    assert [json.loads(line)["step"] for line in (run / "evals" / "ledger.jsonl").read_text().splitlines()] == [20]
    assert cli.main(["--run_dir", str(run), "--once", *EVAL_SMALL]) == 0  # the rest, when asked
    assert [json.loads(line)["step"] for line in (run / "evals" / "ledger.jsonl").read_text().splitlines()] == [10, 20]


def test_run_directory_errors(tmp_path, capsys, tiny_dataset):
    assert cli.main(["--run_dir", str(tmp_path / "nope"), *EVAL_SMALL]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["--run_dir", str(tmp_path / "empty"), *EVAL_SMALL]) == 2
    assert "not a trainer run directory" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    cfg = config_lib.load(None, [f"data.path={tiny_dataset}", f"run_dir={fresh}", *TINY_MODEL])
    (fresh / "config.yaml").write_text(config_lib.dump(cfg))
    assert cli.main(["--run_dir", str(fresh), "--once", *EVAL_SMALL]) == 0
    assert "no committed checkpoint to evaluate yet" in capsys.readouterr().out
    cfg.data.path = str(tmp_path / "no-data")
    (fresh / "config.yaml").write_text(config_lib.dump(cfg))
    assert cli.main(["--run_dir", str(fresh), *EVAL_SMALL]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


@pytest.mark.slow
def test_watcher_beside_a_live_trainer_evaluates_each_step_once(tiny_dataset, tmp_path):
    run_dir = tmp_path / "live"
    log = tmp_path / "trainer.log"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "trainer", f"data.path={tiny_dataset}", f"run_dir={run_dir}", *TINY_MODEL,
         "train.steps=60", "train.checkpoint_every=10", "train.keep_last=10"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
    import time

    try:
        while not (run_dir / "config.yaml").exists():  # the watcher needs the run to exist
            assert trainer.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        watcher = subprocess.run(
            [sys.executable, "-m", "evals", "--run_dir", str(run_dir), "--watch", "poll_seconds=0.5", *EVAL_SMALL],
            capture_output=True, text=True, timeout=900)
        assert trainer.wait(timeout=600) == 0
    finally:
        trainer.kill()
    assert watcher.returncode == 0, watcher.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "evals" / "ledger.jsonl").read_text().splitlines()]
    assert sorted(steps) == [10, 20, 30, 40, 50, 60] and len(set(steps)) == len(steps)


@pytest.mark.slow
def test_gen_ppl_uses_an_ar_reference_run(trained_run, tiny_dataset, tmp_path):
    ar_dir = tmp_path / "ar"
    cfg = config_lib.load(None, [f"data.path={tiny_dataset}", f"run_dir={ar_dir}", *TINY_MODEL,
                                 "train.steps=10", "train.checkpoint_every=10", "objective.name=ar"])
    assert train.run(cfg) == 0
    assert cli.main(["--run_dir", str(ar_dir), "--once", *EVAL_SMALL]) == 0  # AR runs: exact ppl only
    ar_record = json.loads((ar_dir / "evals" / "ledger.jsonl").read_text().splitlines()[0])
    assert "ar_ppl" in ar_record["perplexity"] and "samplers" not in ar_record
    fresh = tmp_path / "mdlm"
    mdlm = config_lib.load(None, [f"data.path={tiny_dataset}", f"run_dir={fresh}", *TINY_MODEL,
                                  "train.steps=10", "train.checkpoint_every=10"])
    assert train.run(mdlm) == 0
    assert cli.main(["--run_dir", str(fresh), "--once", f"gen_ppl_run_dir={ar_dir}", *EVAL_SMALL]) == 0
    record = json.loads((fresh / "evals" / "ledger.jsonl").read_text().splitlines()[0])
    assert all(np.isfinite(m["gen_ppl"]) and m["gen_ppl"] > 1 for m in record["samplers"].values())




def test_a_step_deleted_before_its_turn_is_skipped_with_a_warning(trained_run, tmp_path, capsys):
    import shutil

    from evals.run import Evaluator

    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    shutil.rmtree(copy / "evals", ignore_errors=True)
    evaluator = Evaluator(str(copy), eval_config.load(None, EVAL_SMALL))
    assert evaluator.pending() == [10, 20]
    shutil.rmtree(copy / "checkpoints" / "10")  # keep-last cleanup, between listing and restoring
    assert evaluator.evaluate(10) is None
    assert "step 10 was deleted" in capsys.readouterr().out


def test_a_bd3lm_checkpoint_decodes_block_causally_and_is_charged_what_it_ran(bd3lm_run):
    run_cfg = runs.load_config(str(bd3lm_run))
    manifest = data.load_manifest(run_cfg.data.path)
    ids = data.special_ids(manifest)
    model = state.load_params(str(bd3lm_run), 40, run_cfg)[:2]
    prompt = perplexity.prompts(run_cfg, manifest, 3, 6)
    cfg = SamplingConfig(gen_length=40, block_length=8, threshold=0.1)
    for name in ("spd_cached", "threshold_full"):  # one block-causal, one full-attention program
        out = decoders.generate(name, *model, prompt, cfg, ids["mask"], ids["eos"], jax.random.key(0))
        assert out.tokens.shape == (3, 46) and not (out.tokens == ids["mask"]).any()  # ran to completion
        alone = [decoders.generate(name, *model, prompt[i:i + 1], cfg, ids["mask"], ids["eos"], jax.random.key(0))
                 for i in range(3)]
        # Each sequence's reported forwards are the forwards a decode of that sequence alone ran.
        assert out.forwards.tolist() == [a.batch_forwards for a in alone], name
        assert np.array_equal(out.tokens, np.concatenate([a.tokens for a in alone])), name
        assert (out.forwards <= out.batch_forwards).all()


def test_once_on_a_bd3lm_run_uses_the_block_causal_samplers_and_its_bound(bd3lm_run, capsys):
    assert cli.main(["--run_dir", str(bd3lm_run), "--once", *EVAL_SMALL, "samplers=auto",
                     "sampling.block_length=0"]) == 0
    record = json.loads((bd3lm_run / "evals" / "ledger.jsonl").read_text().splitlines()[-1])
    assert list(record["samplers"]) == ["one_token", "threshold", "spd", "spd_cached"]
    assert record["settings"]["sampling"]["block_length"] == 8  # the run's objective.block_size
    assert 0 <= record["samplers"]["spd"]["agreement_with_spd_cached"] <= 1
    assert record["quality_reference"]["sampler"] == "one_token" and record["quality_reference"]["step"] == 40
    # The built-in corpus: every decoder is checked against its grammar, the data's own figures beside.
    assert record["real_continuations"]["story_correctness"] == 1.0
    for metrics in record["samplers"].values():
        assert 0 <= metrics["story_correctness"] <= 1 and len(metrics["story_errors"]) == 2
        assert isinstance(metrics["at_reference_quality"], bool)
    assert record["samplers"]["one_token"]["at_reference_quality"]  # the reference is at its own quality
    assert np.isfinite(record["perplexity"]["ppl_bound"]) and record["perplexity"]["ppl_bound"] > 1
    pieces = record["trace"]["pieces"]  # decoded text pieces, not byte-level BPE markers
    assert "".join(p for p in pieces if not p.startswith("<|")) == record["samples"][0]
    assert "Ġ" not in "".join(pieces)
    capsys.readouterr()
    import shutil

    shutil.rmtree(bd3lm_run / "evals")
    assert cli.main(["--run_dir", str(bd3lm_run), "--once", *EVAL_SMALL,
                     "samplers=one_token,threshold@0.2,threshold@0.9,remask"]) == 0
    record = json.loads((bd3lm_run / "evals" / "ledger.jsonl").read_text().splitlines()[-1])
    assert list(record["samplers"]) == ["one_token", "threshold@0.2", "threshold@0.9", "remask"]
    assert record["samplers"]["one_token"]["matched"] and not record["samplers"]["remask"]["matched"]
    fast, careful = record["samplers"]["threshold@0.2"], record["samplers"]["threshold@0.9"]
    assert fast["forwards_per_sequence"] <= careful["forwards_per_sequence"]  # a lower threshold commits more
    assert "mismatched (full)<" in (bd3lm_run / "evals" / "report.html").read_text()
    assert cli.main(["--run_dir", str(bd3lm_run), "--once", *EVAL_SMALL, "samplers=spd,bogus"]) == 2
    assert "unknown ['bogus']" in capsys.readouterr().err


def test_the_report_draws_each_samplers_frontier_with_labelled_axes():
    from evals import report

    samplers = {"one_token": {"tokens_per_forward": 1.0, "gen_ppl": 5.0, "attention": "block_causal"},
                "threshold@0.5": {"tokens_per_forward": 3.0, "gen_ppl": 6.0, "attention": "block_causal"},
                "threshold@0.9": {"tokens_per_forward": 2.0, "gen_ppl": 5.1, "attention": "block_causal"}}
    page = report.render([{"step": 5, "perplexity": {"ppl_bound": 9.0}, "samplers": samplers},
                          {"step": 10, "perplexity": {"ppl_bound": 4.0}, "samplers": samplers}], "run")
    assert page.count("<polyline") == 2  # the bound over steps, and the threshold sampler through its settings
    assert "tokens per forward" in page and "gen-ppl (AR judge)" in page and "training step" in page
    assert ">threshold</text>" in page and ">one_token</text>" in page  # legend entries


def test_twins_are_one_row_and_the_reference_is_marked(tmp_path):
    """spd and spd_cached (same tokens by construction) appear once, with their agreement; the
    frontier marks the reference's one-token quality; the summary prints the same rows."""
    from evals import ledger, report, summary

    metrics = lambda tpf, ppl: {"tokens_per_forward": tpf, "gen_ppl": ppl, "gen_ppl_vs_reference": ppl / 4.0,  # noqa: E731
                                "distinct_2": 0.5, "attention": "block_causal", "matched": True,
                                "tokens_per_forward_interval": [tpf - 0.1, tpf + 0.1]}
    samplers = {"one_token": metrics(1.0, 4.2), "spd@0.7": {**metrics(2.5, 5.0), "agreement_with_spd_cached": 0.97},
                "spd_cached@0.7": metrics(2.5, 5.0)}
    reference = {"run_dir": "runs/base", "step": 300, "sampler": "one_token", "gen_ppl": 4.0}
    record = {"step": 10, "objective": "oput", "perplexity": {"ppl_bound": 4.0}, "samplers": samplers,
              "quality_reference": reference}
    rows = summary.sampler_rows(record)
    assert [r["label"] for r in rows] == ["one_token", "spd_cached@0.7 (= spd@0.7, 97% agreement)"]
    page = report.render([record], "runs/oput")
    assert page.count("spd@0.7") == 1 and "97% agreement" in page
    assert "stroke-dasharray" in page and "reference (one-token) 4</text>" in page  # the reference level
    assert "one_token of runs/base at step 300" in page and "[2.40, 2.60]" in page
    assert "<th>story correctness</th>" not in page  # no checker for this data: the column is absent, not zero
    ledger.Ledger(str(tmp_path)).append(record)
    printed = summary.text(str(tmp_path))
    assert "quality reference: one_token of runs/base step 300 (gen_ppl 4.000)" in printed
    assert "spd_cached@0.7 (= spd@0.7, 97% agreement)" in printed and "gen-ppl 5.00 = 1.25x" in printed
    assert "reference quality" not in printed  # judged only by an exact measure


def test_a_second_evaluation_with_other_harness_tasks_is_recorded_beside_the_first(tmp_path):
    """The settings hash covers the harness key: other tasks on an evaluated step are a second
    record, not silently dropped as the same one."""
    from evals import ledger

    first = dataclasses.asdict(eval_config.EvalConfig())
    second = dataclasses.asdict(eval_config.EvalConfig())
    second["harness"]["tasks"] = "tinystories_cloze"
    book = ledger.Ledger(str(tmp_path))
    for settings in (first, second):
        book.append({"step": 10, "settings": settings, "settings_hash": ledger.settings_hash(settings)})
    assert len(book.records()) == 2
    assert book.steps(first) == book.steps(second) == {10}


@pytest.mark.parametrize("order", ["confidence", "left_to_right"])
def test_the_one_token_decoder_commits_the_most_confident_or_the_leftmost_masked_position_each_pass(order):
    cfg = decoders.get("one_token").settings(SamplingConfig(block_length=8, order=order))
    margin = np.random.default_rng(4).permutation(8) + 1.0  # position k's logit lead: its confidence order
    logits = np.zeros((1, 8, 40), np.float32)
    logits[0, np.arange(8), np.arange(8) + 5] = margin  # position k's best token is k + 5
    tokens, masked = jnp.full((1, 8), MASK), jnp.ones((1, 8), bool)
    order = []
    for _ in range(8):
        out = block_causal.threshold_pass(jnp.asarray(logits), jax.random.key(0), tokens, masked,
                                          jnp.zeros((1, 8), bool), jnp.ones(1, bool), cfg, MASK)
        assert int(out.newly.sum()) == 1  # one position per forward, however confident
        order.append(int(np.flatnonzero(np.asarray(out.newly[0]))[0]))
        tokens, masked = out.tokens, out.masked
    # most confident first (not leftmost nor least confident), or left to right
    assert order == (np.argsort(-margin).tolist() if cfg.order == "confidence" else list(range(8)))
    assert np.asarray(tokens)[0].tolist() == (np.arange(8) + 5).tolist()


def test_every_reader_refuses_a_swapped_tokenizer_and_a_manifest_without_its_keys(trained_run, tiny_dataset, tmp_path,
                                                                                 capsys):
    import json
    import shutil

    from evals import trajectories

    def one_line(code: int) -> str:
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
        return err

    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_dataset, swapped)
    tokenizer = json.loads((swapped / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"] = dict(zip(tokenizer["model"]["vocab"], reversed(tokenizer["model"]["vocab"].values())))
    (swapped / "tokenizer.json").write_text(json.dumps(tokenizer))  # same size, other ids: garbage text
    evals_args = ["--run_dir", str(trained_run), "--once", "--force", f"data_path={swapped}", *EVAL_SMALL]
    assert "does not match the sha256" in one_line(cli.main(evals_args))
    traj = ["--run_dir", str(trained_run), "--output", str(tmp_path / "traj"), f"data_path={swapped}", "num_prompts=2"]
    assert "does not match the sha256" in one_line(trajectories.main(traj))
    assert not (tmp_path / "traj" / "trajectories.json").exists()

    for key in ("tokenizer", "splits", "record_schema"):
        broken = tmp_path / f"no_{key}"
        shutil.copytree(tiny_dataset, broken)
        manifest = json.loads((broken / "manifest.json").read_text())
        del manifest[key]
        (broken / "manifest.json").write_text(json.dumps(manifest))
        assert f"lacks {key}." in one_line(cli.main([*evals_args[:-len(EVAL_SMALL) - 1], f"data_path={broken}",
                                                     *EVAL_SMALL]))
        from trainer import __main__ as trainer_cli

        assert f"lacks {key}." in one_line(trainer_cli.main([f"data.path={broken}", f"run_dir={tmp_path / 'r'}",
                                                             *TINY_MODEL]))
        assert not (tmp_path / "r").exists()
    (broken / "manifest.json").write_text("{not json")
    assert "is not valid JSON" in one_line(cli.main([*evals_args[:-len(EVAL_SMALL) - 1], f"data_path={broken}",
                                                     *EVAL_SMALL]))


def test_a_watcher_ends_in_one_line_when_its_run_directory_is_deleted(tiny_dataset, tmp_path, capsys, monkeypatch):
    import shutil

    from evals import run as run_module

    fresh = tmp_path / "fresh"  # a run that has not committed a step yet
    fresh.mkdir()
    cfg = config_lib.load(None, [f"data.path={tiny_dataset}", f"run_dir={fresh}", *TINY_MODEL])
    (fresh / "config.yaml").write_text(config_lib.dump(cfg))
    polls = []

    def sleep(seconds):
        polls.append(seconds)
        shutil.rmtree(fresh)  # deleted between two polls

    monkeypatch.setattr(run_module.time, "sleep", sleep)
    assert cli.main(["--run_dir", str(fresh), "--watch", "poll_seconds=0.01", *EVAL_SMALL]) == 2
    assert len(polls) == 1 and "was deleted" in capsys.readouterr().err
