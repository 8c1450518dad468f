#!/usr/bin/env bash
# Launch LCL pre-training: `sbatch` on a slurm cluster, or plain `bash` on one machine.
#
#   sbatch --nodes=8 --gpus-per-node=8 examples/pretrain_lcl.sh \
#       examples/configs/vit_b16_opt125m_mmc4.yaml data.path=/data/mmc4_prepared data.tokenizer=/data/tokenizer/lcl.model
#   NPROC=2 bash examples/pretrain_lcl.sh examples/configs/tiny_cpu.yaml      # local, 2 processes
#
# Under slurm, `srun` starts one torchrun per node (rendezvous on the first node); torchrun starts
# NPROC ranks per node (default: the node's GPUs, 1 without GPUs; `NPROC=4 sbatch ...` sets it) on
# all the node's CPUs (--exclusive). Arguments after the config are overrides.
#
# Stopping: a stop signal (SIGUSR1 or SIGTERM) may reach any process of the job, at any moment: this
# batch shell (`--signal=B:USR1@120` before the time limit, `scancel --batch --signal=...`), the training
# step (`scancel --signal=...`, whose processes all get it), or everything (`scontrol requeue`, `scancel`,
# preemption). This shell traps it from its first line, writes it to $LCL_STOP_FILE (which the ranks
# check at every step and during their start-up, so a step not yet started still sees it) and forwards
# it to the step; before the launch it launches nothing. torchrun runs as `megatron_lcl.torchrun`,
# which catches the stop signals from its first line and holds them back while it starts the ranks;
# the ranks catch them from their first line too (megatron_lcl/stop_signals.py). Each rank finishes
# its step, saves and exits 0 (during its start-up: exits 0 without training), with its helper
# processes kept alive until then (megatron_lcl/runtime/signals.py).
# The ranks write their exit status to $LCL_EXIT_STATUS_FILE (torchrun's own is 1 after a signal or a
# failed rank): after "0 preempted" this script requeues a job that is still RUNNING (a cancelled job
# stays cancelled; `scontrol requeue` requeues by itself), which resumes from run_dir/checkpoints;
# otherwise it exits with the driver's status (2: config error, run directory in use) or, without one,
# srun's/torchrun's, so a crashed run ends FAILED.
#
#SBATCH --job-name=lcl-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
STOP_SIGNAL="" TRAIN_PID=""
stop() {  # stop SIGNAL: a stop signal reached this shell; ask the ranks to save and stop
  echo "SIG$1: asking the ranks to save and stop"
  STOP_SIGNAL=${STOP_SIGNAL:-$1}
  if [ -n "${LCL_STOP_FILE:-}" ]; then echo "SIG$1" > "$LCL_STOP_FILE" || true; fi
  if [ -z "$TRAIN_PID" ]; then return 0; fi  # not launched (yet): the ranks read the stop file
  if [ -n "${SLURM_JOB_ID:-}" ]; then scancel --signal="$1" "$SLURM_JOB_ID.0" 2>/dev/null || true
  else kill -s "$1" "$TRAIN_PID" 2>/dev/null || true; fi
}
trap 'stop USR1' USR1  # first: a stop signal from now on is not fatal to this shell
trap 'stop TERM' TERM
trap 'stop INT' INT

CONFIG=${1:?usage: pretrain_lcl.sh CONFIG.yaml [section.key=value ...]}
shift
ROOT=${LCL_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
cd "$ROOT"
mkdir -p logs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export LCL_EXIT_STATUS_FILE=$ROOT/logs/exit-status-${SLURM_JOB_ID:-local-$$}
export LCL_STOP_FILE=$ROOT/logs/stop-request-${SLURM_JOB_ID:-local-$$}
rm -f "$LCL_EXIT_STATUS_FILE" "$LCL_STOP_FILE"  # a requeued job starts afresh
if [ -n "$STOP_SIGNAL" ]; then echo "SIG$STOP_SIGNAL" > "$LCL_STOP_FILE"; fi  # arrived before the name was set
NPROC=${NPROC:-${SLURM_GPUS_ON_NODE:-$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)}}
TORCHRUN_ARGS="--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=${SHUTDOWN_S:-600}"

# torchrun's agent starts with the stop signals blocked (`env --block-signal`, coreutils >= 8.31: a
# blocked signal stays pending across exec) until the first line of megatron_lcl.torchrun catches them:
# a signal arriving meanwhile is handled then, neither lost nor fatal. (Without that env option the
# step's shell ignores them until then: lost, not fatal; the stop file still reaches the ranks.)
HOLD=()
if env --block-signal=USR1 true 2>/dev/null; then HOLD=(env --block-signal=USR1 --block-signal=TERM); fi
if [ -n "$STOP_SIGNAL" ]; then
  echo "stopped by SIG$STOP_SIGNAL before the launch: nothing started"
  LAUNCHER_STATUS=0
  echo "0 preempted" > "$LCL_EXIT_STATUS_FILE"
elif [ -n "${SLURM_JOB_ID:-}" ]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  # Below Linux's ephemeral range (32768-60999), which the kernel hands to outgoing connections: a
  # port there can be taken by a concurrent job's NCCL/gloo sockets before torchrun binds it.
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 12000))}
  echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x $NPROC rank(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
  # Step 0 of the job. Single quotes: SLURM_NODEID is expanded per node inside srun.
  srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" "${HOLD[@]}" bash -c '
    trap "" USR1 TERM
    exec "$0" -m megatron_lcl.torchrun $4 \
      --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" --nproc_per_node="$1" \
      --rdzv_backend=c10d --rdzv_endpoint="$2:$3" --rdzv_id="$SLURM_JOB_ID" \
      pretrain_lcl.py --config "${@:5}"' \
    "$PYTHON" "$NPROC" "$MASTER_ADDR" "$MASTER_PORT" "$TORCHRUN_ARGS" "$CONFIG" "$@" &
  TRAIN_PID=$!
else
  echo "local: $NPROC process(es)"
  # shellcheck disable=SC2086
  "${HOLD[@]}" "$PYTHON" -m megatron_lcl.torchrun $TORCHRUN_ARGS --standalone --nproc_per_node="$NPROC" \
    pretrain_lcl.py --config "$CONFIG" "$@" &
  TRAIN_PID=$!
fi
if [ -n "$TRAIN_PID" ]; then
  # `wait` also returns when a trapped signal arrives: keep waiting until the training has exited.
  while true; do
    wait "$TRAIN_PID" && LAUNCHER_STATUS=0 || LAUNCHER_STATUS=$?
    kill -0 "$TRAIN_PID" 2>/dev/null || break
  done
fi
STATUS=$LAUNCHER_STATUS REASON="no exit status from the ranks"
[ -f "$LCL_EXIT_STATUS_FILE" ] && read -r STATUS REASON < "$LCL_EXIT_STATUS_FILE"
rm -f "$LCL_EXIT_STATUS_FILE" "$LCL_STOP_FILE"
if [ "$STATUS $REASON" = "0 preempted" ]; then
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    # RUNNING: the signal came from --signal / scancel --signal. CANCELLED (scancel) stays cancelled;
    # a job `scontrol requeue`d or preempted with PreemptMode=REQUEUE is requeued by slurm already.
    JOB_STATE=$(scontrol show job "$SLURM_JOB_ID" --oneliner | grep -o 'JobState=[A-Z_]*' | cut -d= -f2 || true)
    if [ "$JOB_STATE" = RUNNING ] || [ "$JOB_STATE" = PREEMPTED ]; then
      echo "stopped by a signal after saving; requeueing job $SLURM_JOB_ID"
      scontrol requeue "$SLURM_JOB_ID" || echo "scontrol requeue $SLURM_JOB_ID failed: resubmit to resume"
    else
      echo "stopped by a signal after saving; job $SLURM_JOB_ID is $JOB_STATE: not requeued by this script"
    fi
  else
    echo "stopped by a signal after saving; rerun the same command to resume"
  fi
  exit 0
fi
if [ "$STATUS" != 0 ] || [ "$LAUNCHER_STATUS" != 0 ]; then
  [ "$STATUS" != 0 ] || STATUS=$LAUNCHER_STATUS
  echo "training failed: exit status $STATUS ($REASON; launcher exit $LAUNCHER_STATUS)" >&2
fi
exit "$STATUS"
