"""python -m trainer --config configs/NAME.yaml [key=value ...]"""

import argparse
import sys

from absl import flags


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("--config", help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value, nested keys with dots (train.steps=100)")
    args = parser.parse_args(argv)

    from trainer import config as config_lib, data, train  # after argparse: --help stays instant

    try:
        cfg = config_lib.load(args.config, args.overrides)
        import jax

        cfg.validate(num_devices=jax.device_count())
        return train.run(cfg)
    except (config_lib.ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except train.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags; parse them once here
    sys.exit(main(sys.argv[1:]))
