"""python -m evals.generate --run_dir RUN_OR_EXPORT [--prompt TEXT ...] [--sampler NAME] [--step N]
[--trace] [--infill] [key=value ...]

Asks a run (or a trainer.export directory) for text: each prompt (several --prompt, else one per
line of stdin) is continued by the run's quality-reference decoder (the one `python -m evals`
compares others with: causal for AR, one-token for block diffusion, remask for MDLM, dream for
Dream) or by --sampler, with sampling.* settings as key=value (gen_length=64 temperature=0.8).
Prints each text, its tokens per forward (generated tokens up to EOS / the forwards it needed) and
the decoding time (after a warm-up run: compilation excluded).

--trace shows the generation after every forward (undecoded positions as _), in the order
positions were first decoded. --infill (full-attention models: MDLM, Dream) fills the prompt's
mask spans instead of continuing it: write the tokenizer's mask token where a token is missing,
or MASK_TOKEN*N for N of them.
"""

from __future__ import annotations

import argparse
import re
import sys

STDIN_HELP = "one prompt per line of stdin when no --prompt is given"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, help="A trainer run directory or a trainer.export directory")
    parser.add_argument("--prompt", action="append", default=[], help=f"Text to continue (repeatable; {STDIN_HELP})")
    parser.add_argument("--sampler", default="", help="A decoder name or name@threshold (default: the run's reference)")
    parser.add_argument("--step", type=int, default=0, help="Checkpoint step (default: the latest committed)")
    parser.add_argument("--trace", action="store_true", help="Show the text after every forward")
    parser.add_argument("--infill", action="store_true", help="Fill the prompt's mask spans (full-attention models)")
    parser.add_argument("--data_path", default="", help="Another preprocess output with the run's tokenizer")
    parser.add_argument("overrides", nargs="*", help="sampling settings as key=value, e.g. gen_length=64")
    args = parser.parse_args(argv)

    from trainer import signals

    return signals.exit_status(lambda: _generate(args))


def _generate(args: argparse.Namespace) -> int:
    from trainer.errors import UserError

    try:
        prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not prompts:
            raise UserError(f"no prompt: give --prompt TEXT ({STDIN_HELP})")
        for text in (infill if args.infill else continue_prompts)(args, prompts):
            print(text)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _setup(args: argparse.Namespace):
    """(the opened run, its weights, the sampling settings from the overrides)."""
    from evals import runs
    from evals.config import EvalConfig
    from trainer.config import load_into

    cfg = load_into(EvalConfig(), None, [f"sampling.{o}" for o in args.overrides])
    cfg.validate()
    run = runs.open_run(args.run_dir, args.data_path)
    return run, run.weights(args.step), cfg.sampling


def continue_prompts(args: argparse.Namespace, prompts: list[str]):
    """Yields, per prompt: its continuation and one line of cost."""
    import dataclasses

    import jax
    import numpy as np

    from evals import decoders
    from evals.decoders import common
    from trainer.errors import ConfigError

    run, weights, sampling = _setup(args)
    spec = decoders.resolve(args.sampler, run.cfg.objective.name, sampling)
    encoded = [_encode(run, text) for text in prompts]
    longest = max(len(ids) for ids in encoded)
    if longest + sampling.gen_length > run.cfg.data.seq_len:
        raise ConfigError(f"a prompt of {longest} tokens and gen_length={sampling.gen_length} exceed the "
                          f"{run.cfg.data.seq_len} positions the model was trained on (data.seq_len): shorten the "
                          f"prompt or lower gen_length")
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    results: dict[int, str] = {}
    for length, members in by_length.items():  # one program per prompt length
        (name,), cfg = decoders.plan(spec, dataclasses.replace(sampling, prompt_tokens=length), run.cfg)
        batch = np.asarray([encoded[i] for i in members], np.int32)
        samples = decoders.generate(name, weights.graphdef, weights.params, batch, cfg, run.ids["mask"], run.ids["eos"],
                                    jax.random.key(cfg.seed))
        generated = common.generated_lengths(samples, length, run.ids["eos"])
        for row, i in enumerate(members):
            lines = [prompts[i] + _text(run, samples.tokens[row, length:length + generated[row]])]
            if args.trace:
                lines += _trace(run, samples.tokens[row], samples.decoded_at[row], length + generated[row])
            lines.append(f"  [{name}: {generated[row]} tokens in {samples.forwards[row]} forwards, "
                         f"{generated[row] / max(samples.forwards[row], 1):.2f} tokens/forward, "
                         f"{samples.seconds:.2f} s for the batch of {len(members)}]")
            results[i] = "\n".join(lines)
    yield from (results[i] for i in range(len(prompts)))


def infill(args: argparse.Namespace, prompts: list[str]):
    """Yields, per prompt: the text with its mask spans filled, and one line of cost."""
    import dataclasses

    import jax
    import numpy as np

    from evals import decoders
    from evals.decoders import common
    from trainer.errors import ConfigError

    run, weights, sampling = _setup(args)
    spec = decoders.resolve(args.sampler, run.cfg.objective.name, sampling)
    decoder = decoders.get(spec)
    if decoder.infill is None or not decoders.is_matched(spec, run.cfg.objective.name):
        able = [n for n in decoders.fitting(run.cfg.objective.name) if decoders.get(n).infill is not None]
        raise ConfigError(f"--infill needs a full-attention decoder that fits objective {run.cfg.objective.name}: "
                          + (f"use --sampler {' or '.join(able)}" if able else
                             "this model attends causally or block by block, so it cannot see a gap's right side"))
    name, threshold = decoders.parse(spec)
    if threshold is not None:
        sampling = dataclasses.replace(sampling, threshold=threshold)
    for text in prompts:
        canvas = np.asarray([_encode(run, text, infill=True)], np.int32)
        holes = int((canvas == run.ids["mask"]).sum())
        if not holes:
            raise ConfigError(f"--infill: the prompt {text[:40]!r} has no mask span (write "
                              f"{run.tokenizer.id_to_token(run.ids['mask'])}*N where N tokens are missing)")
        if canvas.shape[1] > run.cfg.data.seq_len:
            raise ConfigError(f"--infill: the prompt is {canvas.shape[1]} tokens, longer than the "
                              f"{run.cfg.data.seq_len} the model was trained on (data.seq_len)")
        cfg = dataclasses.replace(sampling, remask_steps=sampling.remask_steps or holes)
        build = decoder.infill(weights.graphdef, canvas.shape, cfg, run.ids["mask"], run.ids["eos"])
        samples = common.run(build, weights.params, canvas, jax.random.key(cfg.seed),
                             dataclasses.replace(cfg, gen_length=0))
        lines = [_text(run, samples.tokens[0])]
        if args.trace:
            lines += _trace(run, samples.tokens[0], samples.decoded_at[0], canvas.shape[1])
        lines.append(f"  [{name}: {holes} tokens in {samples.forwards[0]} forwards, "
                     f"{holes / max(samples.forwards[0], 1):.2f} tokens/forward, {samples.seconds:.2f} s]")
        yield "\n".join(lines)


def _encode(run, text: str, infill: bool = False) -> list[int]:
    """BOS (documents start with it) and the text's ids; with `infill`, MASK*N spans as N mask ids."""
    start = [] if run.ids["bos"] is None else [run.ids["bos"]]
    if not infill:
        return start + run.tokenizer.encode(text, add_special_tokens=False).ids
    mask = run.tokenizer.id_to_token(run.ids["mask"])
    ids = start
    for piece in re.split(f"({re.escape(mask)}(?:\\*\\d+)?)", text):
        if piece.startswith(mask):
            ids = ids + [run.ids["mask"]] * int(piece[len(mask) + 1:] or 1)
        elif piece:
            ids = ids + run.tokenizer.encode(piece, add_special_tokens=False).ids
    return ids


def _text(run, ids) -> str:
    """Token ids as text, BOS dropped, other special tokens written out (a leftover mask shows)."""
    ids = [int(i) for i in ids if int(i) != run.ids["bos"]]
    return run.tokenizer.decode(ids, skip_special_tokens=False)


def _trace(run, tokens_T, decoded_at_T, end: int) -> list[str]:
    """The text (up to position `end`) after each forward k: positions decoded later than k as _."""
    lines = []
    for k in range(1, int(decoded_at_T[:end].max()) + 1):
        pieces = [_text(run, [t]) if d <= k else "_" for t, d in zip(tokens_T[:end], decoded_at_T[:end])]
        lines.append(f"  {k:3d} | {''.join(pieces)}")
    return lines


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS(sys.argv[:1])
    sys.exit(main(sys.argv[1:]))
