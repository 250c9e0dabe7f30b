"""python -m evals --run_dir RUN [--once | --watch] [--latest] [--force] [--config FILE] [key=value ...]"""

import argparse
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals", description=__doc__)
    parser.add_argument("--run_dir", required=True, help="A trainer run directory (local or gs://)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="Evaluate every committed, unevaluated step and exit (default)")
    mode.add_argument("--watch", action="store_true", help="Keep evaluating new steps until the run's final step")
    parser.add_argument("--force", action="store_true",
                        help="Evaluate again, under these settings, steps recorded under other settings (a second "
                             "ledger record per step) instead of refusing")
    parser.add_argument("--latest", action="store_true",
                        help="Only the latest committed step (with --once: a scheduler or a script that wants the newest "
                             "figures, not every checkpoint's)")
    parser.add_argument("--config", help="Optional YAML of eval settings")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. sampling.threshold=0.7")
    args = parser.parse_args(argv)

    from trainer import signals

    return signals.exit_status(lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
    from evals import config, run
    from trainer.errors import UserError

    evaluator = None
    try:
        evaluator = run.Evaluator(args.run_dir, config.load(args.config, args.overrides), force=args.force,
                                  latest=args.latest)
        if args.watch:
            evaluator.watch()
        elif not evaluator.once():
            done = len(evaluator.ledger.steps(evaluator.settings))
            print(f"{args.run_dir}: no committed checkpoint to evaluate yet"
                  if not done else f"{args.run_dir}: every committed checkpoint is evaluated ({done})")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if evaluator is not None:
            evaluator.close()
    report = evaluator.ledger.directory / "report.html"
    if report.exists():
        print(f"report: {report}")
    return 0


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
    sys.exit(main(sys.argv[1:]))
