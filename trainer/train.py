"""The training loop: a pure, compiled step and a thin host loop around it.

The step's randomness is `fold_in(key(seed), step)` and the data order is Grain's
checkpointed iterator, so a resumed run repeats the uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from trainer import attention, checkpointing, data, hf, objectives, observe, runlock, sharding
from trainer import state as state_lib
from trainer import config as config_lib
from trainer.config import Config, dump, to_dict
from trainer.errors import DataError, MismatchError
from trainer.files import write_whole
from trainer.model import param_count, train_flops_per_token

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143: what schedulers expect from a preempted job (SIGINT: 130)


class NonFiniteLoss(Exception):
    """The loss stopped being finite under nan_policy=stop: one line, exit code 1."""


def make_train_step(graphdef: nnx.GraphDef, cfg: Config, mask_id: int, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, shardings=None, batch_sharding=None):
    accum = cfg.train.grad_accum
    objective = objectives.get(cfg.objective.name)

    def summed_loss(params, micro_batch, key):
        """(summed loss, (token count, summed diagnostics)) of one micro-batch."""
        total, count, sums = objective.train_loss(nnx.merge(graphdef, params), micro_batch, key, mask_id,
                                                  cfg.objective)
        return total, (count, sums)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        micro = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])  # noqa: E731
        xs = (jax.tree.map(micro, batch), jax.random.split(key, accum))

        def accumulate(carry, x):
            grads, total, count, sums = carry
            (micro_total, (micro_count, micro_sums)), micro_grads = grad_fn(state["params"], *x)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            sums = jax.tree.map(jnp.add, sums, micro_sums)
            return (grads, total + micro_total, count + micro_count, sums), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        sum_shapes = jax.eval_shape(lambda: summed_loss(state["params"], jax.tree.map(lambda x: x[0], xs[0]),
                                                        xs[1][0])[1][1])
        zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sum_shapes)
        (grads, total, tokens, sums), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0, zero_sums), xs)
        count = jnp.maximum(tokens, 1)
        grads = jax.tree.map(lambda g: g / count, grads)  # exactly the full-batch mean
        value = total / count
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # Under either nan_policy a non-finite update is never applied, nor the update of a batch with
        # no token carrying loss (weight decay alone would move the params; the host refuses such a batch).
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        applied = finite & (tokens > 0)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(applied, n, o), new, old)  # noqa: E731
        params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        if "ema" in state:
            new_state["ema"] = keep(state_lib.ema_update(state["ema"], params, cfg.optim.ema, state["step"]),
                                    state["ema"])
        metrics = {"loss": value, "grad_norm": grad_norm, "lr": schedule(state["step"]), "finite": finite,
                   "tokens": tokens, **objective.report(sums)}
        return new_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                   donate_argnums=0)


def real_tokens(batch: dict[str, np.ndarray]) -> int:
    """Tokens of a host batch that are data, not padding (for tokens/s)."""
    if "tokens_segment_ids" in batch:
        return int(np.count_nonzero(batch["tokens_segment_ids"]))
    return int(batch["loss_mask"].sum() + batch["prompt_len"].sum())


# Model settings that change how a step runs, not the weights it trains: free to change on resume.
HOW_IT_RUNS = ("init_from", "attention", "remat")


def check_resume(cfg: Config) -> None:
    """A run directory resumes only with the model it was trained with: refused in one line before
    its config.yaml (which evals read) is rewritten."""
    path, checkpoints = epath.Path(cfg.run_dir) / "config.yaml", epath.Path(cfg.run_dir) / "checkpoints"
    if not path.exists() or not checkpoints.exists() or checkpointing.reader(cfg.run_dir).latest_step() is None:
        return  # nothing trained yet: nothing to protect
    saved_cfg = config_lib.load_run(cfg.run_dir)
    saved = saved_cfg.model
    for field in dataclasses.fields(saved):
        if field.name not in HOW_IT_RUNS and getattr(saved, field.name) != getattr(cfg.model, field.name):
            raise MismatchError(
                f"{cfg.run_dir} holds a run with model.{field.name}={getattr(saved, field.name)}, this config has "
                f"{getattr(cfg.model, field.name)}: resume with the run's model or use a new run_dir")
    # A run from before identity.json: its saved config says what it was trained as.
    conflict = checkpointing.identity_conflict(checkpointing.run_identity(saved_cfg, ""),
                                               checkpointing.run_identity(cfg, ""))
    if conflict:
        key, theirs, ours = conflict
        raise MismatchError(f"{cfg.run_dir} holds a run with {key}={theirs}, this config has {ours}: resume with the "
                            f"run's settings, or start a new run_dir with train.init_from_run={cfg.run_dir}")


def check_init_source(cfg: Config, manifest: dict[str, Any]) -> None:
    """train.init_from_run must be a run of the same model shape, tokenizer and (between two
    block-diffusion objectives) block size: anything else fails here in one line, before any write."""
    source = cfg.train.init_from_run
    path = epath.Path(source) / "config.yaml"
    if not path.exists():
        raise MismatchError(f"train.init_from_run {source} is not a trainer run directory (no config.yaml)")
    other = config_lib.load_run(source)
    for field in ("hidden", "layers", "heads", "kv_heads", "head_dim", "mlp_hidden", "qk_norm", "tie_embeddings",
                  "vocab_size", "scan_layers"):
        if getattr(other.model, field) != getattr(cfg.model, field):
            raise MismatchError(f"train.init_from_run {source} has model.{field}="
                                f"{getattr(other.model, field)}, this run {getattr(cfg.model, field)}")
    if data.tokenizer_sha(other.data.path) not in (None, manifest["tokenizer"]["sha256"]):
        raise MismatchError(f"train.init_from_run {source} was trained with another tokenizer than {cfg.data.path}: "
                            f"preprocess with --tokenizer {other.data.path}/tokenizer.json")
    _check_blocks(f"train.init_from_run {source}", objectives.get(other.objective.name).block_size(other.objective),
                  cfg)


def params_from_run(cfg: Config, state: dict[str, Any], shardings: Any) -> dict[str, Any]:
    """train.init_from_run's params, placed like `state`'s. Between models of different heads (Edit
    Flows' or not, with the time input or not) the shared weights carry over: an Edit Flows model
    started from an AR or MDLM run gets an insertion head copied from the LM head and the rest of
    its heads as initialised."""
    source = config_lib.load_run(cfg.train.init_from_run)
    ours = objectives.get(cfg.objective.name).model_options(cfg.objective)
    if objectives.get(source.objective.name).model_options(source.objective) == ours:
        return checkpointing.params_of_run(cfg.train.init_from_run, state, state_lib.weights_key(source))
    theirs = state_lib.load_params(cfg.train.init_from_run, cfg=source).params
    return with_edit_heads({name: value for name, value in theirs.items() if name in state["params"]},
                           state["params"], cfg, shardings)


def with_edit_heads(params: dict[str, Any], initial: dict[str, Any], cfg: Config, shardings: Any) -> dict[str, Any]:
    """`params` completed with the Edit Flows heads this run's model has (`initial`, as initialised)
    and they lack (another objective's run, a Hugging Face model): the insertion head a copy of the
    LM head (the references' recipe), the others as initialised."""
    if "edit" not in initial:
        return params
    lm_head = params["embed"]["embedding"].T if cfg.model.tie_embeddings else params["head"]["kernel"]
    theirs = {name: head for name, head in params.get("edit", {}).items() if name in initial["edit"]}
    return jax.device_put({**params, "edit": {**initial["edit"], "ins": {"kernel": lm_head}, **theirs}}, shardings)


def _check_blocks(source: str, theirs: int | None, cfg: Config) -> None:
    ours = objectives.get(cfg.objective.name).block_size(cfg.objective)
    if None not in (theirs, ours) and theirs != ours:  # decoding blocks are what the model learned
        raise MismatchError(f"{source} was trained with objective.block_size={theirs}, this run has {ours}")


def check_init_weights(cfg: Config, manifest: dict[str, Any]) -> None:
    """model.init_from must hold weights for this run's tokenizer (its tokenizer.json gives every token
    the id the dataset's does), mask token and (weights exported from block diffusion) block size:
    anything else fails here in one line, before any write, as train.init_from_run does."""
    source = cfg.model.init_from
    ids = data.special_ids(manifest)
    theirs = hf.read_config(source)
    if theirs.get("mask_token_id") not in (None, ids["mask"]):
        raise MismatchError(f"model.init_from {source} was trained with mask_token_id={theirs['mask_token_id']}, "
                            f"the dataset {cfg.data.path} masks with id {ids['mask']}")
    _check_blocks(f"model.init_from {source}", theirs.get("diffusion_lm", {}).get("block_size"), cfg)
    tokenizer = epath.Path(source) / "tokenizer.json"
    if not tokenizer.exists():  # nothing tells the weights' padding rows from their tokens
        if cfg.model.vocab_size < int(theirs["vocab_size"]):
            raise MismatchError(f"model.vocab_size {cfg.model.vocab_size} is smaller than vocab_size "
                                f"{theirs['vocab_size']} of {source}, which has no tokenizer.json: preprocess with "
                                f"that model's tokenizer")
        print(f"warning: model.init_from {source} has no tokenizer.json: cannot check that {cfg.data.path} was "
              f"tokenized with the weights' tokenizer")
        return
    ours = data.tokenizer_vocab((epath.Path(cfg.data.path) / manifest["tokenizer"]["file"]).read_text())
    for token, token_id in data.tokenizer_vocab(tokenizer.read_text()).items():
        if ours.get(token) != token_id:
            raise MismatchError(f"model.init_from {source} has another tokenizer than {cfg.data.path} (its token "
                                f"{token!r} is id {token_id}, the dataset's {ours.get(token)}): preprocess with "
                                f"--tokenizer {tokenizer}")


class _Preemption:
    """Turns SIGTERM and SIGINT into a flag the loop checks after each step; `restore` puts the
    handlers back."""

    def __init__(self):
        self.requested = 0  # the signal that asked the run to stop (0: none)
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = signum

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run(cfg: Config) -> int:
    """Trains to cfg.train.steps, resuming from the latest committed checkpoint; returns an exit code."""
    manifest = data.load_manifest(cfg.data.path)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = manifest["tokenizer"]["vocab_size"]
    if cfg.model.init_from:
        hf.resolve_model(cfg.model, cfg.model.init_from)
    data.check_dataset(cfg.data.path, manifest, cfg.model, cfg.data.verify)
    if cfg.model.init_from:
        check_init_weights(cfg, manifest)
    if cfg.train.init_from_run:
        check_init_source(cfg, manifest)
    identity = checkpointing.run_identity(cfg, manifest["tokenizer"]["sha256"])
    checkpointing.check_identity(cfg.run_dir, identity, write=False)  # before anything is written
    check_resume(cfg)
    lock = runlock.RunLock(cfg.run_dir) if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()  # one trainer per run directory
    try:
        return _train(cfg, manifest, lock, identity)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, manifest: dict[str, Any], lock: runlock.RunLock | None, identity: dict[str, Any]) -> int:
    mask_id = data.special_ids(manifest)["mask"]
    lead = jax.process_index() == 0  # logs, progress, wandb and config: process 0 only
    run_dir = epath.Path(cfg.run_dir)
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)

    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.parse_rules(cfg.mesh.rules)
    rows = sharding.batch_sharding(mesh, rules)
    tx, schedule = state_lib.make_optimizer(cfg.optim, cfg.train.steps)
    state, shardings = state_lib.sharded_init(cfg, tx, mesh, rules)
    iterator = data.train_iterator(cfg, manifest, jax.process_index(), jax.process_count())
    mngr = checkpointing.manager(cfg.run_dir, cfg.train)
    checkpointing.check_data_state(cfg.run_dir, data.DATA_ORDER)
    run_id = checkpointing.check_identity(cfg.run_dir, identity, write=lead)  # recorded under the run lock
    if jax.process_count() > 1:  # every process saves the id process 0 recorded
        run_id = bytes(multihost_utils.broadcast_one_to_all(np.frombuffer(bytes.fromhex(run_id), np.uint8))).hex()
    loader = {**data.loader_settings(cfg, manifest, jax.process_count()), checkpointing.RUN_ID: run_id}
    restored = checkpointing.restore_latest(mngr, state, iterator, loader)  # onto this mesh, whatever saved it
    if restored is not None:
        state = restored
    elif cfg.train.init_from_run:
        state["params"] = params_from_run(cfg, state, shardings["params"])
    elif cfg.model.init_from:
        loaded = hf.load(cfg.model.init_from, cfg.model, state["params"], shardings["params"])
        state["params"] = with_edit_heads({name: value for name, value in loaded.items() if name != "edit"},
                                          state["params"], cfg, shardings["params"])
    if "ema" in state and restored is None:  # the average starts from the weights the run starts from
        state["ema"] = jax.tree.map(jnp.copy, state["params"])
    if lead:  # after every check of what the run's own files say: a refused resume leaves them as they were
        write_whole(run_dir / "config.yaml", dump(cfg))
    start = int(state["step"])
    train_step = make_train_step(state_lib.model_graphdef(cfg), cfg, mask_id, tx, schedule, shardings, rows)

    metrics_log = observe.MetricsLog(cfg.run_dir, start) if lead else None
    wandb = observe.Wandb(cfg.run_dir, cfg.wandb.project, cfg.wandb.mode if lead else "disabled", to_dict(cfg))
    peak, peak_source = observe.device_peak_flops(cfg.model.compute_dtype)
    peak *= jax.device_count()
    objective = objectives.get(cfg.objective.name)
    # MFU counts each token once (comparable across objectives); `mfu_executed` credits what the step
    # runs where that is more (two streams, a rollout).
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
    executed_per_token = objective.flops_per_token(cfg.model, cfg.data.seq_len)
    kernel = attention.resolve(cfg.model.attention, cfg.model.compute_dtype)
    preemption = _Preemption()
    if lead:
        print(f"model {param_count(cfg.model) / 1e6:.2f}M params, {flops_per_token / 1e6:.1f} MFLOP/token "
              f"({executed_per_token / 1e6:.1f} executed); attention {kernel}, remat {cfg.model.remat}; "
              f"{'resuming at step ' + str(start) if start else 'fresh run'}; "
              f"{data.epochs_for(manifest, cfg):.2f} epochs; mesh {dict(mesh.shape)} over "
              f"{jax.process_count()} process(es); MFU vs {peak / 1e9:.0f} GFLOP/s ({peak_source})"
              + (f"; XLA_FLAGS {os.environ.get('XLA_FLAGS', '')}" if jax.default_backend() == "gpu" else ""))

    save = functools.partial(checkpointing.save, mngr, loader=loader)
    # In logs (no TTY) a redraw every few seconds instead of a carriage-return flood.
    bar = tqdm(total=cfg.train.steps, initial=start, desc="train", dynamic_ncols=True, disable=not lead,
               mininterval=0.1 if sys.stderr.isatty() else 15)
    window_tokens, window_start = 0, time.perf_counter()
    saved = start if restored is not None else None  # the step whose state is on disk
    try:
        for step in range(start, cfg.train.steps):
            stop = preemption.requested
            if stop:
                if saved != step:  # the step just checkpointed needs no second save
                    save(step, state, iterator, force=True)
                mngr.wait_until_finished()
                print(f"stopped by {signal.Signals(stop).name}: checkpoint saved at step {step}")
                return 128 + stop
            batch = next(iterator)
            window_tokens += real_tokens(batch) * jax.process_count()
            state, metrics = train_step(state, sharding.global_batch(batch, rows))
            done = step + 1
            value = float(metrics["loss"])
            if not int(metrics["tokens"]):
                mngr.wait_until_finished()
                raise DataError(f"step {done}: the batch holds no token that carries loss, so it was not trained "
                                f"on: the train shards or the data-iterator state are damaged; check the data with "
                                f"python -m pipelines.manifest {cfg.data.path}")
            if not bool(metrics["finite"]):
                what = f"loss {value}, gradient norm {float(metrics['grad_norm'])}"
                if cfg.train.nan_policy == "stop":
                    mngr.wait_until_finished()
                    raise NonFiniteLoss(f"not finite at step {done} ({what}); stopped, and no checkpoint "
                                        f"holds this state (train.nan_policy=skip skips such steps instead)")
                print(f"step {done}: not finite ({what}), update skipped")
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                seconds = time.perf_counter() - window_start
                tokens_per_s = window_tokens / seconds
                record = {"step": done, "loss": value, "lr": float(metrics["lr"]),
                          "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": round(tokens_per_s, 1),
                          "mfu": tokens_per_s * flops_per_token / peak, "attention": kernel}
                if executed_per_token != flops_per_token:
                    record["mfu_executed"] = tokens_per_s * executed_per_token / peak
                record.update(objective.log(value, metrics, cfg.objective))
                if lead:
                    metrics_log.write(record)
                    lock.beat()
                wandb.log(done, record)
                bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                window_tokens, window_start = 0, time.perf_counter()
            bar.update(1)
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                save(done, state, iterator, force=done == cfg.train.steps)
                saved = done
        mngr.wait_until_finished()
    except Exception as e:
        if checkpointing.is_disk_full(e):
            raise checkpointing.disk_full(cfg.run_dir, state) from None
        raise
    finally:
        preemption.restore()
        bar.close()
        mngr.close()
        wandb.finish()
    return 0

