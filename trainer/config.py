"""The trainer's typed config: YAML + `key=value` overrides, validated before anything compiles."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml
from etils import epath

from trainer import attention, objectives
from trainer.errors import ConfigError
from trainer.objectives.mdlm import MDLMSettings


REMAT = ("none", "dots", "full")  # model.remat policies (trainer/model.py)
# Values older trainers wrote, read as what they meant (a run's saved config.yaml, or an older config).
LEGACY_VALUES = {"model.remat": {False: "none", True: "full"}}
# Keys older trainers wrote into a run's config.yaml: refused in a user's config (with what replaced
# them), skipped when reading a run's saved config (so older runs stay readable by evals).
RETIRED = {"data.packing_bins": "replaced by data.pack_documents (data order 2: chunks packed best-fit)"}


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int = 0  # the dataset tokenizer's vocab size; 0 = read it from the manifest
    hidden: int = 256  # model width
    layers: int = 4  # transformer blocks
    heads: int = 4  # query heads
    kv_heads: int = 0  # key/value heads, grouped-query attention (0 = heads)
    head_dim: int = 0  # size of one head (0 = hidden // heads)
    qk_norm: bool = False  # RMSNorm of queries and keys per head (Qwen3)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    mlp_hidden: int = 704  # SwiGLU inner width
    max_seq_len: int = 256  # longest sequence the model accepts
    rope_theta: float = 10_000.0  # RoPE base
    tie_embeddings: bool = True  # output head shares the token embedding
    compute_dtype: str = "float32"  # float32 | bfloat16 (params stay float32)
    remat: str = "none"  # activation checkpointing per block: none | dots (keep weight matmul outputs) | full
    scan_layers: bool = False  # blocks under nnx.scan: compile time constant in depth; params stacked on a layer axis
    attention: str = "auto"  # kernel: auto (cudnn on GPU in bf16, splash on TPU, else xla) | xla | cudnn | splash
    init_from: str = ""  # a Hugging Face Llama/Qwen3 directory to start from (architecture from its config.json)


@dataclasses.dataclass
class DataConfig:
    path: str = ""  # a preprocess output directory (local or gs://)
    seq_len: int = 256  # packed row length
    pack_documents: int = 1024  # documents read and packed together (rows never mix chunks; data order 2)
    # Padding after a row's last document, when it ends there, becomes EOS of that document and
    # carries loss: a diffusion model then learns that a text may end before its canvas does (the
    # bound evals report never counts these).
    eos_fill: bool = False
    num_workers: int = 0  # Grain worker processes (0 = in the trainer process)
    prefetch: int = 2  # batches each worker prepares ahead
    read_threads: int = 0  # threads reading chunks ahead (0 = read in line: fastest on local disk; use ~4 for gs://)
    read_buffer: int = 4  # chunks read ahead when read_threads > 0
    streams: int = 0  # loader streams per global batch, a multiple of the process count (0 = one per process)
    verify: str = "full"  # shard check at start: full (sha256 of every shard) | quick (record counts)


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    warmup_steps: int = 100  # linear warmup from 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at train.steps
    b1: float = 0.9  # AdamW beta1
    b2: float = 0.95  # AdamW beta2
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # global-norm clipping (0 disables)
    ema: float = 0.0  # decay of a moving average of the params that evals, export and init_from_run read (0 = off)


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    global_batch: int = 16  # rows per optimizer step, over all devices and accumulation
    grad_accum: int = 1  # micro-batches per optimizer step
    checkpoint_every: int = 100  # save every N steps (and at the end)
    keep_last: int = 3  # committed checkpoints kept
    keep_every: int = 0  # also keep every K-th step for evals to catch up (0 = off)
    log_every: int = 10  # metrics.jsonl / progress cadence
    nan_policy: str = "stop"  # stop | skip: what a non-finite loss does
    init_from_run: str = ""  # start from the params of this run's latest checkpoint (fresh optimizer)


@dataclasses.dataclass
class MeshConfig:
    data: int = 1  # pure data parallelism (parameters replicated)
    fsdp: int = -1  # data parallelism with parameters sharded (-1 = the remaining devices)
    tensor: int = 1  # model parallelism over heads, MLP width and vocabulary
    rules: str = "batch=data+fsdp,vocab=tensor,embed=fsdp,heads=tensor,mlp=tensor"  # logical axis=mesh axes


@dataclasses.dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled (WANDB_MODE overrides)
    project: str = "diffusion-lm-jax"  # wandb project


@dataclasses.dataclass
class Config:
    run_dir: str = ""  # holds config.yaml, metrics.jsonl, checkpoints/
    seed: int = 0  # data order, init and noise all derive from it
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    # The registered objective `objective.name` and its own settings (trainer/objectives/<name>.py).
    objective: objectives.Settings = dataclasses.field(default_factory=MDLMSettings)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    def validate(self, num_processes: int = 1) -> None:
        """Every rule that does not depend on the devices (trainer/sharding.py checks the mesh)."""
        m, d, t = self.model, self.data, self.train
        check([
            (bool(self.run_dir), "run_dir", "is required"),
            (m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = from the dataset)"),
            (bool(d.path), "data.path", "is required (a preprocess output directory)"),
            (m.heads >= 1 and (m.head_dim > 0 or m.hidden % m.heads == 0), "model.heads",
             f"must be at least 1 and divide model.hidden {m.hidden}"),
            *[(getattr(m, key) >= 1, f"model.{key}", "must be at least 1")
              for key in ("hidden", "layers", "mlp_hidden", "max_seq_len")],
            (m.kv_heads >= 0 and m.head_dim >= 0, "model.kv_heads", "and model.head_dim must be >= 0 (0 = derived)"),
            ((m.head_dim or m.hidden // max(m.heads, 1)) % 2 == 0, "model.head_dim", "must be even for RoPE"),
            (m.heads % max(m.kv_heads or m.heads, 1) == 0, "model.kv_heads", f"must divide model.heads {m.heads}"),
            (m.compute_dtype in ("float32", "bfloat16"), "model.compute_dtype", "must be float32 or bfloat16"),
            (m.attention in attention.KERNELS, "model.attention", f"must be one of {', '.join(attention.KERNELS)}"),
            (m.attention != "cudnn" or m.compute_dtype == "bfloat16", "model.attention",
             "cudnn needs model.compute_dtype=bfloat16 (cuDNN's fused attention has no float32 kernel)"),
            (m.remat in REMAT, "model.remat", f"must be one of {', '.join(REMAT)}"),
            (0 < d.seq_len <= m.max_seq_len, "data.seq_len", f"must be in [1, model.max_seq_len={m.max_seq_len}]"),
            (d.pack_documents >= 1, "data.pack_documents", "must be at least 1"),
            (d.num_workers >= 0, "data.num_workers", "must be >= 0"),
            (d.verify in ("full", "quick"), "data.verify", "must be full or quick"),
            *self.objective.rules(self),
            (t.steps >= 1, "train.steps", "must be at least 1"),
            (t.grad_accum >= 1, "train.grad_accum", "must be at least 1"),
            (t.global_batch >= 1, "train.global_batch", "must be at least 1"),
            (d.streams >= 0 and (d.streams or num_processes) % num_processes == 0, "data.streams",
             f"must be 0 or a multiple of the {num_processes} processes"),
            (t.global_batch % (d.streams or num_processes) == 0, "train.global_batch",
             f"must be divisible by the loader streams ({d.streams or num_processes})"),
            (t.checkpoint_every >= 1, "train.checkpoint_every", "must be at least 1"),
            (t.keep_last >= 1, "train.keep_last", "must be at least 1"),
            (t.log_every >= 1, "train.log_every", "must be at least 1"),
            (t.nan_policy in ("stop", "skip"), "train.nan_policy", "must be stop or skip"),
            (self.optim.lr > 0, "optim.lr", "must be positive"),
            (0 <= self.optim.ema < 1, "optim.ema", "must be in [0, 1) (0 = no moving average)"),
            (self.wandb.mode in ("offline", "online", "disabled"), "wandb.mode", "must be offline, online or disabled"),
        ])
        kernel = attention.resolve(m.attention, m.compute_dtype)  # a kernel this platform lacks: refused here
        check([(kernel != "splash" or attention.splash_block(d.seq_len) is not None, "data.seq_len",
                "must be a multiple of 128 (or below 128) for splash attention: change it or use model.attention=xla")])


def check(rules: list[tuple[bool, str, str]]) -> None:
    """Raises ConfigError for the first (condition, key, message) whose condition is false."""
    for ok, key, message in rules:
        if not ok:
            raise ConfigError(f"{key} {message}")


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool}[annotation]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, bool):  # YAML 1.1 reads yes/no (e.g. sampling.revise=no) as booleans
        return "yes" if value else "no"
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {annotation}, got {value!r}")
    return value


def _apply(target: Any, values: dict[str, Any], prefix: str = "", saved: bool = False) -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if key in RETIRED and saved:
            continue
        if key in RETIRED:
            raise ConfigError(f"{key} is retired: {RETIRED[key]}")
        if name not in fields:
            if saved and isinstance(target, objectives.Settings):
                continue  # older trainers saved every objective's keys in each run's config.yaml
            known = ", ".join(sorted(fields))
            where = f"a setting of objective {target.name}" if isinstance(target, objectives.Settings) else "a config key"
            raise ConfigError(f"{key} is not {where} (known: {known})")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping")
            if isinstance(current, objectives.Settings):
                current = _objective_settings(current, value.get("name", current.name))
                setattr(target, name, current)
            _apply(current, value, f"{key}.", saved)
        else:
            value = LEGACY_VALUES.get(key, {}).get(value, value) if isinstance(value, bool) else value
            setattr(target, name, _check_type(key, value, fields[name].type))


def _objective_settings(current: objectives.Settings, name: Any) -> objectives.Settings:
    """The settings of objective `name`, keeping the values of `current` that it shares."""
    chosen = objectives.get(_check_type("objective.name", name, "str")).settings
    if type(current) is chosen:
        return current
    shared = {f.name: getattr(current, f.name) for f in dataclasses.fields(chosen) if hasattr(current, f.name)}
    return chosen(**{**shared, "name": name})


def _layer(values: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """A config layer (a base file, a file, an override) over the earlier ones. A layer that names
    another objective drops the earlier layers' settings of the objective it replaces (what the new
    one does not own), so `--config X objective.name=ar` works whatever objective X trains."""
    old, new = values.get("objective"), layer.get("objective")
    if isinstance(old, dict) and isinstance(new, dict) and new.get("name", old.get("name")) != old.get("name"):
        try:
            owned = {f.name for f in dataclasses.fields(objectives.get(new["name"]).settings)}
        except (ConfigError, TypeError):
            owned = set(old)  # an unknown name is refused when the settings apply
        values = {**values, "objective": {k: v for k, v in old.items() if k in owned}}
    return _merge(values, layer)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`, mappings merged key by key."""
    merged = dict(base)
    for key, value in update.items():
        both = isinstance(merged.get(key), dict) and isinstance(value, dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def _override(assignment: str) -> dict[str, Any]:
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} must look like key=value (nested keys with dots)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML ({str(e).splitlines()[0]}); "
                          f"quote it") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load(path: str | None, overrides: list[str]) -> Config:
    return load_into(Config(), path, overrides)


def load_run(run_dir: Any) -> Config:
    """A run's saved config.yaml, written by this trainer or an older one (retired keys skipped),
    with the attention kernel chosen anew for the platform reading it (a run trained with cuDNN
    is evaluated on CPU too)."""
    cfg = load_into(Config(), str(epath.Path(run_dir) / "config.yaml"), [], saved=True)
    cfg.model.attention = "auto"
    return cfg


def load_into(config: Any, path: str | None, overrides: list[str], saved: bool = False) -> Any:
    """Fills a config dataclass from a YAML file (and the files its `base:` names), then `key=value`
    overrides, all merged before they apply; checks keys and types.
    `saved`: the file is a run's own config.yaml (retired keys are skipped, not refused)."""
    values = {} if path is None else _read_yaml(path)
    for assignment in overrides:
        values = _layer(values, _override(assignment))
    _apply(config, values, saved=saved)
    return config


def _read_yaml(path: str, children: tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML config as a mapping, over the config its `base:` key names (a path relative to it;
    MaxText's base_config), so a config holds only its differences."""
    try:
        values = yaml.safe_load(epath.Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text: save the config as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"base in {path} must name a config file, got {base!r}")
    base_path = str(epath.Path(path).parent / base)
    if base_path in children or base_path == path:
        raise ConfigError(f"base in {path} makes a loop through {base_path}")
    return _layer(_read_yaml(base_path, (*children, path)), values)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
