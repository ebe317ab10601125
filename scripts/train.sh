#!/usr/bin/env bash
# Train on DATASET (configs/DATASET.yaml) with the split splits/DATASET/SPLIT on NGPUS processes per node.
#   bash scripts/train.sh pascal 1_16 4                # torchrun, 4 GPUs
#   bash scripts/train.sh synthetic 1_16 1 epochs=5    # one process (GPU if present, else CPU)
#   bash scripts/train.sh synthetic 1_16 0             # NGPUS=0: CPU
# Across nodes, run the same command on every node with the rendezvous variables set (util/launcher.py):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 MASTER_PORT=29500 bash scripts/train.sh pascal 1_16 4   # on host0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 MASTER_PORT=29500 bash scripts/train.sh pascal 1_16 4   # on host1
# Extra key=value arguments override the config (dotted keys for nested values).
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: bash scripts/train.sh DATASET SPLIT NGPUS [key=value ...]" >&2
    exit 2
fi
dataset=$1
split=$2
ngpus=$3
shift 3
cd "$(dirname "$0")/.."
config="configs/$dataset.yaml"
if [ ! -f "$config" ]; then
    echo "error: no config $config; choose one of: $(cd configs && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
    exit 2
fi
case "$ngpus" in
    ''|*[!0-9]*) echo "error: NGPUS must be a whole number (0 = CPU), got '$ngpus'" >&2; exit 2 ;;
esac
device_flag=()
if [ "$ngpus" -eq 0 ]; then device_flag=(--cpu); fi
if [ "${NNODES:-1}" = 1 ] && [ -z "${MASTER_ADDR:-}" ] && [ -z "${RDZV_ENDPOINT:-}" ] && [ "$ngpus" -le 1 ]; then
    exec python scalematch.py --config "$config" ${device_flag[@]+"${device_flag[@]}"} "split=$split" "$@"
fi
# util.launcher runs torchrun (one node, or this node of several) and prints a failure once, not once per process.
exec python -m util.launcher "$(( ngpus > 1 ? ngpus : 1 ))" \
    scalematch.py --config "$config" ${device_flag[@]+"${device_flag[@]}"} "split=$split" "$@"
