#!/usr/bin/env bash
# Set up spjax in ./.venv on a fresh machine: runtime, offline assets, and (with --test) test needs.
#   bash launch/setup.sh          # to run spjax (e.g. the demo)
#   bash launch/setup.sh --test   # also pytest and the PyTorch oracle (torch==2.13.0, CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${pip[@]}" -r requirements.txt
"${pip[@]}" --no-deps -r requirements-assets.txt
if [ "${1:-}" = "--test" ]; then "${pip[@]}" -r requirements-test.txt; fi
"${pip[@]}" --no-deps --no-build-isolation -e . 2>/dev/null || "${pip[@]}" --no-deps -e .
echo "spjax set up in .venv ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
