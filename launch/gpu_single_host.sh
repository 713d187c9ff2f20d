#!/usr/bin/env bash
# Train on one GPU host: every local GPU joins the mesh (one process; no distributed start-up needed).
#
#   bash launch/gpu_single_host.sh --cuda --config configs/spin_zephyr7b_8xh100.py --workdir runs/spin7b
#   bash launch/gpu_single_host.sh --config configs/single_gpu_qwen2_0.5b.py --workdir runs/qwen -- run.rounds=2
#
# requirements.txt installs jax for CPU only: a GPU host needs jax's CUDA wheels once (--cuda, or
# --cuda12 for CUDA 12 drivers), at requirements.lock's jax version. --dry-run prints the commands.
# Environment: XLA_PYTHON_CLIENT_MEM_FRACTION (XLA's share of each GPU's memory, default .95); XLA_FLAGS
# (more XLA flags, appended to the script's own). Inside a SLURM allocation it still runs one process.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: bash launch/gpu_single_host.sh --config FILE [--workdir DIR] [--cuda | --cuda12] [--skip-setup]
                                      [--resume] [--gpus 0,1,...] [--log FILE] [--dry-run] [-- key=value ...]
  --config      a Python config (file.py[:arg])        --workdir   default: runs/<config name>
  --cuda        install jax[cuda13] (NVIDIA driver >= 580) --cuda12  install jax[cuda12] instead
  --skip-setup  do not run launch/setup.sh first       --resume    continue the run in --workdir
  --gpus        CUDA_VISIBLE_DEVICES (default: all)    --log       default: logs/<config name>.log
  --dry-run     print every command, run none          -- ...      config overrides for spjax.train
EOF
  exit 2
}

CONFIG="" WORKDIR="" CUDA="" GPUS="" LOG="" DRY=0 SETUP=1 RESUME=0
OVERRIDES=()
need() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "gpu_single_host.sh: $1 needs a value" >&2; usage; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --config) need "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need "$@"; WORKDIR=$2; shift 2 ;;
    --gpus) need "$@"; GPUS=$2; shift 2 ;;
    --log) need "$@"; LOG=$2; shift 2 ;;
    --cuda) CUDA=cuda13; shift ;;
    --cuda12) CUDA=cuda12; shift ;;
    --skip-setup) SETUP=0; shift ;;
    --resume) RESUME=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) echo "gpu_single_host.sh: unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$CONFIG" ] || { echo "gpu_single_host.sh: missing --config" >&2; usage; }

cd "$(dirname "$0")/.."
name=$(basename "${CONFIG%%:*}" .py)
WORKDIR=${WORKDIR:-runs/$name}
LOG=${LOG:-logs/$name.log}
source launch/common.sh  # show, run, locked_jax (the cwd is the repo root here)
JAX_PIN="==$(locked_jax)"  # e.g. ==0.10.2

[ "$SETUP" = 1 ] && run bash launch/setup.sh
# jax[cudaNN] at the locked jax version: keeps the installed jax, adds the matching CUDA plugin.
[ -n "$CUDA" ] && run .venv/bin/python -m pip install -q "jax[$CUDA]$JAX_PIN"

# Latency-hiding scheduling overlaps FSDP's all-gathers/reduce-scatters with compute; the combine
# thresholds batch the per-layer collectives into fewer, larger ones. All are known to jax 0.10's XLA.
GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_highest_priority_async_stream=true"
GPU_XLA_FLAGS+=" --xla_gpu_all_gather_combine_threshold_bytes=134217728"
GPU_XLA_FLAGS+=" --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728"
GPU_XLA_FLAGS+=" --xla_gpu_all_reduce_combine_threshold_bytes=134217728"
env_args=(XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-.95}"  # XLA's share of each GPU
          XLA_FLAGS="$GPU_XLA_FLAGS${XLA_FLAGS:+ $XLA_FLAGS}")
[ -n "$GPUS" ] && env_args+=(CUDA_VISIBLE_DEVICES="$GPUS")

train=(.venv/bin/python -m spjax.train --config "$CONFIG" --workdir "$WORKDIR")
[ "$RESUME" = 1 ] && train+=(--resume)
train+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})

# One host is one process. spjax.sharding.init_distributed (and JAX's own SLURM detection) start the
# multi-host runtime only inside an srun step (SLURM_STEP_NODELIST set, with SLURM_NTASKS > 1): without
# it this stays single-process even when run under srun in an salloc/sbatch allocation.
run mkdir -p "$(dirname "$LOG")"
show env -u SLURM_STEP_NODELIST "${env_args[@]}" "${train[@]}"
[ "$DRY" = 1 ] && exit 0
# exec: the trainer takes this script's PID, so a bare `kill PID` reaches it (it stops with one line
# and the command that continues the run) rather than ending the shell and leaving it running.
# tee ignores INT/TERM/HUP: a Ctrl-C or a scheduler's SIGTERM goes to the whole process group, and a tee
# killed with it would take the trainer's stop line (and its exit status: a write to the closed pipe fails)
# with it. It ends when the trainer does (end of input).
exec env -u SLURM_STEP_NODELIST "${env_args[@]}" "${train[@]}" > >(trap '' INT TERM HUP; exec tee -a "$LOG") 2>&1
