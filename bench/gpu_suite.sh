#!/usr/bin/env bash
# Every GPU figure of docs/perf.md from one run on one card (about 8 minutes on an H200,
# starting from a bare machine):
#   1. bench/gpu_check.py: cuDNN attention and the unrolled, chunked decode agree with the CPU-tested paths
#      (if not, the timings below use the XLA einsum attention: --attention xla, attention=xla);
#   2. bench/train_step.py  --shape llama3.2-1b: the pair step against the PyTorch peer, eager and compiled;
#   3. bench/sampler.py     --shape llama3.2-1b: batch 64, 256 + 256 tokens, against HF generate(),
#      eager and static-cache compiled, with the roofline fraction; the decode loop checking for
#      early exit every 8 steps (the GPU default) and every step, then a profile of one call
#      (under $TRACE_DIR, summarized in the log: how busy the card's streams were, the costliest kernels);
#   4. configs/bench_1b_round.py: two self-play rounds of the 1B shape, their sampling/scoring/training split.
# Each stage has a time limit and its log goes to $OUT/<stage>.log (default ./bench_out).
#
#   SPJAX_PEERS=/path/to/peers bash bench/gpu_suite.sh      # the folder holding torch_pair_bench.py
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

stage() {  # stage NAME SECONDS CMD...: run CMD under a time limit, log to $OUT/NAME.log, return its status
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL_LINES:-14}" "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start))s"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
ATTENTION=auto  # the model config's attention field for the stages that train
stage gpu_check "${CHECK_S:-120}" "$PY" bench/gpu_check.py || ATTENTION=xla
stage train_step "${TRAIN_S:-220}" "$PY" bench/train_step.py --shape llama3.2-1b --peer-timeout 150 \
  --attention "$ATTENTION"
TAIL_LINES=40 stage sampler "${SAMPLE_S:-300}" "$PY" bench/sampler.py --shape llama3.2-1b --peers eager,compile \
  --peer-timeout 150 --chunks 0,1 --trace "${TRACE_DIR:-/tmp/spjax_sampler_trace}"
ROUND_DIR=${ROUND_DIR:-/tmp/spjax_round_1b}
TAIL_LINES=0 stage round_1b "${ROUND_S:-200}" "$PY" -m spjax.train --config configs/bench_1b_round.py \
  --workdir "$ROUND_DIR" attention="$ATTENTION"
tr '\r' '\n' < "$OUT/round_1b.log" | grep -aE "^(initial|round [0-9]) |sample_s|error" | tail -n 8
cp "$ROUND_DIR/metrics.jsonl" "$OUT/round_1b_metrics.jsonl" 2>/dev/null || true
grep -h "^{" "$OUT"/*.log > "$OUT/summary.jsonl" 2>/dev/null || true
