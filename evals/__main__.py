"""python -m evals --run_dir RUN [--once | --watch] [--config FILE] [key=value ...]"""

import argparse
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals", description=__doc__)
    parser.add_argument("--run_dir", required=True, help="A trainer run directory (local or gs://)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="Evaluate every committed, unevaluated step and exit (default)")
    mode.add_argument("--watch", action="store_true", help="Keep evaluating new steps until the run's final step")
    parser.add_argument("--config", help="Optional YAML of eval settings")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. sampling.threshold=0.7")
    args = parser.parse_args(argv)

    from evals import config, run
    from trainer.errors import UserError

    try:
        evaluator = run.Evaluator(args.run_dir, config.load(args.config, args.overrides))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.watch:
            evaluator.watch()
        elif not evaluator.once():
            done = len(evaluator.ledger.steps())
            print(f"{args.run_dir}: no committed checkpoint to evaluate yet"
                  if not done else f"{args.run_dir}: every committed checkpoint is evaluated ({done})")
    except KeyboardInterrupt:
        print("stopped")
    finally:
        evaluator.close()
    report = evaluator.ledger.directory / "report.html"
    if report.exists():
        print(f"report: {report}")
    return 0


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
    sys.exit(main(sys.argv[1:]))
