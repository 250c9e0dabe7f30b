"""python -m trainer.export --run_dir RUN [--step N] --output DIR [--max_shard_mb MB]

Writes a checkpoint as a Hugging Face directory: `model.safetensors` (or shards with an
index), a Llama/Qwen3 `config.json`, the run's `tokenizer.json`, and its `config.yaml`
(so `python -m evals --run_dir DIR` can evaluate the export as it does a run).
"""

import argparse
import shutil
import sys

from absl import flags


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, help="A trainer run directory")
    parser.add_argument("--step", type=int, help="Checkpoint step (default: the latest committed)")
    parser.add_argument("--output", required=True, help="Directory to write (local or gs://)")
    parser.add_argument("--max_shard_mb", type=int, default=2048, help="Split weights into files of about this size")
    args = parser.parse_args(argv)

    from etils import epath

    from trainer import data, hf, state
    from trainer import config as config_lib
    from trainer.errors import RunError, UserError

    try:
        run = epath.Path(args.run_dir)
        if not (run / "config.yaml").exists():
            raise RunError(f"{args.run_dir} is not a trainer run directory (no config.yaml)")
        cfg = config_lib.load_run(run)
        _, params, step = state.load_params(args.run_dir, args.step, cfg)
        manifest = data.load_manifest(cfg.data.path)
        ids = data.special_ids(manifest)
        extra = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
                 "mask_token_id": ids["mask"],
                 "diffusion_lm": {"objective": cfg.objective.name, "step": step, "run_dir": args.run_dir}}
        files = hf.export(params, cfg.model, args.output, extra, max_shard_bytes=args.max_shard_mb << 20)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = epath.Path(args.output)
    with (epath.Path(cfg.data.path) / manifest["tokenizer"]["file"]).open("rb") as src, \
            (out / "tokenizer.json").open("wb") as dst:
        shutil.copyfileobj(src, dst)
    (out / "config.yaml").write_text(config_lib.dump(cfg))
    print(f"exported step {step} of {args.run_dir} to {args.output}: {', '.join(files)}, config.json, tokenizer.json")
    return 0


if __name__ == "__main__":
    flags.FLAGS(sys.argv[:1])
    sys.exit(main(sys.argv[1:]))
