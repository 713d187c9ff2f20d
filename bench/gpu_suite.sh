#!/usr/bin/env bash
# Every GPU figure of docs/perf.md from one card, most wanted first, inside one device call:
#   check    bench/gpu_check.py: cuDNN attention and the unrolled, chunked decode (a KV buffer per layer)
#            agree with the CPU-tested paths (if not, the stages that train use the XLA einsum attention:
#            attention=xla);
#   sampler  bench/sampler.py --shape llama3.2-1b: batch 64, 256 + 256 tokens, against HF generate(), eager
#            and static-cache compiled, with the roofline fraction; variants (the Triton decode-attention
#            kernel or the einsums, DECODE_KERNEL; crossed with SAMPLER_VARIANTS, e.g. "--layer-caches
#            on,off --segments 0,1"), then a profile of
#            one call (under $TRACE_DIR, summarized in the log: how busy the card's streams were, the
#            costliest kernels);
#   samples  bench/sampler.py --batch 256 --samples 4: 64 prompts x 4 samples (one prefill a prompt) against
#            256 distinct prompts x 1, prefill and whole call;
#   tune     the decode-attention kernel's settings (DECODE_TUNES, default "splits=2 splits=4 block=128": values
#            of SPJAX_DECODE_KERNEL, spjax/decode_attention.py), one sampler process each, kernel on; not in
#            the default list: compare each with the sampler stage's figure of the same call;
#   draw     bench/draw.py: the sampler's two-stage categorical draw against one Gumbel number per
#            vocabulary entry, 64 rows x 49k and 128k vocabularies;
#   graphs   the same sampler under XLA command buffers for the whole decode loop (WHILE and CONDITIONAL
#            recorded into CUDA graphs: the loop's condition then runs on the card, with no host sync and
#            no launch per kernel); compared with `sampler`: speed, and the same samples (crc32 of the
#            tokens) from the same key. Not in the default list: 0.99-1.00x on an H200 (2026-12-04), whose
#            stream was already 97% busy;
#   train    bench/train_step.py --shape llama3.2-1b: the pair step against the PyTorch peer, eager and
#            compiled, with MFU against a matmul peak measured in the same run, then a profile of one step;
#   compile  spjax.compile_check --topology local of configs/lora_zephyr7b_1gpu.py (bf16 and int8 bases):
#            the 7B single-GPU run's memory as the GPU compiler sees it (a CPU stand-in over-counts, see
#            docs/lora.md);
#   round    configs/bench_1b_round.py: two self-play rounds of the 1B shape, their sampling/scoring/training
#            (its data comes through tensorflow-datasets: carry its wheels where the machine lacks them).
# Each stage has a time limit, cut to what is left of SUITE_S (default 570 s: one device call is at most
# 600 s); a stage that would get under 60 s is skipped. STAGES picks and orders them (default: all but
# graphs, as above), e.g. two calls: STAGES="check sampler samples draw", then STAGES="train round" (ATTENTION=xla if
# the check failed). Logs go to $OUT/<stage>.log (default ./bench_out), their JSON lines to summary.jsonl.
#
#   SPJAX_PEERS=/path/to/peers bash bench/gpu_suite.sh      # the folder holding torch_pair_bench.py
# A device machine gets the checkout only: copy the peer into a git-ignored folder of it, name that
# folder in the run's carry, and point SPJAX_PEERS there.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
DEADLINE=$((SECONDS + ${SUITE_S:-570}))
# Command buffers as XLA's defaults, plus the loop and branch commands (enum names as in xla.proto).
GRAPH_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,\
WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"

stage() {  # stage NAME SECONDS CMD...: run CMD under a time limit, log to $OUT/NAME.log, return its status
  local name=$1 limit=$2 start=$SECONDS rc left=$((DEADLINE - SECONDS))
  shift 2
  if [ "$left" -lt 60 ]; then echo "== $name: skipped, ${left}s left of SUITE_S"; return 125; fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit}s): $*"
  OUT= timeout "$limit" "$@" > "$OUT/$name.log" 2>&1  # OUT= : the benches print their JSON, write no file
  rc=$?
  tail -n "${TAIL_LINES:-14}" "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start))s"
  return $rc
}

SHAPE=${SHAPE:-llama3.2-1b}  # SHAPE=tiny STAGES="sampler graphs" smoke-tests the suite on a CPU
# The sampler's variants (default: the Triton decode-attention kernel or the einsums; DECODE_KERNEL=off where
# the check found the kernel wrong or failing on this card)
DECODE_KERNEL=${DECODE_KERNEL:-on,off}
sampler_args() { SAMPLER=(bench/sampler.py --shape "$SHAPE" ${SAMPLER_VARIANTS:-} --decode-kernel "$DECODE_KERNEL"); }
sampler_args
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
BACKEND=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null)
if [ "$BACKEND" != gpu ] && [ "$SHAPE" != tiny ]; then
  echo "gpu_suite: JAX sees no GPU here (backend '${BACKEND:-none}'): the $SHAPE stages need one; SHAPE=tiny smoke-tests on a CPU" >&2
  exit 3
fi
FAILED=()
ATTENTION=${ATTENTION:-auto}  # the model config's attention field for the stages that train
for s in ${STAGES:-check sampler samples draw train compile round}; do
  case $s in
    check) stage gpu_check "${CHECK_S:-120}" "$PY" bench/gpu_check.py || { ATTENTION=xla; FAILED+=(check); }
      if grep -q '^\[FAIL\] decode kernel' "$OUT/gpu_check.log"; then DECODE_KERNEL=off; sampler_args; fi ;;
    sampler) TAIL_LINES=40 stage sampler "${SAMPLE_S:-300}" "$PY" "${SAMPLER[@]}" --peers eager,compile \
      --peer-timeout 150 --peer-repeats "${PEER_REPEATS:-1}" --trace "${TRACE_DIR:-/tmp/spjax_sampler_trace}" \
      || FAILED+=(sampler) ;;
    samples) TAIL_LINES=4 stage samples "${SAMPLES_S:-120}" "$PY" bench/sampler.py --shape "$SHAPE" \
      --batch "${SAMPLES_BATCH:-256}" --samples 4 --peers none --decode-kernel "${DECODE_KERNEL%%,*}" \
      || FAILED+=(samples) ;;
    draw) TAIL_LINES=3 stage draw "${DRAW_S:-60}" "$PY" bench/draw.py || FAILED+=(draw) ;;
    tune) for t in ${DECODE_TUNES:-splits=2 splits=4 block=128}; do  # one process per kernel setting
        SPJAX_DECODE_KERNEL=$t TAIL_LINES=5 stage "tune_${t//[=,]/_}" "${TUNE_S:-60}" "$PY" bench/sampler.py \
          --shape "$SHAPE" --peers none --decode-kernel on || FAILED+=("tune $t"); done ;;
    graphs)  # XLA aborts on a command type it does not know: fall back to a shorter list if one is new
      graph_ok() { XLA_FLAGS="${XLA_FLAGS:-} $GRAPH_FLAGS" "$PY" -c "import jax; jax.jit(lambda x: x + 1)(1)" \
        > /dev/null 2>&1; }
      graph_ok || { GRAPH_FLAGS=${GRAPH_FLAGS/DYNAMIC_SLICE_FUSION,/}; graph_ok; } || echo "== graphs: this XLA \
rejects $GRAPH_FLAGS"
      XLA_FLAGS="${XLA_FLAGS:-} $GRAPH_FLAGS" TAIL_LINES=12 stage graphs "${GRAPHS_S:-150}" "$PY" \
      "${SAMPLER[@]}" --peers none || FAILED+=(graphs)
      "$PY" - "$OUT/sampler.log" "$OUT/graphs.log" <<'PY' || true
import json, sys
def variants(path):  # the sampler bench's JSON line: {variant: its figures}
    rows = [json.loads(l) for l in open(path) if l.startswith('{"bench": "sampler"')]
    return rows[-1]["variants"] if rows else {}
plain, graphs = map(variants, sys.argv[1:])
for name, g in graphs.items():
    p = plain.get(name)
    if p:
        same = "same samples" if p["tokens_crc32"] == g["tokens_crc32"] else "DIFFERENT samples"
        print(f"command buffers, {name}: {g['new_tokens_per_s']:.0f} vs {p['new_tokens_per_s']:.0f} new tok/s "
              f"({g['new_tokens_per_s'] / p['new_tokens_per_s']:.2f}x), {same}")
PY
      ;;
    train) TAIL_LINES=36 stage train_step "${TRAIN_S:-240}" "$PY" bench/train_step.py --shape "$SHAPE" \
      --peer-timeout 150 --attention "$ATTENTION" --trace "${STEP_TRACE_DIR:-/tmp/spjax_step_trace}" || FAILED+=(train) ;;
    compile) TAIL_LINES=14 stage compile_7b "${COMPILE_S:-150}" bash -c "for c in '' :int8; do \
      $PY -m spjax.compile_check --config configs/lora_zephyr7b_1gpu.py\$c --topology local || exit; done" \
      || FAILED+=(compile) ;;
    round) ROUND_DIR=${ROUND_DIR:-$(mktemp -d /tmp/spjax_round_1b.XXXXXX)}  # fresh: a workdir holding a run is refused
      TAIL_LINES=0 stage round_1b "${ROUND_S:-200}" "$PY" -m spjax.train --config configs/bench_1b_round.py \
        --workdir "$ROUND_DIR" attention="$ATTENTION" || FAILED+=(round)
      tr '\r' '\n' < "$OUT/round_1b.log" | grep -aE "^(initial|round [0-9]) |sample_s|error" | tail -n 8
      cp "$ROUND_DIR/metrics.jsonl" "$OUT/round_1b_metrics.jsonl" 2>/dev/null || true ;;
    *) echo "unknown stage '$s' in STAGES (check, sampler, samples, tune, draw, graphs, train, compile, round)"; exit 2 ;;
  esac
done
grep -h "^{" "$OUT"/*.log > "$OUT/summary.jsonl" 2>/dev/null || true
if [ ${#FAILED[@]} -gt 0 ]; then echo "== failed or skipped: ${FAILED[*]} (logs in $OUT)"; exit 1; fi
