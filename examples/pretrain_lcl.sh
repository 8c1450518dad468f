#!/usr/bin/env bash
# Launch LCL pre-training: `sbatch` on a slurm cluster, or plain `bash` on one machine.
#
#   sbatch --nodes=8 examples/pretrain_lcl.sh examples/configs/vit_b16_opt125m_mmc4.yaml \
#       data.path=/data/mmc4_prepared data.tokenizer=/data/tokenizer/lcl.model
#   NPROC=2 bash examples/pretrain_lcl.sh examples/configs/tiny_cpu.yaml      # local, 2 processes
#
# Under slurm, `srun` starts one torchrun per node (rendezvous on the first node); torchrun starts
# GPUS_PER_NODE ranks. Preemption / time limit: 120 s before the limit slurm sends SIGUSR1 to this
# batch shell (`B:`), which forwards it to the training step; torchrun passes it on to every rank
# (--signals-to-handle), each finishes its step, the checkpoint is saved, ranks exit 0, and this
# script requeues the job, which resumes from run_dir/checkpoints (checkpoint.auto_resume).
# `scancel --signal=TERM` or a preemption SIGTERM take the same path. Without slurm: NPROC local
# processes (GPUs if present, else CPU + gloo). Arguments after the config are overrides.
#
#SBATCH --job-name=lcl-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
set -euo pipefail

CONFIG=${1:?usage: pretrain_lcl.sh CONFIG.yaml [section.key=value ...]}
shift
ROOT=${LCL_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
cd "$ROOT"
mkdir -p logs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# torchrun forwards these to its ranks and gives them SHUTDOWN_S to save before SIGKILL.
TORCHRUN_ARGS="--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=${SHUTDOWN_S:-600}"

if [ -n "${SLURM_JOB_ID:-}" ]; then
  GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  echo "job $SLURM_JOB_ID: $SLURM_NNODES node(s) x $GPUS_PER_NODE GPU(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
  STOP_SIGNAL=""
  trap 'STOP_SIGNAL=USR1; echo "SIGUSR1: asking the ranks to save and stop"; scancel --signal=USR1 "$SLURM_JOB_ID.$STEP_ID"' USR1
  trap 'STOP_SIGNAL=TERM; scancel --signal=TERM "$SLURM_JOB_ID.$STEP_ID"' TERM
  STEP_ID=0
  # Single quotes: SLURM_NODEID is expanded per node inside srun.
  srun --kill-on-bad-exit=1 bash -c '
    exec "$0" -m torch.distributed.run $4 \
      --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" --nproc_per_node="$1" \
      --rdzv_backend=c10d --rdzv_endpoint="$2:$3" --rdzv_id="$SLURM_JOB_ID" \
      pretrain_lcl.py --config "${@:5}"' \
    "$PYTHON" "$GPUS_PER_NODE" "$MASTER_ADDR" "$MASTER_PORT" "$TORCHRUN_ARGS" "$CONFIG" "$@" &
  SRUN_PID=$!
  # `wait` returns early when a trapped signal arrives: keep waiting for the ranks to save and exit.
  while ! wait "$SRUN_PID"; do kill -0 "$SRUN_PID" 2>/dev/null || break; done
  if [ -n "$STOP_SIGNAL" ]; then
    echo "stopped by SIG$STOP_SIGNAL after saving; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
else
  NPROC=${NPROC:-$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)}
  echo "local: $NPROC process(es)"
  # shellcheck disable=SC2086
  exec "$PYTHON" -m torch.distributed.run $TORCHRUN_ARGS --standalone --nproc_per_node="$NPROC" \
    pretrain_lcl.py --config "$CONFIG" "$@"
fi
