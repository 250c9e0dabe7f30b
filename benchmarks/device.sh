#!/usr/bin/env bash
# The accelerator check, one prepared script: installs nothing, needs no network and no Beam, prints
# one JSON. Runs with .venv/bin/python when the checkout has one, else python3 (a bare accelerator
# image: the project on PYTHONPATH and the wheels ../shared/tools/device-bundle.sh fetches).
# On CPU: bash benchmarks/device.sh --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
exec "$PYTHON" benchmarks/device.py "$@"
