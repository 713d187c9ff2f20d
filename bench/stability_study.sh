#!/usr/bin/env bash
# The multi-round stability study (README, "Rounds that don't degrade"): SmolLM2-135M-Instruct on
# chatterbot, 5 rounds per run, the same seeds and data, one run per line below; then one
# `spjax report` over all of them (a PNG and a markdown table in $OUT/study.*).
#
#   bash bench/stability_study.sh            # ~56 min on 2 CPU cores; OUT=dir to choose where
#
# Shrunk from the demo to fit a CPU session: 32 training pairs a round in batches of 8 (4 steps a
# round, as the demo's 64 in 16), 32 held-out prompts, answers up to 32 tokens. It compares
# chi2 and spin at equal beta (0.1, SPIN's, and 0.5), with and without SPIN's D_{t-1} mixing at
# beta 0.1, and chi2 at equal bound 1/(beta c) = 2 but beta 0.1 (c = 5) against beta 0.5 (c = 1).
set -u
cd "$(dirname "$0")/.."
source bench/runs.sh
OUT=${OUT:-runs/study}
COMMON=(run.rounds=5 data.max_examples=32 run.batch_size=8 sampling.batch_size=32 run.eval_examples=32
        run.checkpoint_every=1000 run.keep_checkpoints=1)
runs=(
  "chi2_b0.1 objective.name=chi2 objective.beta=0.1"
  "spin_b0.1 objective.name=spin objective.beta=0.1"
  "chi2_b0.5 objective.name=chi2 objective.beta=0.5"
  "spin_b0.5 objective.name=spin objective.beta=0.5"
  "chi2_b0.1_mix objective.name=chi2 objective.beta=0.1 run.mix_previous=true"
  "spin_b0.1_mix objective.name=spin objective.beta=0.1 run.mix_previous=true"
  "chi2_b0.1_c5 objective.name=chi2 objective.beta=0.1 objective.c=5"
)
REPORT=study run_all configs/demo.py "$OUT" "${runs[@]}"
