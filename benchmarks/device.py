"""The accelerator check: the seed-shaped model's train step for every objective against the chip's
spec-sheet peak, the Grain loader with 4 workers, and cached decoding per forward against a bare
forward of the same model, as one JSON. Needs no Beam and no network.

    bash benchmarks/device.sh --record         # on a GPU/TPU host, a few minutes; kept in latest.json
    python benchmarks/device.py --tiny         # the same code paths on CPU, tiny shapes (CI)

Train step: `configs/tinystories_seed.yaml` (hidden 1280 x 16 layers, bf16, its remat policy,
scanned layers, `model.attention: auto`) for mdlm, ar, bd3lm and oput (blocks of 32) on synthetic
batches of 256 x 512 and 64 x 2048 tokens (--tiny: 4 x 64): step time, tokens/s, MFU over the
spec-sheet bf16 peak of one chip (measured matmul FLOP/s where no spec is known) with each token
counted once and, for the two-stream objectives, as executed; compile seconds; memory from XLA's
buffer assignment and the device's own peak. Decoding: a freshly initialised block-diffusion model
of the same shape decodes 256 tokens after 16-token prompts with `spd_cached` and `one_token` at
batch 1, 32 and 128; its time per forward is set against a bare jitted forward of the same model,
block and KV-cache shape (what the decoder adds on top of the model). An untrained model commits
about one token per forward, so these are the cost of the decoder's forwards, not a trained
model's acceptance rate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np
from _common import bare_forward_seconds, emit
from synthetic import token_dataset
from train_step import loader_rates, step_flops

from evals import decoders
from evals.config import SamplingConfig
from trainer import attention, observe, sharding, state
from trainer import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEED_CONFIG = ROOT / "configs" / "tinystories_seed.yaml"
LATEST = ROOT / "benchmarks" / "latest.json"
TINY = ["model.hidden=64", "model.layers=2", "model.heads=2", "model.mlp_hidden=128", "model.vocab_size=512"]
OBJECTIVES = {"mdlm": [], "ar": [], "bd3lm": ["objective.block_size=32"],
              "oput": ["objective.block_size=32", "objective.noise_range_low=0.75", "objective.noise_range_high=0.75"]}


def seed_config(tiny: bool, *overrides: str) -> config_lib.Config:
    return config_lib.load(str(SEED_CONFIG), ["run_dir=unused", "data.path=unused", *(TINY if tiny else []),
                                              *overrides])


def measured(cfg: config_lib.Config, steps: int, peak: float) -> dict:
    """One setting's step figures with MFU over `peak`, or its error (a setting this chip rejects,
    such as one out of memory, is a result, not a crash)."""
    try:
        result = step_flops(cfg, steps)
    except Exception as e:  # noqa: BLE001
        return {"error": str(e).splitlines()[0][:300]}
    result["mfu"] = round(result.pop("model_flops_per_s") / peak, 4)
    result["mfu_executed"] = round(result.pop("executed_flops_per_s") / peak, 4)
    result["attention"] = attention.resolve(cfg.model.attention, cfg.model.compute_dtype)
    return result


def train_steps(tiny: bool, steps: int) -> dict:
    """Per objective and shape: step time, tokens/s, MFU (token-once and executed), compile seconds,
    memory; and MDLM under the lighter `dots` remat policy at the config's own shape."""
    peak, source = observe.device_peak_flops("bfloat16")
    shapes = {64: 4} if tiny else {512: 256, 2048: 64}  # seq_len: global batch
    results = {}
    for objective, settings in OBJECTIVES.items():
        for seq, batch in shapes.items():
            cfg = seed_config(tiny, f"objective.name={objective}", *settings, f"model.max_seq_len={seq}",
                              f"data.seq_len={seq}", f"train.global_batch={batch}")
            results[f"{objective}_{batch}x{seq}"] = measured(cfg, steps, peak)
    seq, batch = min(shapes.items())
    cfg = seed_config(tiny, "model.remat=dots", f"model.max_seq_len={seq}", f"data.seq_len={seq}",
                      f"train.global_batch={batch}")
    results[f"mdlm_{batch}x{seq}_remat_dots"] = measured(cfg, steps, peak)
    return {"peak_flops_per_s": round(peak), "peak_source": source, "remat": seed_config(tiny).model.remat,
            "configs": results}


def init_compile(tiny: bool) -> dict:
    """Seconds to lower and compile the seed config's sharded initialiser in each layer layout."""
    seconds = {}
    for scan in (True, False):
        cfg = seed_config(tiny, f"model.scan_layers={str(scan).lower()}")
        tx, _ = state.make_optimizer(cfg.optim, 1)
        mesh, rules = sharding.make_mesh(cfg.mesh), sharding.parse_rules(cfg.mesh.rules)
        shardings = sharding.state_shardings(jax.eval_shape(lambda: state.init_state(cfg, tx)), mesh, rules)
        start = time.perf_counter()
        jax.jit(lambda: state.init_state(cfg, tx), out_shardings=shardings).lower().compile()
        seconds["scanned" if scan else "unrolled"] = round(time.perf_counter() - start, 2)
    return seconds


def decoding(tiny: bool) -> dict:
    """Cached decoding of the seed-shaped model per batch size: ms per forward and tokens/s, against
    a bare forward of the same shapes (compile excluded)."""
    cfg = seed_config(tiny, "objective.name=bd3lm", "objective.block_size=32")
    graphdef = state.model_graphdef(cfg)
    params = jax.jit(lambda: state.init_state(cfg, state.make_optimizer(cfg.optim, 1)[0])["params"])()
    gen_length, prompt_len = (64 if tiny else 256), 16
    settings = SamplingConfig(prompt_tokens=prompt_len, gen_length=gen_length, block_length=32, revise="no")
    mask_id, eos_id = cfg.model.vocab_size - 1, -1  # no EOS: every sequence decodes all positions
    total = -(-(prompt_len + gen_length) // 32) * 32
    results = {}
    for batch in (1, 32) if tiny else (1, 32, 128):
        prompt = np.random.default_rng(0).integers(0, mask_id, (batch, prompt_len)).astype(np.int32)
        bare = bare_forward_seconds(graphdef, params, batch, total, 32)
        row = {"bare_forward_ms": round(bare * 1e3, 3)}
        for name in ("spd_cached", "one_token"):
            samples = decoders.generate(name, graphdef, params, prompt, settings, mask_id, eos_id, jax.random.key(0))
            per_forward = samples.seconds / samples.batch_forwards
            row[name] = {"forwards": int(samples.batch_forwards), "ms_per_forward": round(per_forward * 1e3, 3),
                         "tokens_per_s": round(batch * gen_length / samples.seconds),
                         "per_forward_vs_bare": round(per_forward / bare, 3)}
        results[f"batch_{batch}"] = row
    return {"gen_length": gen_length, "prompt_tokens": prompt_len, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Tiny shapes: the same code paths on CPU in a minute.")
    parser.add_argument("--steps", type=int, default=5, help="Timed train steps per setting.")
    parser.add_argument("--out", help="Also write the JSON here.")
    parser.add_argument("--record", action="store_true",
                        help="Also store the JSON under `device` in benchmarks/latest.json (not with --tiny).")
    args = parser.parse_args()
    if args.record and args.tiny:
        sys.exit("error: --record keeps accelerator figures; a --tiny run is a code-path check")
    device = jax.devices()[0]
    report = {
        "benchmark": "device",
        "chip": device.device_kind,
        "platform": device.platform,
        "devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "tiny": args.tiny,
        "train_step": train_steps(args.tiny, args.steps),
        "init_compile_seconds": init_compile(args.tiny),
        "decoding": decoding(args.tiny),
    }
    with tempfile.TemporaryDirectory() as tmp:
        report["loader"] = loader_rates(token_dataset(tmp, 2_000 if args.tiny else 20_000),
                                        20 if args.tiny else 200, workers=(4,))
    report["beam_imported"] = "apache_beam" in sys.modules  # the accelerator images have no Beam
    emit(report, args.out)
    if args.record:
        latest = json.loads(LATEST.read_text())
        latest["device"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "command": " ".join(["bash benchmarks/device.sh", *sys.argv[1:]]), **report}
        LATEST.write_text(json.dumps(latest, indent=2) + "\n")


if __name__ == "__main__":
    from absl import flags

    from trainer import xla_flags

    xla_flags.apply()  # the trainer's GPU flags, as `python -m trainer` runs with them
    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
    main()
