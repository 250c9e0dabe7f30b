"""python -m trainer --config configs/NAME.yaml [key=value ...]"""

import argparse
import sys

from absl import flags


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("--config", help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value, nested keys with dots (train.steps=100)")
    args = parser.parse_args(argv)

    from trainer import signals  # after argparse: --help stays instant

    return signals.exit_status(lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    from trainer import hf, sharding, train
    from trainer import config as config_lib
    from trainer.errors import UserError

    try:
        cfg = config_lib.load(args.config, args.overrides)
        if cfg.model.init_from:  # the architecture comes from its config.json, before validation
            hf.resolve_model(cfg.model, cfg.model.init_from)
        import jax

        cfg.validate(num_processes=jax.process_count())
        sharding.validate(cfg, jax.device_count())
        return train.run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except train.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def initialize_distributed() -> None:
    """Joins a multi-process run: explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID (e.g. GPU hosts), or JAX's own detection on a Cloud TPU slice. Only here,
    under __main__, so Grain's worker processes never run it."""
    import os

    import jax

    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


if __name__ == "__main__":
    from trainer import xla_flags

    xla_flags.apply()  # before JAX starts its backend
    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags; parse them once here
    initialize_distributed()
    sys.exit(main(sys.argv[1:]))
