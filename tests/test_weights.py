"""Weights interchange: safetensors export/import round trip, parity with transformers' Llama and
Qwen3, a new mask row, and one-line errors for untrusted files."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from evals import __main__ as evals_cli
from tests.conftest import TINY_MODEL
from trainer import hf, state, train
from trainer import config as config_lib
from trainer import export as export_cli
from trainer.config import ModelConfig
from trainer.model import Transformer

ARCH = ["model.kv_heads=1", "model.head_dim=8", "model.qk_norm=true", "model.tie_embeddings=false"]


def abstract_params(cfg: ModelConfig):
    return nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[1])


def load_on_one_device(directory, cfg):
    abstract = abstract_params(cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return hf.load(str(directory), cfg, abstract, jax.tree.map(lambda _: device, abstract))


def logits(cfg, params, ids):
    model = nnx.merge(nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[0], params)
    tokens = jnp.asarray(ids)
    return np.asarray(model(tokens, jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape),
                            causal=True))


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("weights") / "run"
    cfg = config_lib.load(None, [f"data.path={tiny_dataset}", f"run_dir={run_dir}", *TINY_MODEL, *ARCH,
                                 "train.steps=4", "train.checkpoint_every=4"])
    assert train.run(cfg) == 0
    return run_dir, cfg


def test_export_then_import_gives_identical_params_and_logits(trained, tmp_path):
    run_dir, cfg = trained
    assert export_cli.main(["--run_dir", str(run_dir), "--output", str(tmp_path / "export")]) == 0
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "config.yaml"} <= files
    hf_config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert hf_config["model_type"] == "qwen3" and hf_config["num_key_value_heads"] == 1
    assert hf_config["diffusion_lm"]["step"] == 4 and "mask_token_id" in hf_config

    original = state.load_params(str(run_dir), 4, cfg).params
    loaded = load_on_one_device(tmp_path / "export", cfg.model)
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(loaded)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    ids = np.arange(24).reshape(2, 12) % cfg.model.vocab_size
    assert np.array_equal(logits(cfg.model, original, ids), logits(cfg.model, loaded, ids))

    # Large models are split into files with an index; the result is the same.
    hf.export(loaded, cfg.model, str(tmp_path / "sharded"), {}, max_shard_bytes=20_000)
    names = {p.name for p in (tmp_path / "sharded").iterdir()}
    assert hf.INDEX in names and sum(n.endswith(".safetensors") for n in names) > 2
    again = load_on_one_device(tmp_path / "sharded", cfg.model)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(again)))


@pytest.mark.timeout(600, method="thread")  # --watch on an export once polled forever
def test_the_eval_stage_evaluates_an_export(trained, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "export"
    assert export_cli.main(["--run_dir", str(run_dir), "--output", str(out)]) == 0
    assert evals_cli.main(["--run_dir", str(out), "--once", "wandb_mode=disabled", "perplexity.max_tokens=500",
                           "sampling.num_samples=2", "sampling.gen_length=16", "sampling.block_length=8"]) == 0
    (record,) = [json.loads(line) for line in (out / "evals" / "ledger.jsonl").read_text().splitlines()]
    assert record["step"] == 4 and np.isfinite(record["perplexity"]["ppl_bound"])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["train"]["steps"] = 8  # an export of a run's earlier step: --watch ends at the export's own step
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    assert evals_cli.main(["--run_dir", str(out), "--watch", "wandb_mode=disabled", "perplexity.max_tokens=500",
                           "sampling.num_samples=2", "sampling.gen_length=16", "sampling.block_length=8"]) == 0


def _hf_model(kind: str, directory, **overrides):
    """A reference checkpoint made by transformers (the tests that need it skip without torch)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(tie_word_embeddings=False, rope_theta=5000.0, **overrides)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen3Config(head_dim=24, tie_word_embeddings=True, **overrides)
        model = transformers.Qwen3ForCausalLM(config)
    model.eval().save_pretrained(directory)
    return model


def transformers_default_rope_theta() -> float:
    import transformers

    return float(transformers.Qwen3Config(**SMALL).rope_parameters["rope_theta"])


SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_causal_logits_match_transformers(kind, tmp_path):
    reference = _hf_model(kind, tmp_path, **SMALL)
    cfg = ModelConfig(max_seq_len=64)
    cfg.vocab_size = hf.resolve_model(cfg, str(tmp_path))
    assert (cfg.kv_heads, cfg.qk_norm, cfg.tie_embeddings) == (2, kind == "qwen3", kind == "qwen3")
    assert cfg.rope_theta == (5000.0 if kind == "llama" else transformers_default_rope_theta())
    ids = np.random.default_rng(0).integers(0, 96, (2, 12))
    import torch

    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits(cfg, load_on_one_device(tmp_path, cfg), ids), expected, atol=2e-5)


def test_a_new_mask_row_starts_from_the_mean_embedding(tmp_path):
    reference = _hf_model("llama", tmp_path, **SMALL)
    cfg = ModelConfig(max_seq_len=64)
    hf.resolve_model(cfg, str(tmp_path))
    cfg.vocab_size = 97  # the tokenizer has one more token: its mask
    params = load_on_one_device(tmp_path, cfg)
    table = reference.model.embed_tokens.weight.detach().numpy()
    embedding = np.asarray(params["embed"]["embedding"])
    assert np.array_equal(embedding[:96], table)
    np.testing.assert_allclose(embedding[96], table.mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(params["head"]["kernel"])[:, 96],
                               reference.lm_head.weight.detach().numpy().mean(0), rtol=1e-5, atol=1e-7)


def test_training_starts_from_hugging_face_weights(tiny_dataset, tmp_path):
    from pipelines import manifest as manifest_lib

    vocab = manifest_lib.load(str(tiny_dataset))["tokenizer"]["vocab_size"]
    _hf_model("llama", tmp_path / "hf", **{**SMALL, "vocab_size": vocab - 1, "hidden_size": 32,
                                              "intermediate_size": 64, "num_attention_heads": 2,
                                              "num_key_value_heads": 1})
    cfg = config_lib.load(None, [f"data.path={tiny_dataset}", f"run_dir={tmp_path / 'run'}",
                                 f"model.init_from={tmp_path / 'hf'}", "model.max_seq_len=64", "data.seq_len=64",
                                 "train.global_batch=8", "train.steps=2", "train.checkpoint_every=2",
                                 "wandb.mode=disabled", "train.log_every=1"])
    assert train.run(cfg) == 0
    saved = config_lib.load(str(tmp_path / "run" / "config.yaml"), [])
    assert (saved.model.hidden, saved.model.kv_heads, saved.model.tie_embeddings) == (32, 1, False)


def test_untrusted_files_give_one_line_errors_naming_the_problem(tmp_path):
    _hf_model("llama", tmp_path, **SMALL)
    cfg = ModelConfig(max_seq_len=64)
    cfg.vocab_size = hf.resolve_model(cfg, str(tmp_path))
    wrong = ModelConfig(hidden=48)
    with pytest.raises(hf.WeightsError, match=r"model.hidden=48 does not match hidden_size=64"):
        hf.resolve_model(wrong, str(tmp_path))

    from safetensors.numpy import load_file, save_file

    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(weights))
    with pytest.raises(hf.WeightsError, match=r"has no tensor model.layers.1.mlp.up_proj.weight"):
        load_on_one_device(tmp_path, cfg)

    resized = dict(tensors)
    resized["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(resized, str(weights))
    with pytest.raises(hf.WeightsError, match=r"tensor model.layers.0.self_attn.k_proj.weight has shape \(16, 64\)"):
        load_on_one_device(tmp_path, cfg)

    save_file(tensors, str(weights))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated mid-tensor
    with pytest.raises(hf.WeightsError) as error:
        load_on_one_device(tmp_path, cfg)
    assert "model.safetensors" in str(error.value) and "\n" not in str(error.value)

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(hf.WeightsError, match="model_type 'gpt2' is not supported"):
        hf.resolve_model(ModelConfig(), str(tmp_path))


def test_a_scaled_rope_is_refused(tmp_path):
    config = {"model_type": "llama", "hidden_act": "silu", "vocab_size": 96, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.WeightsError, match="rope_type 'llama3' is not supported"):
        hf.resolve_model(ModelConfig(), str(tmp_path))
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = ModelConfig()
    hf.resolve_model(cfg, str(tmp_path))
    assert cfg.rope_theta == 123.0


def test_export_of_a_missing_step_is_a_one_line_error(trained, tmp_path, capsys):
    run_dir, _ = trained
    assert export_cli.main(["--run_dir", str(run_dir), "--step", "3", "--output", str(tmp_path / "x")]) == 2
    assert "no committed checkpoint at step 3" in capsys.readouterr().err
