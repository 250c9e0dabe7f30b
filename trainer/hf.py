"""Hugging Face Llama / Qwen3 weights <-> this model, with safetensors and numpy only (no torch).

Layout: `config.json` plus `model.safetensors`, or `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`. Files are untrusted input: only JSON and safetensors are
read, and a missing tensor, a wrong shape or a truncated file is a one-line WeightsError.
PyTorch stores a Linear weight as [out, in]; our kernels are [in, out] (transposed here).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from etils import epath
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

from trainer.config import ModelConfig
from trainer.errors import UserError
from trainer.files import write_whole
from trainer.model import head_dim, kv_heads

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# ModelConfig field <- config.json key (defaults where Llama omits them).
FIELDS = {
    "hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "mlp_hidden": "intermediate_size",
    "rope_theta": "rope_parameters.rope_theta", "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings",
    "qk_norm": "model_type",
}


class WeightsError(UserError):
    """An unusable weights directory: one line naming the file, tensor or field, exit code 2."""


def read_config(directory: str) -> dict[str, Any]:
    path = epath.Path(directory) / "config.json"
    if not path.exists():
        raise WeightsError(f"{directory} has no config.json (a Hugging Face model directory is expected)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from None


def architecture(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields described by a Llama or Qwen3 config.json."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise WeightsError(f"config.json model_type {kind!r} is not supported (llama or qwen3)")
    for key, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False, None)), ("mlp_bias", (False, None)),
                         ("rope_scaling", (None,))):
        if hf.get(key) not in allowed:
            raise WeightsError(f"config.json {key}={hf.get(key)!r} is not supported (expected {allowed[0]!r})")
    # transformers 5 writes rope_parameters; earlier checkpoints rope_theta (+ rope_scaling).
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10_000.0), "rope_type": "default"}
    if rope.get("rope_type", "default") != "default":
        raise WeightsError(f"config.json rope_type {rope.get('rope_type')!r} is not supported (only default RoPE)")
    heads = hf["num_attention_heads"]
    return {
        "hidden": hf["hidden_size"], "layers": hf["num_hidden_layers"], "heads": heads,
        "kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "mlp_hidden": hf["intermediate_size"], "rope_theta": float(rope.get("rope_theta", 10_000.0)),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "qk_norm": kind == "qwen3",
    }


def resolve_model(cfg: ModelConfig, directory: str) -> int:
    """Takes the architecture from `directory`'s config.json: a field left at its default takes the
    file's value, a field set to anything else must agree. Returns the file's vocab size."""
    hf = read_config(directory)
    defaults = ModelConfig()
    for name, value in architecture(hf).items():
        current = getattr(cfg, name)
        if current == getattr(defaults, name):
            setattr(cfg, name, value)
        elif current != value:
            raise WeightsError(f"model.{name}={current!r} does not match {FIELDS[name]}={value!r} in "
                               f"{directory}/config.json")
    return int(hf["vocab_size"])


def tensor_names(cfg: ModelConfig) -> Iterator[tuple[tuple, str, bool]]:
    """(path in our params, Hugging Face tensor name, transpose?) for every parameter."""
    if cfg.scan_layers:
        raise WeightsError("Hugging Face weights map to unrolled layers: set model.scan_layers=false to import or "
                           "export them")
    yield ("embed", "embedding"), "model.embed_tokens.weight", False
    yield ("final_norm", "scale"), "model.norm.weight", False
    if not cfg.tie_embeddings:
        yield ("head", "kernel"), "lm_head.weight", True
    for i in range(cfg.layers):
        hf = f"model.layers.{i}"
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            yield ("blocks", i, "attn", ours, "kernel"), f"{hf}.self_attn.{theirs}.weight", True
        for part in ("gate", "up", "down"):
            yield ("blocks", i, "mlp", part, "kernel"), f"{hf}.mlp.{part}_proj.weight", True
        yield ("blocks", i, "attn_norm", "scale"), f"{hf}.input_layernorm.weight", False
        yield ("blocks", i, "mlp_norm", "scale"), f"{hf}.post_attention_layernorm.weight", False
        if cfg.qk_norm:
            yield ("blocks", i, "attn", "q_norm", "scale"), f"{hf}.self_attn.q_norm.weight", False
            yield ("blocks", i, "attn", "k_norm", "scale"), f"{hf}.self_attn.k_norm.weight", False


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _weight_files(directory: str) -> dict[str, str]:
    """Tensor name -> file holding it."""
    base = epath.Path(directory)
    if (base / INDEX).exists():
        weight_map = json.loads((base / INDEX).read_text()).get("weight_map", {})
        return {name: str(base / file) for name, file in weight_map.items()}
    if not (base / SINGLE).exists():
        raise WeightsError(f"{directory} has neither {SINGLE} nor {INDEX}")
    try:
        with safe_open(str(base / SINGLE), framework="numpy") as f:
            return {name: str(base / SINGLE) for name in f.keys()}
    except Exception as e:
        raise WeightsError(f"{base / SINGLE} is not a readable safetensors file: {str(e).splitlines()[0]}") from None


def load(directory: str, cfg: ModelConfig, abstract_params: Any, shardings: Any) -> Any:
    """Params read tensor by tensor, each placed straight onto its sharding (only the local shards
    are materialised, so a checkpoint larger than one host can load across a slice). Rows the
    vocabulary has beyond the checkpoint's (a new mask token) start from the mean embedding; rows the
    checkpoint has beyond the vocabulary (padding its tokenizer never produces: the trainer checks
    the tokenizers first) are dropped."""
    files = _weight_files(directory)
    params = jax.tree.map(lambda x: None, abstract_params)
    for path, name, transpose in tensor_names(cfg):
        if name not in files:
            raise WeightsError(f"{directory} has no tensor {name}")
        try:
            with safe_open(files[name], framework="numpy") as f:
                array = f.get_tensor(name)
        except Exception as e:
            raise WeightsError(f"cannot read tensor {name} from {files[name]}: {str(e).splitlines()[0]}") from None
        array = np.asarray(array.T if transpose else array, dtype=np.float32)
        target = _get(abstract_params, path)
        array = _fit_vocab(array, target.shape, path)
        if array.shape != target.shape:
            raise WeightsError(f"tensor {name} has shape {array.shape[::-1] if transpose else array.shape}, "
                               f"the model needs {target.shape[::-1] if transpose else target.shape}")
        _set(params, path, jax.make_array_from_callback(target.shape, _get(shardings, path),
                                                        lambda index, a=array: a[index]))
    return params


def _fit_vocab(array: np.ndarray, shape: tuple, path: tuple) -> np.ndarray:
    axis = {("embed", "embedding"): 0, ("head", "kernel"): 1}.get(path)
    if axis is None or array.ndim != 2 or array.shape[axis] == shape[axis]:
        return array
    if array.shape[axis] > shape[axis]:
        return np.take(array, np.arange(shape[axis]), axis=axis)
    extra = shape[axis] - array.shape[axis]
    mean = array.mean(axis=axis, keepdims=True)
    return np.concatenate([array, np.repeat(mean, extra, axis=axis)], axis=axis)


def export(params: Any, cfg: ModelConfig, directory: str, extra_config: dict[str, Any],
           max_shard_bytes: int = 2 << 30) -> list[str]:
    """Writes the params as Hugging Face safetensors (split past `max_shard_bytes`, with an
    index) and config.json; returns the weight files written."""
    out = epath.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, name, transpose in tensor_names(cfg):
        array = np.asarray(jax.device_get(_get(params, path)), dtype=np.float32)
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    files = [SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(files, shards):  # as bytes: safetensors writes only local paths, this may be gs://
        write_whole(out / file, safetensors_bytes(shard, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                 "weight_map": {name: file for file, shard in zip(files, shards) for name in shard}}
        write_whole(out / INDEX, json.dumps(index, indent=2))
    kind = "qwen3" if cfg.qk_norm else "llama"
    hf_config = {
        "architectures": [ARCHITECTURES[kind]], "model_type": kind, "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "num_key_value_heads": kv_heads(cfg),
        "head_dim": head_dim(cfg), "intermediate_size": cfg.mlp_hidden, "hidden_act": "silu",
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "attention_bias": False,
        "torch_dtype": "float32", **extra_config,
    }
    write_whole(out / "config.json", json.dumps(hf_config, indent=2))
    return files


