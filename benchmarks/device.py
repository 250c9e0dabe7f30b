"""The accelerator check: the seed-shaped model's train step against the chip's spec-sheet peak,
the Grain loader with 4 workers, and cached SPD decoding at batch 1 and 32, as one JSON.

    bash benchmarks/device.sh --record         # on a GPU/TPU host, a few minutes; kept in latest.json
    python benchmarks/device.py --tiny         # the same code paths on CPU, tiny shapes (CI)

Train step: `configs/tinystories_seed.yaml` (hidden 1280 x 16 layers, bf16, remat, scanned
layers) on a synthetic batch at seq 512 and 2048 (--tiny: one short length), with every
attention kernel this platform has (xla everywhere, cudnn on NVIDIA GPUs); MFU = model FLOP/s over the spec-sheet bf16 peak of one
chip (measured matmul FLOP/s where no spec is known). Decoding: a freshly initialised model of
the same shape (block diffusion, block 32) decodes 256 tokens after 16-token prompts with
`spd_cached` (no revision); an untrained model commits about one token per forward, so tokens/s
measures the cost of the decoder's forwards, not a trained model's acceptance rate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import jax
import numpy as np
from _common import emit
from train_step import loader_rates, step_flops

from evals import sampling
from evals.config import SamplingConfig
from trainer import config as config_lib
from trainer import observe, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEED_CONFIG = ROOT / "configs" / "tinystories_seed.yaml"
LATEST = ROOT / "benchmarks" / "latest.json"
TINY = ["model.hidden=64", "model.layers=2", "model.heads=2", "model.mlp_hidden=128", "model.vocab_size=512"]


def seed_config(tiny: bool, *overrides: str) -> config_lib.Config:
    return config_lib.load(str(SEED_CONFIG), ["run_dir=unused", "data.path=unused", "model.scan_layers=true",
                                              *(TINY if tiny else []), *overrides])


def kernels() -> list[str]:
    return ["xla", "cudnn"] if jax.default_backend() == "gpu" else ["xla"]


def train_steps(tiny: bool, steps: int) -> dict:
    """Step time, tokens/s and MFU per (attention kernel, sequence length); a kernel that fails is
    recorded with its error, the others still run."""
    peak, source = observe.device_peak_flops("bfloat16")
    shapes = {64: 4} if tiny else {512: 32, 2048: 8}  # seq_len: global batch
    results = {}
    for kernel in kernels():
        for seq, batch in shapes.items():
            cfg = seed_config(tiny, f"model.attention={kernel}", f"model.max_seq_len={seq}", f"data.seq_len={seq}",
                              f"train.global_batch={batch}")
            try:
                result = step_flops(cfg, steps)
            except Exception as e:  # noqa: BLE001 - a kernel this chip rejects is a result, not a crash
                results[f"{kernel}_seq{seq}"] = {"error": str(e).splitlines()[0][:300]}
                continue
            result["mfu"] = round(result["model_flops_per_s"] / peak, 4)
            result["model_flops_per_s"] = round(result["model_flops_per_s"])
            results[f"{kernel}_seq{seq}"] = result
    return {"peak_flops_per_s": round(peak), "peak_source": source, "configs": results}


def decoding(tiny: bool) -> dict:
    """spd_cached tokens/s of the seed-shaped model at batch 1 and 32 (compile excluded)."""
    cfg = seed_config(tiny, "objective.name=bd3lm", "objective.block_size=32")
    graphdef = train.model_graphdef(cfg)
    params = jax.jit(lambda: train.init_state(cfg, train.make_optimizer(cfg.optim, 1)[0])["params"])()
    gen_length = 64 if tiny else 256
    settings = SamplingConfig(prompt_tokens=16, gen_length=gen_length, block_length=32, revise="no")
    mask_id, eos_id = cfg.model.vocab_size - 1, cfg.model.vocab_size - 2
    results = {}
    for batch in (1, 32):
        prompt = np.random.default_rng(0).integers(0, eos_id, (batch, 16)).astype(np.int32)
        samples = sampling.generate("spd_cached", graphdef, params, prompt, settings, mask_id, eos_id,
                                    jax.random.key(0))  # timed after a compiling run
        results[f"batch_{batch}"] = {"seconds": round(samples.seconds, 3),
                                     "tokens_per_s": round(batch * gen_length / samples.seconds),
                                     "forwards": int(samples.batch_forwards)}
    return {"gen_length": gen_length, **results}


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
        "tiny": args.tiny,
        "train_step": train_steps(args.tiny, args.steps),
        "loader": loader_rates(20 if args.tiny else 200, workers=(4,), stories=2_000 if args.tiny else 20_000),
        "decoding_spd_cached": decoding(args.tiny),
    }
    emit(report, args.out)
    if args.record:
        latest = json.loads(LATEST.read_text())
        latest["device"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "command": " ".join(["bash benchmarks/device.sh", *sys.argv[1:]]), **report}
        LATEST.write_text(json.dumps(latest, indent=2) + "\n")


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
    main()
