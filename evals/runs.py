"""Reading a run for evaluation: its config, the data evals read, and params of a committed step
or of a `trainer.export` directory, on this process's first device. `Run` opens one once for
every reader (evals, the harness, evals.generate, evals.trajectories)."""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import jax
from etils import epath
from flax import nnx
from tokenizers import Tokenizer

from trainer import config as config_lib
from trainer import checkpointing, data, hf, state
from trainer.errors import RunError


def load_config(run_dir: str) -> config_lib.Config:
    path = epath.Path(run_dir)
    if not path.exists():
        raise RunError(f"run directory {run_dir} does not exist")
    if not (path / "config.yaml").exists():
        raise RunError(f"{run_dir} is not a trainer run directory (no config.yaml)")
    return config_lib.load_run(path)


def eval_data(run_cfg: config_lib.Config, data_path: str, split: str = "validation") -> dict[str, Any]:
    """The manifest of the data evals read (`data_path`, else the run's), with `run_cfg.data.path`
    pointed at it; refuses another tokenizer than the run's and an empty `split` (the one read)."""
    path = data_path or run_cfg.data.path
    manifest = data.load_manifest(path)
    if data_path and data_path != run_cfg.data.path:
        if data.tokenizer_sha(run_cfg.data.path) not in (None, manifest["tokenizer"]["sha256"]):
            raise RunError(f"data_path {data_path} was tokenized with another tokenizer than the run's data "
                           f"({run_cfg.data.path})")
        run_cfg.data.path = path
    if not manifest["splits"][split]["num_records"]:
        raise RunError(f"the {split} split of {path} holds no records: evals score and prompt from it "
                       f"(preprocess with a larger --validation_fraction, or set data_path)")
    return manifest


def tokenizer(data_path: str, manifest: dict[str, Any]) -> Tokenizer:
    """The tokenizer of a preprocess output (`manifest` is its manifest), refused unless it is the one
    the manifest's sha256 names (another of the same size would score the same and decode garbage)."""
    path = epath.Path(data_path) / manifest["tokenizer"]["file"]
    if not path.exists():
        raise RunError(f"{path} is missing: the dataset {data_path} is incomplete (re-run preprocess)")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest["tokenizer"]["sha256"]:
        raise RunError(f"{path} does not match the sha256 of {data_path}/manifest.json: the dataset was altered "
                       f"(restore its tokenizer.json or re-run preprocess)")
    return Tokenizer.from_str(raw.decode())


def exported_step(run_dir: str) -> int | None:
    """The training step of a `trainer.export` directory (None for a run directory)."""
    path = epath.Path(run_dir)
    if (path / "checkpoints").exists() or not (path / "config.json").exists():
        return None
    return int(hf.read_config(run_dir).get("diffusion_lm", {}).get("step", 0))


def load_exported(run_dir: str, cfg: config_lib.Config) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, params) from an exported directory's safetensors, on this process's first device."""
    abstract = state.abstract_state(cfg)["params"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params = hf.load(run_dir, cfg.model, abstract, jax.tree.map(lambda _: device, abstract))
    return state.model_graphdef(cfg), params


class Run(NamedTuple):
    """A training run or a trainer.export directory, read once: what every reader of it asks."""
    run_dir: str
    cfg: config_lib.Config  # its data.path is the data evals read (the run's, or data_path)
    manifest: dict[str, Any]  # of that data
    tokenizer: Tokenizer
    ids: dict[str, int | None]  # special ids: pad, bos, eos, mask
    exported: int | None  # the step an export holds; None for a run directory

    def step(self, step: int = 0) -> int:
        """The committed step `step` (0 = the latest; an export: its step); RunError when there is none."""
        if self.exported is not None:
            if step not in (0, self.exported):
                raise RunError(f"{self.run_dir} is an export of step {self.exported}, not of step {step}")
            return self.exported
        return state.committed_step(checkpointing.reader(self.run_dir), self.run_dir, step or None)

    def weights(self, step: int = 0) -> state.Weights:
        """The weights of committed `step` (0 = the latest; an export: its step) on this process's
        first device."""
        if self.exported is None:
            return state.load_params(self.run_dir, step or None, self.cfg)
        return state.Weights(*load_exported(self.run_dir, self.cfg), self.step(step))


def open_run(run_dir: str, data_path: str = "", split: str = "validation") -> Run:
    """Reads a run or an export: config, the data its reader reads (`data_path`, else the run's; same
    tokenizer; `split` must hold records), its tokenizer and special ids. RunError when any is
    missing or does not fit."""
    cfg = load_config(run_dir)
    manifest = eval_data(cfg, data_path, split)
    saved = checkpointing.read_identity(run_dir)
    conflict = saved and checkpointing.identity_conflict(
        saved, checkpointing.run_identity(cfg, manifest["tokenizer"]["sha256"]))
    if conflict:
        key, theirs, ours = conflict
        raise RunError(f"{run_dir} was trained with {key}={theirs}, its config.yaml now says {ours}: restore the "
                       f"config it was trained with")
    return Run(run_dir, cfg, manifest, tokenizer(cfg.data.path, manifest), data.special_ids(manifest),
               exported_step(run_dir))
