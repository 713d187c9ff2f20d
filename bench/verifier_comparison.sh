#!/usr/bin/env bash
# The preference-oracle comparison (README, "Self-play with a preference oracle"): the verifier demo
# (configs/demo_verifier.py: SmolLM2-135M-Instruct on generated arithmetic word problems, 3 rounds)
# trained three ways on the same prompts, then one `spjax report` over the three runs:
#   sppo        the demo as shipped: verifier-judged pairs from K = 4 samples, SPPO
#   chi2        the same judged pairs, the paper's bounded chi2 objective (beta 0.5, c 1)
#   spin        SPIN-style: the real answer against one sample per prompt, SPIN's loss
# Every run is scored by the same verifier on the same 32 held-out questions.
#
#   bash bench/verifier_comparison.sh        # OUT=dir to choose where (default runs/verifier_cmp)
set -u
cd "$(dirname "$0")/.."
source bench/runs.sh
OUT=${OUT:-runs/verifier_cmp}
runs=(
  "sppo"
  "chi2 objective.name=chi2 objective.beta=0.5"
  "spin run.pairs=sampled sampling.num_samples=1 objective.name=spin objective.beta=0.1"
)
COMMON=()
REPORT=comparison run_all configs/demo_verifier.py "$OUT" "${runs[@]}"
