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
        cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
