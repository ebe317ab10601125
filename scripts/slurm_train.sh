#!/usr/bin/env bash
# Multi-node training under SLURM: one task per node, each running scripts/train.sh with NGPUS processes, meeting
# at the first node of the allocation. exp_dir must be on a filesystem every node sees (rank 0 writes, all read).
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 scripts/slurm_train.sh pascal 1_16 4 [key=value ...]
# Pre-emption: SLURM's SIGTERM (e.g. with --signal=TERM@120) reaches every node; rank 0 checkpoints, and
# resubmitting the same command resumes.
#SBATCH --job-name=scalematch
#SBATCH --ntasks-per-node=1
#SBATCH --output=slurm-%j.out
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: sbatch --nodes=N scripts/slurm_train.sh DATASET SPLIT GPUS_PER_NODE [key=value ...]" >&2
    exit 2
fi
: "${SLURM_JOB_NODELIST:?run this under sbatch or srun (SLURM_JOB_NODELIST is not set)}"
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# sed reads the whole list: head would stop reading, and pipefail turn scontrol's SIGPIPE into exit 141.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-29500}
export NNODES=${SLURM_JOB_NUM_NODES:-1}
# SLURM_NODEID is read on each node, inside srun's task, hence the single quotes.
srun --kill-on-bad-exit=1 bash -c 'NODE_RANK=$SLURM_NODEID exec bash scripts/train.sh "$@"' train "$@"
