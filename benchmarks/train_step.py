"""Train-step FLOP/s against this machine's matmul peak, and Grain packing against raw reads.

    python benchmarks/train_step.py [--steps N] [--out results.json]

Prints JSON: for the tiny and a medium config, the achieved model FLOP/s of a compiled
MDLM train step (FLOPs from the config, synthetic batch), this machine's dense matmul
FLOP/s in the same dtype measured in the same run, and their ratio (MFU); then the Grain
loader's packed tokens/s at 0/1/2 worker processes against the same shuffled records
packed without Grain (a numpy first-fit packer, and the loader's own packer called
directly) and against raw sequential reads; and the tiny step's tokens/s on 4 simulated
devices (fsdp) against 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import grain
import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from _common import emit
from trainer import data, objectives, observe, packing, sharding, state, train
from trainer.config import Config
from trainer.model import param_count, train_flops_per_token

SHAPES = {  # name: (hidden, layers, heads, mlp_hidden, seq_len, global_batch)
    "tiny": (256, 4, 4, 704, 128, 16),
    "medium": (512, 8, 8, 1408, 256, 16),
}
VOCAB = 4096


def shape_config(shape: tuple[int, ...], dtype: str) -> Config:
    hidden, layers, heads, mlp, seq, batch = shape
    cfg = Config(run_dir="unused")
    m = cfg.model
    m.vocab_size, m.hidden, m.layers, m.heads, m.mlp_hidden = VOCAB, hidden, layers, heads, mlp
    m.max_seq_len, m.compute_dtype = seq, dtype
    cfg.data.seq_len, cfg.train.global_batch = seq, batch
    return cfg


def synthetic_batch(cfg: Config) -> dict[str, np.ndarray]:
    """A global batch of the rows cfg's objective reads: full rows of random tokens (one document per
    text row; trajectory rows with a prompt of an eighth of the row)."""
    batch, seq, vocab = cfg.train.global_batch, cfg.data.seq_len, cfg.model.vocab_size
    tokens = np.random.default_rng(0).integers(0, vocab - 1, (batch, seq)).astype(np.int32)
    if objectives.get(cfg.objective.name).batch == objectives.registry.TRAJECTORY:
        prompt = seq // 8
        return {"tokens": tokens, "prompt_len": np.full(batch, prompt, np.int32),
                "loss_mask": np.broadcast_to(np.arange(seq) >= prompt, (batch, seq)).copy(),
                "truncated": np.zeros(batch, np.int32)}
    return {"tokens": tokens, "tokens_segment_ids": np.ones((batch, seq), np.int32),
            "tokens_positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1))}


def step_flops(cfg: Config, steps: int) -> dict:
    """One compiled step of cfg's objective over all local devices (its mesh), synthetic batch, timed:
    compile seconds, step time, tokens/s, model FLOP/s (each token once, and as executed: two streams,
    a rollout) and the step's memory (XLA's buffer assignment; the device's own peak where it says)."""
    m, seq, batch = cfg.model, cfg.data.seq_len, cfg.train.global_batch
    tx, schedule = state.make_optimizer(cfg.optim, 1000)
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.parse_rules(cfg.mesh.rules)
    train_state, shardings = state.sharded_init(cfg, tx, mesh, rules)
    rows = sharding.batch_sharding(mesh, rules)
    step = train.make_train_step(state.model_graphdef(cfg), cfg, m.vocab_size - 1, tx, schedule, shardings, rows)
    batch_arrays = sharding.global_batch(synthetic_batch(cfg), rows)
    start = time.perf_counter()
    compiled = step.lower(train_state, batch_arrays).compile()
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    train_state, metrics = compiled(train_state, batch_arrays)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        train_state, metrics = compiled(train_state, batch_arrays)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    tokens = batch * seq
    device_stats = jax.local_devices()[0].memory_stats() or {}
    result = {
        "params_m": round(param_count(m) / 1e6, 2),
        "tokens_per_step": tokens,
        "step_seconds": round(seconds, 4),
        "compile_seconds": round(compile_seconds, 2),
        "tokens_per_s": round(tokens / seconds),
        "model_flops_per_s": train_flops_per_token(m, seq) * tokens / seconds,
        "executed_flops_per_s": objectives.get(cfg.objective.name).flops_per_token(m, seq) * tokens / seconds,
    }
    if memory is not None:
        result["xla_memory_gib"] = round((memory.temp_size_in_bytes + memory.argument_size_in_bytes
                                          + memory.output_size_in_bytes - memory.alias_size_in_bytes) / 2**30, 3)
    if "peak_bytes_in_use" in device_stats:
        result["device_peak_gib"] = round(device_stats["peak_bytes_in_use"] / 2**30, 3)
    return result


NUMPY_OPEN_ROWS = 32  # rows the numpy first-fit baseline keeps open (Grain's old packer's default here)
# Seed-shaped config at 45% MFU on one H100-class chip, in tokens/s (issue 14's estimate): what a
# host of 8 chips asks of its loader processes.
SEED_TOKENS_PER_S_PER_CHIP, CHIPS_PER_HOST = 216_000, 8


def _timed_rows(rows, wanted: int) -> float:
    """Packed (non-padding) tokens/s while drawing `wanted` rows from an iterator of row blocks."""
    packed = taken = 0
    start = time.perf_counter()
    for block in rows:
        packed += int(np.count_nonzero(block))
        taken += len(block)
        if taken >= wanted:
            return packed / (time.perf_counter() - start)
    raise ValueError("the dataset is too small for the requested batches")


def numpy_first_fit_rows(paths: list[str], cfg: Config):
    """The issue's fair baseline, the loader's job without Grain: the records in a seeded shuffled
    order, read 1,024 at a time, decoded, split at seq_len and first-fit packed into
    NUMPY_OPEN_ROWS open rows with numpy (all are emitted when a piece fits none). Yields
    segment-id blocks."""
    source = grain.sources.ArrayRecordDataSource(paths)
    order = np.random.default_rng(cfg.seed).permutation(len(source))
    seq, bins = cfg.data.seq_len, NUMPY_OPEN_ROWS
    segments, used, docs = np.zeros((bins, seq), np.int32), np.zeros(bins, np.int64), np.zeros(bins, np.int32)
    tokens = np.zeros((bins, seq), np.int32)
    for chunk in range(0, len(order), 1024):
        for record in source.__getitems__(order[chunk:chunk + 1024].tolist()):
            ids = np.frombuffer(record, "<u2", offset=4)
            for piece in range(0, len(ids), seq):
                part = ids[piece:piece + seq]
                fits = np.flatnonzero(seq - used >= len(part))
                if not len(fits):
                    yield segments.copy()
                    tokens[:], segments[:], used[:], docs[:] = 0, 0, 0, 0
                    fits = np.zeros(1, np.int64)
                b, at = fits[0], used[fits[0]]
                docs[b] += 1
                tokens[b, at:at + len(part)], segments[b, at:at + len(part)] = part, docs[b]
                used[b] += len(part)


def same_packer_rows(paths: list[str], cfg: Config):
    """The stronger baseline: the loader's own chunked best-fit packer (trainer/packing.py) on the
    same shuffled records, without Grain: a materialised permutation instead of Grain's O(1)-memory
    index shuffle, no pipeline, no iterator state. Yields segment-id blocks."""
    source = grain.sources.ArrayRecordDataSource(paths)
    order = np.random.default_rng(cfg.seed).permutation(len(source))
    size = cfg.data.pack_documents
    for index, chunk in enumerate(range(0, len(order), size)):
        documents = [np.frombuffer(r, "<u2", offset=4) for r in source.__getitems__(order[chunk:chunk + size].tolist())]
        yield packing.pack(documents, cfg.data.seq_len, np.random.default_rng([cfg.seed, 0, index]))[
            "tokens_segment_ids"]


def story_dataset(directory: str, stories: int) -> str:
    """Generated stories preprocessed by the Beam job into `directory`/data (imports Beam)."""
    from pipelines import corpus, preprocess

    text = f"{directory}/stories.txt"
    corpus.write_tinystories_layout(corpus.generate_stories(stories, seed=3), text)
    out = f"{directory}/data"
    assert preprocess.main(["--dataset", "tinystories", "--input", text, "--output", out]) == 0
    return out


def loader_rates(out: str, batches: int, workers: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Grain's packed batches (seq 256, batch 16) of the dataset `out` at each worker count against
    the two baselines on the same shuffled records and against raw sequential ArrayRecord reads, and
    the loader processes a host of 8 chips would need for the seed config."""
    manifest = data.load_manifest(out)
    paths = data.shard_paths(out, manifest, "train")
    start = time.perf_counter()
    raw_tokens = 0
    for path in paths:
        reader = ArrayRecordReader(path)
        for record in reader.read_all():
            raw_tokens += len(np.frombuffer(record, "<u2", offset=4).astype(np.int32))
        reader.close()
    raw_rate = raw_tokens / (time.perf_counter() - start)

    cfg = Config(run_dir="unused")
    cfg.data.path, cfg.data.seq_len, cfg.train.global_batch = out, 256, 16
    wanted = batches * cfg.train.global_batch
    baselines = {"numpy_packed": _timed_rows(numpy_first_fit_rows(paths, cfg), wanted),
                 "same_packer": _timed_rows(same_packer_rows(paths, cfg), wanted)}
    result = {"raw_arrayrecord_tokens_per_s": round(raw_rate),
              **{f"{name}_tokens_per_s": round(rate) for name, rate in baselines.items()}}
    for count in workers:
        cfg.data.num_workers = count
        iterator = data.train_iterator(cfg, manifest)
        next(iterator)  # worker start-up is not throughput
        rate = _timed_rows((next(iterator)["tokens_segment_ids"] for _ in range(batches)), wanted)
        result[f"grain_packed_tokens_per_s_workers_{count}"] = round(rate)
        for name, baseline in baselines.items():
            result[f"ratio_vs_{name}_workers_{count}"] = round(rate / baseline, 3)
        result[f"ratio_workers_{count}"] = round(rate / raw_rate, 3)
    per_process = result[f"grain_packed_tokens_per_s_workers_{min(workers)}"] / max(min(workers), 1)
    result["seed_host_tokens_per_s"] = SEED_TOKENS_PER_S_PER_CHIP * CHIPS_PER_HOST
    result["loader_processes_per_8_chip_host"] = int(np.ceil(result["seed_host_tokens_per_s"] / per_process))
    return result


def device_scaling(steps: int, dtype: str) -> dict:
    """The tiny step on 1 and on 4 simulated devices (XLA host devices share this CPU's cores)."""
    rates = {}
    for devices in (1, 4):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        code = ("import json, sys; sys.argv = ['x']; sys.path.insert(0, 'benchmarks'); "
                "from train_step import step_flops, shape_config, SHAPES; "
                f"print(json.dumps(step_flops(shape_config(SHAPES['tiny'], {dtype!r}), {steps})))")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                             check=True)
        rates[f"devices_{devices}_tokens_per_s"] = json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]
    rates["ratio_4_vs_1"] = round(rates["devices_4_tokens_per_s"] / rates["devices_1_tokens_per_s"], 3)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per config.")
    parser.add_argument("--dtype", default="float32", help="Compute dtype (float32 is faster on CPU).")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args()
    peak = observe.measure_matmul_flops(args.dtype)
    configs = {}
    for name, shape in SHAPES.items():
        result = step_flops(shape_config(shape, args.dtype), args.steps)
        result["mfu_vs_measured_matmul"] = round(result["model_flops_per_s"] / peak, 3)
        result["model_flops_per_s"] = round(result["model_flops_per_s"])
        configs[name] = result
    device_peak, source = observe.device_peak_flops(args.dtype)
    report = {
        "benchmark": "train_step",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {jax.devices()[0].device_kind}",
        "dtype": args.dtype,
        "matmul_flops_per_s": round(peak),
        "device_peak_flops_per_s": round(device_peak),
        "device_peak_source": source,
        "configs": configs,
        "device_scaling": device_scaling(args.steps, args.dtype),
    }
    with tempfile.TemporaryDirectory() as tmp:
        report["loader"] = loader_rates(story_dataset(tmp, 20_000), 200)
    emit(report, args.out)


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
    main()
