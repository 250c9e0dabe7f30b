"""The trainer: config validation, dataset checks, packing, losses, resume and preemption."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer import __main__ as cli
from trainer import config as config_lib
from trainer import data, hf, packing, state, train
from trainer.config import Config, ModelConfig
from trainer.objectives import ar, bd3lm, mdlm
from trainer.objectives.bd3lm import BD3LMSettings
from trainer.objectives.mdlm import MDLMSettings
from trainer.attention import Dense, segment_mask
from trainer.model import Transformer, param_count


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cli_error(capsys, *argv) -> str:
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


# --------------------------------------------------------------------------- config


def test_config_errors_name_the_key(capsys, tiny_overrides, tmp_path):
    assert "train.stepz is not a config key" in cli_error(capsys, *tiny_overrides, "train.stepz=3")
    assert "train.steps must be int" in cli_error(capsys, *tiny_overrides, "train.steps=many")
    assert "train.global_batch must be divisible" in cli_error(
        capsys, *tiny_overrides, "train.global_batch=6", "train.grad_accum=4")
    assert "data.seq_len must be in [1, model.max_seq_len=64]" in cli_error(
        capsys, *tiny_overrides, "data.seq_len=128")
    assert "model.heads must be at least 1 and divide" in cli_error(capsys, *tiny_overrides, "model.heads=3")
    assert "must look like key=value" in cli_error(capsys, *tiny_overrides, "train.steps")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: [1, 2\n")
    assert "is not valid YAML" in cli_error(capsys, "--config", str(bad_yaml))
    assert "the value is not valid YAML" in cli_error(capsys, *tiny_overrides, "train.steps=[1")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8" in cli_error(capsys, "--config", str(latin))
    for override, key in [("model.heads=0", "model.heads"), ("model.hidden=-64", "model.hidden"),
                          ("objective.block_size=0", "objective.block_size"), ("model.layers=0", "model.layers")]:
        assert key in cli_error(capsys, *tiny_overrides, override, "objective.name=oput")
    assert "objective.block_size must be at most data.seq_len=64" in cli_error(
        capsys, *tiny_overrides, "objective.name=bd3lm", "objective.block_size=128")
    assert "train.global_batch must be at least 1" in cli_error(capsys, *tiny_overrides, "train.global_batch=0")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert "data.packing_bins is retired: replaced by data.pack_documents" in cli_error(
        capsys, *tiny_overrides, "data.packing_bins=8")
    older_run = tmp_path / "older_run"  # a run an older trainer wrote keeps loading (evals read it)
    older_run.mkdir()
    (older_run / "config.yaml").write_text("run_dir: older_run\ndata: {path: d, packing_bins: 32}\n")
    assert config_lib.load_run(older_run).data.path == "d"
    from evals import config as eval_config
    assert eval_config.load(None, ["sampling.revise=no"]).sampling.revise == "no"  # YAML 1.1 reads `no` as false


def test_a_run_resumes_only_with_its_own_model(capsys, tiny_overrides, tmp_path):
    assert cli.main([*tiny_overrides, "train.steps=2", "train.checkpoint_every=2"]) == 0
    capsys.readouterr()
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "model.hidden=32, this config has 48" in cli_error(capsys, *tiny_overrides, "train.steps=4",
                                                              "model.hidden=48")
    assert (tmp_path / "run" / "config.yaml").read_text() == saved  # the intact run's config is kept
    # How a step runs is not what it trains: another kernel or remat policy resumes the run.
    assert cli.main([*tiny_overrides, "train.steps=3", "train.checkpoint_every=3", "model.attention=xla",
                     "model.remat=full"]) == 0
    assert "attention: auto" in saved
    (tmp_path / "run" / "config.yaml").write_text(saved.replace("attention: auto", "attention: splash"))
    assert config_lib.load_run(tmp_path / "run").model.attention == "auto"  # readers choose their platform's kernel


def test_yaml_and_overrides_resolve_and_are_saved(tiny_overrides, tmp_path):
    cfg = config_lib.load("configs/tinystories_tiny.yaml", [*tiny_overrides, "train.steps=2"])
    assert cfg.train.steps == 2 and cfg.model.hidden == 32 and cfg.optim.lr == 3e-3
    assert train.run(cfg) == 0
    saved = config_lib.load(str(tmp_path / "run" / "config.yaml"), [])
    assert config_lib.to_dict(saved) == config_lib.to_dict(cfg) and saved.model.vocab_size > 0


def test_shipped_configs_load_and_validate():
    for name in ("tinystories_tiny", "tinystories_tiny_ar", "tinystories_tiny_bd3lm", "tinystories_tiny_oput",
                 "dmax_oput_tiny", "tinystories_seed"):
        cfg = config_lib.load(f"configs/{name}.yaml", [])
        cfg.validate()
    seed = config_lib.load("configs/tinystories_seed.yaml", [])
    assert (seed.model.hidden, seed.model.layers, seed.model.vocab_size) == (1280, 16, 4096)
    assert 250e6 < param_count(seed.model) < 400e6


# --------------------------------------------------------------------------- dataset checks


def test_dataset_mismatches_are_refused(capsys, tiny_dataset, tiny_overrides, tmp_path):
    assert "has no manifest.json" in cli_error(capsys, *tiny_overrides, f"data.path={tmp_path}")
    assert "model.vocab_size 999 does not match" in cli_error(capsys, *tiny_overrides, "model.vocab_size=999")
    altered = tmp_path / "altered"
    shutil.copytree(tiny_dataset, altered)
    shutil.copy(altered / "validation-00000-of-00001.array_record", altered / "train-00000-of-00002.array_record")
    assert "but the manifest says" in cli_error(capsys, *tiny_overrides, f"data.path={altered}")
    shutil.copytree(tiny_dataset, altered, dirs_exist_ok=True)
    with open(altered / "tokenizer.json", "a") as f:
        f.write(" ")
    assert "does not match the manifest's sha256" in cli_error(capsys, *tiny_overrides, f"data.path={altered}")


# --------------------------------------------------------------------------- packing and masks


def _config(tiny_dataset, seq_len=32, seed=0) -> tuple[Config, dict]:
    cfg = Config(run_dir="unused", seed=seed)
    cfg.data.path, cfg.data.seq_len, cfg.data.pack_documents = str(tiny_dataset), seq_len, 16
    cfg.train.global_batch = 4
    return cfg, data.load_manifest(str(tiny_dataset))


def test_packing_splits_long_documents_loses_no_token_and_never_mixes(tiny_dataset):
    cfg, manifest = _config(tiny_dataset, seq_len=32)  # stories are ~100 tokens: all get split
    rows = list(data.packed_dataset(cfg, manifest, "validation", 4, shuffle=False, repeat=False))
    packed = collections.Counter()
    for batch in rows:
        for tokens, segments, positions in zip(batch["tokens"], batch["tokens_segment_ids"],
                                                batch["tokens_positions"]):
            for seg in set(segments[segments > 0].tolist()):
                where = np.flatnonzero(segments == seg)
                assert (np.diff(where) == 1).all()  # one contiguous run per piece
                assert (positions[where] == np.arange(len(where))).all()  # positions restart per piece
                packed.update(tokens[where].tolist())
            assert (tokens[segments == 0] == 0).all()
    source = collections.Counter()
    for shard in manifest["splits"]["validation"]["shards"]:
        import grain

        for record in grain.sources.ArrayRecordDataSource([str(tiny_dataset / shard["file"])]):
            source.update(np.frombuffer(record, "<u2", offset=4).tolist())
    assert packed == source and sum(source.values()) == manifest["splits"]["validation"]["num_tokens"]


@pytest.mark.parametrize("row_len", [8, 64])
def test_best_fit_packing_keeps_every_token_once_in_nearly_full_rows(row_len):
    rng = np.random.default_rng(row_len)
    documents = [rng.integers(1, 1000, n) for n in rng.integers(1, 3 * row_len, 300)]
    rows = packing.pack(documents, row_len)
    tokens, segments, positions = rows["tokens"], rows["tokens_segment_ids"], rows["tokens_positions"]
    pieces = []
    for r in range(len(tokens)):
        assert sorted(set(segments[r][segments[r] > 0].tolist())) == list(range(1, segments[r].max() + 1))
        for seg in range(1, segments[r].max() + 1):
            where = np.flatnonzero(segments[r] == seg)
            assert (np.diff(where) == 1).all() and (positions[r, where] == np.arange(len(where))).all()
            pieces.append(tuple(tokens[r, where].tolist()))
        assert (tokens[r][segments[r] == 0] == 0).all()
    expected = [tuple(d[i:i + row_len].tolist()) for d in documents for i in range(0, len(d), row_len)]
    assert sorted(pieces) == sorted(expected)  # every piece exactly once, split at row_len, never mixed
    total = sum(len(d) for d in documents)
    assert len(tokens) <= 11 / 9 * -(-total // row_len) + 1  # best-fit decreasing's bound
    shuffled = packing.pack(documents, row_len, np.random.default_rng(0))
    assert sorted(map(bytes, shuffled["tokens"])) == sorted(map(bytes, tokens))  # rng permutes rows only
    assert not np.array_equal(shuffled["tokens"], tokens)


def test_eos_fill_ends_each_finished_document_with_eos_to_the_rows_end_and_changes_nothing_else(tiny_dataset):
    eos = 2
    documents = [np.array([1, 5, 6, eos]), np.array([1, 7, 8, 9, 10, 11, eos]), np.array([1, *[3] * 10, 4])]
    rows = packing.pack(documents, 8)  # rows: [1 3 ... 3], [1 7 8 9 10 11 eos pad], [1 5 6 eos | 3 3 3 4]
    filled = packing.fill_with_eos(rows, eos)
    padding = rows["tokens_segment_ids"] == 0
    assert padding.sum() == 1  # the one finished document with room after it
    for key in rows:
        assert np.array_equal(filled[key][~padding], rows[key][~padding])  # every token, segment, position kept
    r, c = np.argwhere(padding)[0]
    assert filled["tokens"][r, c] == eos and filled["tokens_segment_ids"][r, c] == rows["tokens_segment_ids"][r, c - 1]
    assert filled["tokens_positions"][r, c] == rows["tokens_positions"][r, c - 1] + 1
    # Through the loader: each row whose last piece ends a document is EOS to its end; other rows as before.
    cfg, manifest = _config(tiny_dataset, seq_len=256)
    plain = next(iter(data.packed_dataset(cfg, manifest, "train", 8, shuffle=False, repeat=False)))
    cfg.data.eos_fill = True
    ended = next(iter(data.packed_dataset(cfg, manifest, "train", 8, shuffle=False, repeat=False)))
    room = (plain["tokens_segment_ids"] == 0).any(1)
    last = np.take_along_axis(plain["tokens"], (plain["tokens_segment_ids"] != 0).sum(1, keepdims=True) - 1, 1)[:, 0]
    grows = room & (last == eos)
    assert grows.any() and (ended["tokens_segment_ids"][grows] != 0).all() and (ended["tokens"][grows][
        plain["tokens_segment_ids"][grows] == 0] == eos).all()
    assert np.array_equal(ended["tokens"][~grows], plain["tokens"][~grows])


def test_a_restored_iterator_continues_from_any_batch(tiny_dataset):
    """The state after each batch, restored into a fresh iterator, gives the batches that followed,
    whether it falls inside a packed chunk or at its end."""
    cfg, manifest = _config(tiny_dataset, seq_len=64)
    cfg.data.pack_documents = 8  # a few batches per chunk: states land inside and across chunks
    it = data.train_iterator(cfg, manifest)
    states, batches = [], []
    for _ in range(12):
        states.append(it.get_state())
        batches.append(next(it))
    for k in range(12):
        resumed = data.train_iterator(cfg, manifest)
        resumed.set_state(states[k])
        for expected in batches[k:k + 3]:
            got = next(resumed)
            assert all(np.array_equal(got[key], expected[key]) for key in expected)


def test_attention_never_crosses_packed_documents():
    cfg = ModelConfig(vocab_size=50, hidden=32, layers=2, heads=2, mlp_hidden=64, max_seq_len=16)
    model = Transformer(cfg, nnx.Rngs(0))
    segments = jnp.array([[1] * 6 + [2] * 7 + [0] * 3])
    positions = jnp.array([list(range(6)) + list(range(7)) + [0] * 3])
    tokens = jnp.arange(16)[None] % 50
    changed = tokens.at[0, 8].set(42)  # a token of document 2
    for causal in (False, True):
        a, b = model(tokens, segments, positions, causal), model(changed, segments, positions, causal)
        assert jnp.array_equal(a[0, :6], b[0, :6])  # document 1 is blind to document 2
        assert not jnp.allclose(a[0, 9:13], b[0, 9:13])  # later tokens of document 2 see it
    mask = segment_mask(segments, causal=False)[0, 0]
    assert mask.tolist() == (segments[0][:, None] == segments[0][None, :]).tolist()


def _stacked_like_scanned(unrolled: dict, layers: int) -> dict:
    """An unrolled model's params in the scanned layout (README: layer i is index i of the layer axis)."""
    blocks = [unrolled["blocks"][i] for i in range(layers)]
    return {**unrolled, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_scanned_layers_compute_what_unrolled_layers_compute(remat):
    cfg = ModelConfig(vocab_size=50, hidden=32, layers=3, heads=2, mlp_hidden=64, max_seq_len=16, remat=remat)
    unrolled = Transformer(cfg, nnx.Rngs(0))
    scanned = Transformer(dataclasses.replace(cfg, scan_layers=True), nnx.Rngs(1))
    state = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(state, _stacked_like_scanned(nnx.to_pure_dict(nnx.state(unrolled, nnx.Param)), 3))
    nnx.update(scanned, state)
    segments = jnp.array([[1] * 6 + [2] * 7 + [0] * 3])
    positions = jnp.array([list(range(6)) + list(range(7)) + [0] * 3])
    tokens = jnp.arange(16)[None] % 50
    for causal in (False, True):
        np.testing.assert_allclose(scanned(tokens, segments, positions, causal),
                                   unrolled(tokens, segments, positions, causal), rtol=1e-5, atol=1e-5)
    # The decoding path: 4 new tokens written at offset 6 of a 16-slot KV cache per layer.
    caches = [(jnp.ones((1, 16, 2, 16)) * i, jnp.ones((1, 16, 2, 16)) * -i, 6) for i in range(3)]
    x, pos = unrolled.embed(tokens[:, :4]), jnp.arange(6, 10)[None]
    mask = Dense(jnp.ones((1, 1, 4, 16), bool))
    (a, kv_a), (b, kv_b) = unrolled.forward(x, pos, mask, caches), scanned.forward(x, pos, mask, caches)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    for (ka, va), (kb, vb) in zip(kv_a, kv_b, strict=True):
        np.testing.assert_allclose(kb, ka, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(vb, va, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="scan_layers=false"):
        next(hf.tensor_names(scanned.cfg))


def test_an_attention_kernel_this_platform_lacks_is_one_line(capsys, tiny_overrides, tmp_path):
    assert "cudnn needs model.compute_dtype=bfloat16" in cli_error(capsys, *tiny_overrides, "model.attention=cudnn")
    assert "model.attention must be one of auto, xla, cudnn, splash" in cli_error(
        capsys, *tiny_overrides, "model.attention=flash")
    if jax.default_backend() != "gpu":
        assert "model.attention=cudnn needs an NVIDIA GPU" in cli_error(
            capsys, *tiny_overrides, "model.attention=cudnn", "model.compute_dtype=bfloat16")
    if jax.default_backend() != "tpu":
        assert "model.attention=splash needs a TPU" in cli_error(capsys, *tiny_overrides, "model.attention=splash")
    assert not (tmp_path / "run").exists()


def test_data_order_is_a_function_of_the_seed(tiny_dataset):
    def first_batches(seed):
        cfg, manifest = _config(tiny_dataset, seq_len=64, seed=seed)
        it = data.train_iterator(cfg, manifest)
        return [next(it)["tokens"] for _ in range(3)]

    same = zip(first_batches(1), first_batches(1))
    assert all(np.array_equal(a, b) for a, b in same)
    assert not all(np.array_equal(a, b) for a, b in zip(first_batches(1), first_batches(2)))


def test_read_ahead_threads_change_neither_batches_nor_iterator_state(tiny_dataset):
    def run(threads, state=None):
        cfg, manifest = _config(tiny_dataset, seq_len=64)
        cfg.data.read_threads, cfg.data.read_buffer = threads, 16
        it = data.train_iterator(cfg, manifest)
        if state is not None:
            it.set_state(state)
        batches = [next(it) for _ in range(4)]
        return batches, it.get_state()

    inline, inline_state = run(0)
    threaded, threaded_state = run(16)
    for a, b in zip(inline, threaded, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert threaded_state == inline_state
    resumed, _ = run(16, inline_state)  # a checkpoint from one setting resumes under the other
    after, _ = run(0, inline_state)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(resumed, after, strict=True) for k in a)


# --------------------------------------------------------------------------- losses


def _log_softmax_np(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mdlm_loss_matches_a_direct_computation():
    """At t = 1 under the linear schedule every scored token (real, not a piece's first) is masked
    with weight 1/t = 1; each piece's first token stays as context."""
    vocab, mask_id = 11, 10
    rng = np.random.default_rng(0)
    table = rng.normal(size=(2, 7, vocab)).astype(np.float32)
    tokens = rng.integers(0, 10, size=(2, 7))
    segments = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    positions = np.array([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6]])
    seen = {}

    def model(noisy, segments, positions, causal):
        seen["noisy"] = noisy
        return jnp.asarray(table)

    batch = {"tokens": jnp.asarray(tokens), "tokens_segment_ids": jnp.asarray(segments),
             "tokens_positions": jnp.asarray(positions)}
    total, count = mdlm.nelbo(model, batch, jax.random.key(0), mask_id, MDLMSettings(noise_schedule="linear"),
                              t_B=jnp.ones(2))
    logp = _log_softmax_np(np.where(np.arange(vocab) == mask_id, -np.inf, table))
    nll = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    scored = (segments != 0) & (positions != 0)
    assert int(count) == scored.sum() == 9
    np.testing.assert_allclose(float(total), nll[scored].sum(), rtol=1e-6)
    assert (np.asarray(seen["noisy"])[scored] == mask_id).all()
    assert (np.asarray(seen["noisy"])[~scored] == tokens[~scored]).all()  # padding and first tokens: never masked


def test_diffusion_bounds_and_ar_score_the_same_tokens_of_a_packed_batch():
    """On packed rows (a long document split into pieces, padding), MDLM, BD3LM and AR count the same
    tokens: every real token but each piece's first, which the diffusion losses never mask."""
    cfg = ModelConfig(vocab_size=30, hidden=32, layers=1, heads=2, mlp_hidden=64, max_seq_len=16)
    model = Transformer(cfg, nnx.Rngs(0))
    segments = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0], list(range(10))])
    tokens = jax.random.randint(jax.random.key(0), segments.shape, 3, 29)
    batch = {"tokens": tokens, "tokens_segment_ids": segments, "tokens_positions": positions}
    _, ar_count = ar.next_token_nll(model, batch)
    _, mdlm_count = mdlm.nelbo(model, batch, jax.random.key(1), 29, MDLMSettings(), t_B=jnp.ones(2))
    _, bd3lm_count = bd3lm.nelbo(model, batch, jax.random.key(1), 29, BD3LMSettings(block_size=4),
                                 t_BL=jnp.ones(segments.shape))
    assert int(ar_count) == int(mdlm_count) == int(bd3lm_count) == 6 + 9


@pytest.mark.parametrize("schedule", ["loglinear", "linear", "cosine"])
def test_mdlm_nelbo_of_a_uniform_model_is_log_vocab(schedule):
    """E_t[w(t) (1 - alpha_t)] = alpha(0) - alpha(1) ~= 1, so a uniform model's NELBO is log(V - 1)."""
    vocab, mask_id = 64, 63
    tokens = jax.random.randint(jax.random.key(1), (512, 32), 0, 63)
    segments = jnp.ones_like(tokens)
    uniform = lambda noisy, segments, positions, causal: jnp.zeros((*noisy.shape, vocab))  # noqa: E731
    batch = {"tokens": tokens, "tokens_segment_ids": segments, "tokens_positions": jnp.tile(jnp.arange(32), (512, 1))}
    total, count = mdlm.nelbo(uniform, batch, jax.random.key(2), mask_id, MDLMSettings(noise_schedule=schedule))
    assert abs(float(total / count) / np.log(vocab - 1) - 1) < 0.03


def test_ar_loss_skips_document_boundaries_and_padding():
    tokens = jnp.array([[5, 6, 7, 8, 9, 0]])
    segments = jnp.array([[1, 1, 1, 2, 2, 0]])
    uniform = lambda toks, segments, positions, causal: jnp.zeros((*toks.shape, 16))  # noqa: E731
    total, count = ar.next_token_nll(uniform, {"tokens": tokens, "tokens_segment_ids": segments,
                                               "tokens_positions": None})
    assert int(count) == 3  # 5->6, 6->7, 8->9; not 7->8 across documents, not 9->pad
    np.testing.assert_allclose(float(total), 3 * np.log(16), rtol=1e-6)


# --------------------------------------------------------------------------- training runs


@pytest.mark.parametrize("objective", ["mdlm", "ar"])
def test_loss_decreases_on_the_sample_corpus(tiny_overrides, tmp_path, objective):
    cfg = config_lib.load(None, [*tiny_overrides, "train.steps=60", "train.checkpoint_every=60",
                                 f"objective.name={objective}"])
    assert train.run(cfg) == 0
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    assert len(losses) == 60 and np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.5
    last = metrics(tmp_path / "run")[-1]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(last)
    assert ("ppl_bound" in last) == (objective == "mdlm")


def test_gradient_accumulation_equals_the_full_batch(tiny_overrides, tmp_path):
    runs, params = {}, {}
    for accum in (1, 4):
        run_dir = tmp_path / f"accum{accum}"
        cfg = config_lib.load(None, [*tiny_overrides, f"run_dir={run_dir}", "train.steps=4", "optim.warmup_steps=0",
                                     f"train.grad_accum={accum}", "objective.name=ar"])
        assert train.run(cfg) == 0
        runs[accum] = [m["loss"] for m in metrics(run_dir)]
        params[accum] = state.load_params(str(run_dir), 4)[1]
    np.testing.assert_allclose(runs[1], runs[4], rtol=2e-5)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params[1], params[4])
    assert max(jax.tree.leaves(moved)) < 1e-5  # four updates at full learning rate land on the same params
    initial = state.init_state(cfg, state.make_optimizer(cfg.optim, 4)[0])["params"]
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params[4], initial))) > 1e-3


def test_non_finite_loss_stops_without_committing_it(tiny_overrides, tmp_path, capsys):
    code = cli.main([*tiny_overrides, "train.steps=30", "train.checkpoint_every=1", "optim.lr=1e30",
                     "optim.warmup_steps=0", "optim.grad_clip=0"])
    assert code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: not finite at step ")
    bad_step = int(message.split("at step ")[1].split(" ")[0])
    committed = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert all(step < bad_step for step in committed)


def _trainer(overrides, steps, log):
    """A trainer subprocess writing its stdout and stderr to `log` (never a pipe nobody reads)."""
    return subprocess.Popen([sys.executable, "-m", "trainer", *overrides, f"train.steps={steps}"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(job, timeout=600) -> int:
    """The trainer's exit code; whatever it left running (a hung trainer, Grain workers) is killed."""
    try:
        return job.wait(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)


def _wait_for(predicate, timeout=180):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_9_and_resume_is_bitwise_identical(tiny_dataset, tmp_path):
    def overrides(name):
        from tests.conftest import TINY_MODEL

        return [f"data.path={tiny_dataset}", f"run_dir={tmp_path / name}", *TINY_MODEL,
                "train.checkpoint_every=10", "data.num_workers=1"]

    assert _finish(_trainer(overrides("straight"), 40, tmp_path / "straight.log")) == 0
    job = _trainer(overrides("killed"), 40, tmp_path / "killed.log")
    try:
        _wait_for(lambda: (tmp_path / "killed" / "checkpoints" / "10").is_dir())
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the trainer and its Grain worker, as a scheduler would
    assert job.wait() == -signal.SIGKILL
    assert _finish(_trainer(overrides("killed"), 40, tmp_path / "resumed.log")) == 0
    resumed_at = int((tmp_path / "resumed.log").read_text().split("resuming at step ")[1].split(";")[0])
    assert resumed_at >= 10  # restored from a checkpoint, not retrained from step 0
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "killed")
    assert [m["step"] for m in resumed] == list(range(1, 41))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]  # exact, not approximate
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in straight]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    job = _trainer([*tiny_overrides, "train.checkpoint_every=100000"], 100000, tmp_path / "first.log")
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists() and len(metrics(run)) >= 3)
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == train.PREEMPTED_EXIT_CODE
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    (saved,) = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved >= 3 and metrics(run)[-1]["step"] >= saved
    assert _finish(_trainer(tiny_overrides, saved + 2, tmp_path / "second.log")) == 0
    assert f"resuming at step {saved}" in (tmp_path / "second.log").read_text()  # from the checkpoint
    assert [m["step"] for m in metrics(run)] == list(range(1, saved + 3))


def test_an_uncommitted_step_is_never_read(tiny_overrides, tmp_path, capsys):
    cfg = config_lib.load(None, [*tiny_overrides, "train.steps=2", "train.checkpoint_every=2"])
    assert train.run(cfg) == 0
    partial = tmp_path / "run" / "checkpoints" / "9.orbax-checkpoint-tmp-1234567"  # a save cut short
    shutil.copytree(tmp_path / "run" / "checkpoints" / "2", partial)
    capsys.readouterr()
    assert train.run(config_lib.load(None, [*tiny_overrides, "train.steps=3", "train.checkpoint_every=3"])) == 0
    assert "resuming at step 2" in capsys.readouterr().out
    from trainer import checkpointing

    assert checkpointing.committed_steps(checkpointing.reader(str(tmp_path / "run"))) == [2, 3]


def test_bfloat16_compute_keeps_float32_params(tiny_overrides, tmp_path):
    # The seed config's settings: bf16 compute, remat, scanned layers.
    cfg = config_lib.load(None, [*tiny_overrides, "model.compute_dtype=bfloat16", "model.remat=true",
                                 "model.scan_layers=true", "train.steps=3", "train.checkpoint_every=3"])
    tx, _ = state.make_optimizer(cfg.optim, 3)
    cfg.model.vocab_size = 64
    initial = state.init_state(cfg, tx)
    assert {x.dtype for x in jax.tree.leaves(initial["params"])} == {jnp.dtype("float32")}
    model = nnx.merge(state.model_graphdef(cfg), initial["params"])
    tokens = jnp.ones((2, 16), jnp.int32)
    logits = model(tokens, jnp.ones_like(tokens), jnp.tile(jnp.arange(16), (2, 1)))
    assert logits.dtype == jnp.float32  # bf16 inside, float32 logits for the loss
    cfg.model.vocab_size = 0
    assert train.run(cfg) == 0
    assert all(np.isfinite(m["loss"]) for m in metrics(tmp_path / "run"))


def test_init_from_run_starts_from_its_params_with_a_fresh_optimizer(tiny_overrides, tmp_path):
    base = config_lib.load(None, [*tiny_overrides, "train.steps=5", "train.checkpoint_every=5"])
    assert train.run(base) == 0
    tuned = config_lib.load(None, [*tiny_overrides, f"run_dir={tmp_path / 'tuned'}", "train.steps=2",
                                   "train.checkpoint_every=2", f"train.init_from_run={tmp_path / 'run'}"])
    assert train.run(tuned) == 0
    fresh = config_lib.load(None, [*tiny_overrides, f"run_dir={tmp_path / 'fresh'}", "train.steps=2",
                                   "train.checkpoint_every=2"])
    assert train.run(fresh) == 0
    first = lambda name: metrics(tmp_path / name)[0]  # noqa: E731
    assert first("tuned")["step"] == 1 and first("tuned")["lr"] == first("fresh")["lr"]  # fresh schedule
    assert first("tuned")["loss"] < metrics(tmp_path / "run")[0]["loss"] - 0.3  # started from trained params


def test_the_trainers_gpu_flags_are_set_once_and_the_users_values_win():
    from trainer import xla_flags

    environ = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/x"}
    flags_set = xla_flags.apply(environ).split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in flags_set  # the user's value is kept
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in flags_set
    assert "--xla_gpu_enable_while_loop_double_buffering=true" in flags_set and "--xla_dump_to=/tmp/x" in flags_set
    assert xla_flags.apply(environ).split() == flags_set  # applying twice adds nothing
    assert xla_flags.apply({}).split() == [f"{k}={v}" for k, v in xla_flags.GPU_FLAGS.items()]


def test_each_epoch_reads_every_record_once_in_a_new_order_and_streams_split_the_order():
    import grain

    from trainer import data

    order = data.in_reading_order(grain.MapDataset.range(50), 3, shuffle=True, repeat=True)
    epochs = [[int(order[e * 50 + i]) for i in range(50)] for e in range(3)]
    assert all(sorted(epoch) == list(range(50)) for epoch in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert epochs[0] != list(range(50))
    second = data.in_reading_order(grain.MapDataset.range(50), 3, shuffle=True, repeat=True, process_index=1,
                                   process_count=2)
    assert [int(second[i]) for i in range(75)] == [x for epoch in epochs for x in epoch][1::2]
    plain = data.in_reading_order(grain.MapDataset.range(50), 3, shuffle=False, repeat=False)
    assert [int(plain[i]) for i in range(len(plain))] == list(range(50))


def test_a_runs_identity_is_fixed_at_its_first_step_and_its_checkpoints_carry_it(tiny_overrides, tmp_path, capsys):
    from evals import __main__ as evals_cli
    from trainer import export

    run = tmp_path / "run"
    first = [*tiny_overrides, "train.steps=4", "train.checkpoint_every=2", "objective.name=bd3lm",
             "objective.block_size=8"]
    assert cli.main(first) == 0
    capsys.readouterr()
    saved = (run / "config.yaml").read_text()
    for change, key in (("objective.name=mdlm", "objective.name=bd3lm, this config has mdlm"),
                        ("objective.block_size=4", "objective.block_size=8, this config has 4")):
        error = cli_error(capsys, *first, "train.steps=6", change)
        assert key in error and "train.init_from_run" in error
        assert (run / "config.yaml").read_text() == saved  # nothing rewritten
    identity = (run / "checkpoints" / "identity.json").read_text()
    (run / "checkpoints" / "identity.json").unlink()  # a run from before identities: its config.yaml says it
    assert "objective.name=bd3lm, this config has mdlm" in cli_error(capsys, *first, "train.steps=6",
                                                                      "objective.name=mdlm")
    (run / "checkpoints" / "identity.json").write_text(identity)
    (run / "config.yaml").write_text(saved.replace("block_size: 8", "block_size: 4"))  # evals would decode blocks of 4
    small = ["--once", "sampling.num_samples=2", "sampling.gen_length=16", "perplexity.max_tokens=300"]
    assert evals_cli.main(["--run_dir", str(run), *small]) == 2
    assert "objective.block_size=8, its config.yaml now says 4" in capsys.readouterr().err
    (run / "config.yaml").write_text(saved)

    other = tmp_path / "other"  # the same shape and settings, another run: its step 6 copied into this run
    assert cli.main([*first, f"run_dir={other}", "train.steps=6", "train.checkpoint_every=6"]) == 0
    shutil.copytree(other / "checkpoints" / "6", run / "checkpoints" / "6")
    capsys.readouterr()
    assert "was written by another run" in cli_error(capsys, *first, "train.steps=8")
    assert export.main(["--run_dir", str(run), "--output", str(tmp_path / "export")]) == 2
    assert "was written by another run" in capsys.readouterr().err
    assert evals_cli.main(["--run_dir", str(run), *small]) == 0  # the run's own steps are evaluated, 6 is recorded
    capsys.readouterr()
    records = [json.loads(line) for line in (run / "evals" / "ledger.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "perplexity" in r] == [2, 4]
    assert any(r["step"] == 6 and "written by another run" in json.dumps(r) for r in records)
    shutil.rmtree(run / "checkpoints" / "6")

    position = run / "checkpoints" / "4" / "data" / "process_0-of-1.json"
    state_json = json.loads(position.read_text())
    state_json["batch_idx"] += 3  # another valid position in the data
    position.write_text(json.dumps(state_json))
    assert "data-iterator state is not the one saved with it" in cli_error(capsys, *first, "train.steps=8")


def test_the_moving_average_is_what_a_runs_readers_get_and_never_changes_training(tiny_overrides, tmp_path):
    steps, decay = 4, 0.5
    raw, averaged = tmp_path / "raw", tmp_path / "averaged"
    for run_dir, extra in ((raw, []), (averaged, [f"optim.ema={decay}"])):
        cfg = config_lib.load(None, [*tiny_overrides, f"run_dir={run_dir}", f"train.steps={steps}",
                                     "train.checkpoint_every=1", f"train.keep_last={steps}", *extra])
        assert train.run(cfg) == 0
    assert [m["loss"] for m in metrics(averaged)] == [m["loss"] for m in metrics(raw)]  # training is unchanged
    # The average by its recursion over the raw run's params after each step, from the initial ones;
    # the decay ramps up as (1 + step) / (10 + step) until it reaches `decay`.
    ema = state.init_state(cfg, state.make_optimizer(cfg.optim, steps)[0])["params"]
    for step in range(steps):
        rate = min(decay, (1 + step) / (10 + step))
        ema = jax.tree.map(lambda a, p: rate * a + (1 - rate) * p, ema, state.load_params(str(raw), step + 1).params)
    read = state.load_params(str(averaged), steps).params
    gap = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), read, ema)
    assert max(jax.tree.leaves(gap)) < 1e-6
    last = state.load_params(str(raw), steps).params
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), read, last))) > 1e-4
    # A run started from it starts from its average, whether or not it keeps one itself.
    for extra in ([], [f"optim.ema={decay}"]):
        tuned = config_lib.load(None, [*tiny_overrides, f"run_dir={tmp_path / 'tuned'}",
                                       f"train.init_from_run={averaged}", f"model.vocab_size={cfg.model.vocab_size}",
                                       *extra])
        initial = state.init_state(tuned, state.make_optimizer(tuned.optim, 1)[0])
        started = train.params_from_run(tuned, initial, None)
        assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), started, read))) == 0.0
