#!/usr/bin/env bash
# Run spjax on a Cloud TPU VM slice: create it, install spjax on every worker, train on every worker
# (JAX finds the slice's hosts itself: spjax.sharding.init_distributed), fetch the logs into
# logs/NAME/ of this checkout, delete it (also after a failure). --keep keeps it; --skip-create reuses
# an existing slice and never deletes it (this invocation did not create it).
#
#   bash launch/tpu_pod.sh --name spin7b --zone us-east5-a --accelerator-type v5p-32 \
#       --config configs/spin_zephyr7b_v5p.py --workdir gs://BUCKET/spin7b [-- key=value ...]
#
# --dry-run prints every command it would run (gcloud, and the local tar), each after "+ ", and runs none.
# A gs:// workdir is mounted with gcsfuse on every worker (spjax writes through a local path, and all
# hosts must see the same checkpoints); any other workdir must be a filesystem shared by the workers.
# Model weights and data named by the config must exist at the same path on every worker: put them
# in the bucket (e.g. model_path=/mnt/gcs/BUCKET/models/...) or copy them in before the run.
#
# Interrupted (Ctrl-C, SIGHUP, SIGTERM, to the script alone or to its process group), it stops the running
# gcloud command, keeps the slice and prints the commands that continue the run on it (--skip-create
# --resume) or delete it; it exits 128 + the signal's number.
# The checkout travels as one tarball, built in $TMPDIR (default /tmp) and removed when the script ends.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: bash launch/tpu_pod.sh --name NAME --zone ZONE --accelerator-type TYPE --config FILE --workdir DIR
                              [--version RUNTIME] [--project PROJECT] [--spot] [--skip-create] [--resume]
                              [--workers N] [--python PY] [--keep] [--dry-run] [-- key=value ...]
  --name               TPU VM name                    --zone              e.g. us-east5-a
  --accelerator-type   e.g. v5p-32, v4-8, v5litepod-16, v6e-8
  --version            TPU software version (default by generation: v2-alpha-tpuv5, v2-alpha-tpuv5-lite,
                       v2-alpha-tpuv6e, tpu-ubuntu2204-base)
  --config / --workdir passed to python -m spjax.train (a gs:// workdir is mounted with gcsfuse)
  --workers            hosts in the slice (default: from the accelerator type; used to fetch logs)
  --skip-create        use an existing slice of that name (never deleted: this run did not create it)
  --keep               do not delete the slice                 --spot     create a Spot TPU
  --resume             continue the run in --workdir
  --python             interpreter for the venv (default python3.11: jax 0.10 needs Python >= 3.11)
  --dry-run            print every command, run none           -- ...     config overrides for spjax.train
EOF
  exit 2
}

ARGS=("$@")  # to print the command that continues an interrupted run
NAME="" ZONE="" ACCEL="" VERSION="" PROJECT="" CONFIG="" WORKDIR="" WORKERS="" PY=python3.11
DRY=0 KEEP=0 SPOT=0 SKIP_CREATE=0 RESUME=0
OVERRIDES=()
need() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "tpu_pod.sh: $1 needs a value" >&2; usage; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --name) need "$@"; NAME=$2; shift 2 ;;
    --zone) need "$@"; ZONE=$2; shift 2 ;;
    --accelerator-type) need "$@"; ACCEL=$2; shift 2 ;;
    --version) need "$@"; VERSION=$2; shift 2 ;;
    --project) need "$@"; PROJECT=$2; shift 2 ;;
    --config) need "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need "$@"; WORKDIR=$2; shift 2 ;;
    --workers) need "$@"; WORKERS=$2; shift 2 ;;
    --python) need "$@"; PY=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --keep) KEEP=1; shift ;;
    --spot) SPOT=1; shift ;;
    --skip-create) SKIP_CREATE=1; shift ;;
    --resume) RESUME=1; shift ;;
    -h|--help) usage ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument: $1" >&2; usage ;;
  esac
done
for pair in NAME:name ZONE:zone ACCEL:accelerator-type CONFIG:config WORKDIR:workdir; do
  var=${pair%%:*}
  [ -n "${!var}" ] || { echo "tpu_pod.sh: missing --${pair#*:}" >&2; usage; }
done

[ "$SKIP_CREATE" = 1 ] && KEEP=1  # a slice this invocation did not create is not its to delete
ROOT=$(cd "$(dirname "$0")/.." && pwd)

# Both checks come before anything is created: a typo should not cost a slice's start-up.
# The config as the workers' trainer reads it: relative to the checkout (copied to ~/spjax) or absolute.
config_file=${CONFIG%%:*}  # without a stage suffix (file.py:iter2)
# A path into this checkout is this machine's: the workers have the checkout at ~/spjax, so they get it relative.
[[ "$config_file" == "$ROOT"/* ]] && CONFIG=${CONFIG#"$ROOT"/}
[[ "$config_file" == /* ]] || config_file=$ROOT/$config_file
[ -f "$config_file" ] || { echo "tpu_pod.sh: --config $CONFIG: no such file $config_file" >&2; exit 2; }

# Generation -> default software version, TensorCores per chip (v4 and v5p types count cores), hosts.
gen=${ACCEL%%-*}; size=${ACCEL##*-}
[[ "$size" =~ ^[0-9]+$ ]] || { echo "tpu_pod.sh: cannot read a size from --accelerator-type $ACCEL" >&2; usage; }
case "$gen" in
  v5p) default_version=v2-alpha-tpuv5; cores=2 ;;
  v4) default_version=tpu-ubuntu2204-base; cores=2 ;;
  v5litepod|v5e) default_version=v2-alpha-tpuv5-lite; cores=1 ;;
  v6e) default_version=v2-alpha-tpuv6e; cores=1 ;;
  *) echo "tpu_pod.sh: unknown TPU generation in $ACCEL" >&2; usage ;;
esac
chips=$((size / cores))
# Hosts hold 4 chips (or up to 8 v5e/v6e chips on one host): a size that splits into no whole chips or hosts
# is a typo, and the workers counted from it would be wrong.
if [ $((size % cores)) != 0 ] || [ "$chips" = 0 ] || { [ "$chips" -gt 4 ] && [ $((chips % 4)) != 0 ]; }; then
  unit=chips; [ "$cores" = 2 ] && unit="TensorCores (2 a chip)"
  echo "tpu_pod.sh: --accelerator-type $ACCEL: $size $unit make no whole hosts of 4 chips" \
       "(e.g. $gen-$((4 * cores)), $gen-$((8 * cores)), $gen-$((16 * cores)))" >&2
  exit 2
fi
VERSION=${VERSION:-$default_version}
if [ -z "$WORKERS" ]; then  # 4 chips per host, except single-host slices of up to 8 v5e/v6e chips
  if [ "$chips" -le 4 ] || { [ "$chips" -le 8 ] && [[ "$gen" != v4 && "$gen" != v5p ]]; }; then WORKERS=1
  else WORKERS=$((chips / 4)); fi
fi

REMOTE_DIR=spjax  # in each worker's home directory
TARBALL=${TMPDIR:-/tmp}/spjax-$NAME.tgz
LOGS=$ROOT/logs/$NAME  # in this checkout, wherever the script is run from

where=(--zone="$ZONE")
[ -n "$PROJECT" ] && where+=(--project="$PROJECT")

source "$ROOT/launch/common.sh"  # words, show, run, locked_jax
JAX_PIN="==$(locked_jax "$ROOT/requirements.lock")"  # e.g. ==0.10.2

# The trainer's working directory as the workers see it.
if [[ "$WORKDIR" == gs://* ]]; then
  path=${WORKDIR#gs://}; BUCKET=${path%%/*}
  RUN_DIR=/mnt/gcs/$BUCKET${path#"$BUCKET"}
else
  BUCKET="" RUN_DIR=$WORKDIR
fi

q() { printf '%q' "$1"; }
train_args="--config $(q "$CONFIG") --workdir $(q "$RUN_DIR")"
[ "$RESUME" = 1 ] && train_args+=" --resume"
for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do train_args+=" $(q "$o")"; done

install_cmd="set -e; mkdir -p ~/$REMOTE_DIR && tar -xzf ~/spjax.tgz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR"
install_cmd+=" && (command -v $PY >/dev/null || (sudo apt-get update -qq && sudo apt-get install -y -qq $PY $PY-venv))"
install_cmd+=" && PYTHON=$PY bash launch/setup.sh"
# jax[tpu] at the locked jax version brings the libtpu that matches the jax setup.sh installed.
install_cmd+=" && .venv/bin/python -m pip install -q 'jax[tpu]$JAX_PIN'"
if [ -n "$BUCKET" ]; then
  # gcsfuse from Google's apt repository, unless the image has it
  apt_list="deb [signed-by=/usr/share/keyrings/gcsfuse.gpg]"
  apt_list+=" https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main"
  install_cmd+=" && (command -v gcsfuse >/dev/null || (curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
  install_cmd+=" | sudo gpg --dearmor -o /usr/share/keyrings/gcsfuse.gpg"
  install_cmd+=" && echo \"$apt_list\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list"
  install_cmd+=" && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse))"
  install_cmd+=" && sudo mkdir -p /mnt/gcs/$BUCKET && sudo chown \$USER /mnt/gcs/$BUCKET"
  install_cmd+=" && (mountpoint -q /mnt/gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /mnt/gcs/$BUCKET)"
fi
# A resumed run appends to each worker's log: a run continued after an interruption fetches all of it.
tee_args=""; [ "$RESUME" = 1 ] && tee_args="-a "
# SPJAX_DISTRIBUTED=1: every worker starts JAX's multi-host runtime (found from the TPU VM's metadata; no
# environment variable there says the slice has several hosts, and without the runtime a failed worker's
# peers wait on it, orbax has no barriers, and a SIGTERM is not spjax's to handle).
train_cmd="cd ~/$REMOTE_DIR && SPJAX_DISTRIBUTED=1 .venv/bin/python -m spjax.train $train_args 2>&1 | tee $tee_args~/spjax-train.log"
train_cmd+="; exit \${PIPESTATUS[0]}"

delete=(compute tpus tpu-vm delete "$NAME" "${where[@]}" --quiet)
cleanup() {  # at exit: the tarball goes, and the slice unless it is kept
  [ "$DRY" = 1 ] || rm -f "$TARBALL"
  if [ "$KEEP" = 0 ]; then gc "${delete[@]}"; return; fi
  why=--keep; [ "$SKIP_CREATE" = 1 ] && why="--skip-create: this run did not create it"
  echo "tpu_pod.sh: keeping $NAME ($why); delete it with: $(words gcloud "${delete[@]}")" >&2
}

# An interrupted run (Ctrl-C, a closed terminal, a kill) keeps the slice: the run continues on it.
again=(bash "$0")
for a in "${ARGS[@]}"; do
  [ "$a" = -- ] && break
  [ "$a" = --skip-create ] || [ "$a" = --resume ] || again+=("$a")
done
again+=(--skip-create --resume ${OVERRIDES[@]+-- "${OVERRIDES[@]}"})
interrupted() {  # $1: the signal's name, $2: its number
  trap - EXIT; set +e  # the slice stays; and a closed terminal (failing writes) must not cut this short
  # Stop the running gcloud and its ssh processes: a signal sent to this script alone never reached them,
  # and as a background job they ignore SIGINT.
  [ -n "$CHILD" ] && { pkill -TERM -P "$CHILD"; kill -TERM "$CHILD"; wait "$CHILD"; } 2>/dev/null
  rm -f "$TARBALL"
  { echo "tpu_pod.sh: interrupted by SIG$1: the slice $NAME is not deleted. Continue the run on it with"
    echo "  $(words "${again[@]}")"
    echo "(it appends to each worker's ~/spjax-train.log and fetches them into $LOGS; a trainer the cut ssh left"
    echo "running holds the TPU: stop it first with"
    echo "  $(words gcloud compute tpus tpu-vm ssh "$NAME" "${where[@]}" --worker=all --command 'pkill -f spjax.train'))"
    echo "or delete the slice with"
    echo "  $(words gcloud "${delete[@]}")"; } >&2
  exit $((128 + $2))
}
# gcloud runs in the background and is waited for: bash runs a trap only once a foreground command ends, but
# a trapped signal ends `wait` at once. So a bare `kill PID` of this script acts now, not when the ssh ends.
CHILD=""
gc() {
  show gcloud "$@"; [ "$DRY" = 1 ] && return 0
  local rc=0; gcloud "$@" <&0 & CHILD=$!  # <&0: keep the terminal as stdin (prompts), not /dev/null
  wait "$CHILD" || rc=$?; CHILD=""; return "$rc"
}
if [ "$DRY" = 0 ]; then trap 'interrupted INT 2' INT; trap 'interrupted HUP 1' HUP; trap 'interrupted TERM 15' TERM; fi

# -- create
if [ "$SKIP_CREATE" = 0 ]; then
  create=(compute tpus tpu-vm create "$NAME" "${where[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
  [ "$SPOT" = 1 ] && create+=(--spot)
  gc "${create[@]}"
fi
[ "$DRY" = 1 ] || trap cleanup EXIT  # from here on, a failure still deletes the slice (unless it is kept)

# -- install spjax on all workers: this checkout (without venv, runs, git), then launch/setup.sh
run tar -czf "$TARBALL" -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude=./logs \
  --exclude=./.jax_cache --exclude='*.egg-info' --exclude=__pycache__ .
gc compute tpus tpu-vm scp "$TARBALL" "$NAME:~/spjax.tgz" "${where[@]}" --worker=all
gc compute tpus tpu-vm ssh "$NAME" "${where[@]}" --worker=all --command="$install_cmd"

# -- train on all workers at once; keep going to fetch logs when it fails
status=0
gc compute tpus tpu-vm ssh "$NAME" "${where[@]}" --worker=all --command="$train_cmd" || status=$?

# -- fetch every worker's log
run mkdir -p "$LOGS"
for ((w = 0; w < WORKERS; w++)); do
  gc compute tpus tpu-vm scp "$NAME:~/spjax-train.log" "$LOGS/worker$w.log" "${where[@]}" --worker="$w" \
    || echo "tpu_pod.sh: no log from worker $w" >&2
done

# -- delete (the EXIT trap; printed here in a dry run)
[ "$DRY" = 1 ] && cleanup
if [ "$status" != 0 ]; then echo "tpu_pod.sh: training exited with status $status; logs in $LOGS" >&2
elif [ "$DRY" = 0 ]; then echo "tpu_pod.sh: training done; logs in $LOGS" >&2; fi
exit "$status"
