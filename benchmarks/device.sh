#!/usr/bin/env bash
# The accelerator check, one prepared script: installs nothing (run it from a checkout whose .venv
# has the project and a jax built for the chip, e.g. `pip install -e . "jax[cuda12]"` beforehand),
# needs no network, prints one JSON. On CPU: bash benchmarks/device.sh --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
exec "$PYTHON" benchmarks/device.py "$@"
