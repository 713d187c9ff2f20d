#!/usr/bin/env bash
# Re-resolve the locks that launch/setup.sh installs from (needs `uv`: pip install uv).
#   bash launch/lock.sh            # after editing requirements.txt or requirements-test.txt
# requirements.lock: every runtime package, exact versions, Python 3.11 on x86-64 Linux (CPU jax).
# requirements-test.lock: pytest and the PyTorch CPU oracle, constrained to the runtime lock.
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet)
uv pip compile requirements.txt "${common[@]}" -o requirements.lock
# torch's CPU build (2.13.0+cpu) comes from a find-links folder (PIP_FIND_LINKS, as pip reads it) or
# PyTorch's CPU wheel index: the PyPI Linux wheel would drag in the CUDA libraries.
uv pip compile requirements-test.txt -c requirements.lock "${common[@]}" \
  ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} -o requirements-test.lock
echo "wrote requirements.lock ($(grep -c '^[a-z]' requirements.lock) packages)," \
     "requirements-test.lock ($(grep -c '^[a-z]' requirements-test.lock) packages)"
