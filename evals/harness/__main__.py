"""python -m evals.harness [lm_eval CLI arguments]: lm-evaluation-harness's own CLI with the model
`diffusion-lm-jax` registered and, unless --include_path names another folder, the shipped tasks
(evals/harness/tasks) on the task path, e.g.

    python -m evals.harness --model diffusion-lm-jax --model_args run_dir=RUN,samples=8 \
        --tasks tinystories_cloze,tinystories_continuation --limit 100 --output_path out
"""

import sys


def main() -> int:
    import lm_eval.models  # noqa: F401  (first: lm_eval's own models stay nameable beside ours)
    from lm_eval.__main__ import cli_evaluate

    from evals.harness import suite  # its model module registers diffusion-lm-jax
    from trainer.errors import UserError

    if "--include_path" not in sys.argv and not {"-h", "--help"} & set(sys.argv):
        sys.argv += ["--include_path", str(suite.TASKS)]
    try:
        _check_limit(sys.argv)
        cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # lm_eval's word for a task it cannot find
        if not str(e).startswith("Tasks not found"):
            raise
        print(f"error: {str(e).splitlines()[0]}: the shipped tasks are {', '.join(suite.SHIPPED)}; "
              f"`python -m evals.harness ls tasks` lists every task lm_eval can load", file=sys.stderr)
        return 2
    return 0


def _check_limit(argv: list[str]) -> None:
    """lm_eval takes --limit 0 and then fails on a task with no documents: refused here."""
    from trainer.errors import ConfigError

    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--limit=") else argv[i + 1] if arg == "--limit" and \
            i + 1 < len(argv) else None
        try:
            positive = value is None or float(value) > 0
        except ValueError:
            positive = False
        if not positive:
            raise ConfigError(f"--limit {value}: must be positive (a count, or a fraction of each task below 1); "
                              f"leave it out to score every document")


if __name__ == "__main__":
    sys.exit(main())
