"""python -m trainer.export --run_dir RUN [--step N] --output DIR [--max_shard_mb MB] [--overwrite]

Writes a checkpoint as a Hugging Face directory: `model.safetensors` (or shards with an
index), a Llama/Qwen3 `config.json`, the run's `tokenizer.json`, and its `config.yaml`
(so `python -m evals --run_dir DIR` can evaluate the export as it does a run). The folder is written
beside DIR and swapped in whole; a DIR holding an export is replaced only with --overwrite.
"""

import argparse
import sys

from absl import flags


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, help="A trainer run directory")
    parser.add_argument("--step", type=int, help="Checkpoint step (default: the latest committed)")
    parser.add_argument("--output", required=True, help="Directory to write (local or gs://)")
    parser.add_argument("--max_shard_mb", type=int, default=2048, help="Split weights into files of about this size")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace an export already in --output (whole: none of its files stay)")
    args = parser.parse_args(argv)

    from trainer import signals

    return signals.exit_status(lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    from etils import epath

    from trainer import data, hf, objectives, state
    from trainer import config as config_lib
    from trainer.errors import RunError, UserError
    from trainer.files import replace_dir, staging_for, write_whole

    try:
        run = epath.Path(args.run_dir)
        if not (run / "config.yaml").exists():
            raise RunError(f"{args.run_dir} is not a trainer run directory (no config.yaml)")
        cfg = config_lib.load_run(run)
        if objectives.get(cfg.objective.name).edit_heads:
            raise RunError(f"{args.run_dir} is an Edit Flows run: its rate and insertion heads have no place in a "
                           f"Llama/Qwen3 checkpoint; evaluate and decode it from its run directory")
        out = epath.Path(args.output)
        check_output(out, args.overwrite)
        _, params, step = state.load_params(args.run_dir, args.step, cfg)
        manifest = data.load_manifest(cfg.data.path)
        ids = data.special_ids(manifest)
        extra = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
                 "mask_token_id": ids["mask"],
                 "diffusion_lm": {"objective": cfg.objective.name, "step": step, "run_dir": args.run_dir,
                                  "block_size": objectives.get(cfg.objective.name).block_size(cfg.objective),
                                  # position i's token is read from position i-1's logits (Dream)
                                  "shifted_logits": objectives.get(cfg.objective.name).shift}}
        staged = staging_for(out)  # written beside the output, then swapped in whole
        try:
            files = hf.export(params, cfg.model, str(staged), extra, max_shard_bytes=args.max_shard_mb << 20)
            write_whole(staged / "tokenizer.json",
                        (epath.Path(cfg.data.path) / manifest["tokenizer"]["file"]).read_bytes())
            write_whole(staged / "config.yaml", config_lib.dump(cfg))
            replace_dir(staged, out, last="config.json")
        finally:
            if staged.exists():
                staged.rmtree()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {args.run_dir} to {args.output}: {', '.join(files)}, config.json, tokenizer.json")
    return 0


def check_output(out, overwrite: bool) -> None:
    """An --output that holds files is replaced only when it is an export and --overwrite says so."""
    from trainer.errors import RunError

    if out.exists() and not out.is_dir():
        raise RunError(f"--output {out} is a file: choose a folder")
    held = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if not held:
        return
    if not (out / "config.json").exists():
        raise RunError(f"--output {out} holds files that are not an export ({', '.join(held[:3])}, ...): "
                       f"choose an empty or new folder")
    if not overwrite:
        raise RunError(f"--output {out} already holds an export: pass --overwrite to replace it whole, or choose "
                       f"another folder")


if __name__ == "__main__":
    flags.FLAGS(sys.argv[:1])
    sys.exit(main(sys.argv[1:]))
