#!/usr/bin/env bash
# Train on DATASET (configs/DATASET.yaml) with the split splits/DATASET/SPLIT on NGPUS processes.
#   bash scripts/train.sh pascal 1_16 4                # torchrun, 4 GPUs
#   bash scripts/train.sh synthetic 1_16 1 epochs=5    # one process (GPU if present, else CPU)
#   bash scripts/train.sh synthetic 1_16 0             # NGPUS=0: CPU
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
if [ "$ngpus" -le 1 ]; then
    device_flag=()
    if [ "$ngpus" -eq 0 ]; then device_flag=(--cpu); fi
    exec python scalematch.py --config "$config" ${device_flag[@]+"${device_flag[@]}"} "split=$split" "$@"
fi
exec python -m torch.distributed.run --standalone --nproc_per_node="$ngpus" \
    scalematch.py --config "$config" "split=$split" "$@"
