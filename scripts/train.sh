#!/usr/bin/env bash
# Train on DATASET (configs/DATASET.yaml) with the split splits/DATASET/SPLIT on NGPUS processes per node,
# or with a config file that names its split (CONFIG: a path to a .yaml, or a name under configs/ such as
# published/pascal_original_92; the split is the config's `split`).
#   bash scripts/train.sh pascal 1_16 4                # torchrun, 4 GPUs
#   bash scripts/train.sh synthetic 1_16 1 epochs=5    # one process (GPU if present, else CPU)
#   bash scripts/train.sh synthetic 1_16 0             # NGPUS=0: CPU
#   bash scripts/train.sh published/pascal_original_92 4   # a published number's settings (README.md)
#   bash scripts/train.sh my_runs/setting.yaml 4
# Across nodes, run the same command on every node with the rendezvous variables set (util/launcher.py):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 MASTER_PORT=29500 bash scripts/train.sh pascal 1_16 4   # on host0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 MASTER_PORT=29500 bash scripts/train.sh pascal 1_16 4   # on host1
# Extra key=value arguments override the config (dotted keys for nested values).
set -euo pipefail
usage="usage: bash scripts/train.sh DATASET SPLIT NGPUS [key=value ...] | CONFIG NGPUS [key=value ...]"
split_override=()
case "${1:-}" in
    */*|*.yaml)
        # A config file: its own split; a path as given (from the caller's directory), else a name under configs/.
        if [ $# -lt 2 ]; then echo "$usage" >&2; exit 2; fi
        if [ -f "$1" ]; then
            config="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
        else
            config="$1"
        fi
        ngpus=$2
        shift 2
        cd "$(dirname "$0")/.."
        if [ ! -f "$config" ]; then
            for candidate in "configs/$config" "configs/$config.yaml"; do
                if [ -f "$candidate" ]; then config=$candidate; break; fi
            done
        fi
        if [ ! -f "$config" ]; then
            echo "error: no config file $config (nor configs/$config.yaml); published ones: $(cd configs/published \
                && ls *.yaml | sed 's/\.yaml$//; s/^/published\//' | tr '\n' ' ')" >&2
            exit 2
        fi
        ;;
    *)
        if [ $# -lt 3 ]; then echo "$usage" >&2; exit 2; fi
        dataset=$1
        split_override=("split=$2")
        ngpus=$3
        shift 3
        cd "$(dirname "$0")/.."
        config="configs/$dataset.yaml"
        if [ ! -f "$config" ]; then
            echo "error: no config $config; choose one of: $(cd configs && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
            exit 2
        fi
        ;;
esac
case "$ngpus" in
    ''|*[!0-9]*) echo "error: NGPUS must be a whole number (0 = CPU), got '$ngpus'" >&2; exit 2 ;;
esac
device_flag=()
if [ "$ngpus" -eq 0 ]; then device_flag=(--cpu); fi
if [ "${NNODES:-1}" = 1 ] && [ -z "${MASTER_ADDR:-}" ] && [ -z "${RDZV_ENDPOINT:-}" ] && [ "$ngpus" -le 1 ]; then
    exec python scalematch.py --config "$config" ${device_flag[@]+"${device_flag[@]}"} \
        ${split_override[@]+"${split_override[@]}"} "$@"
fi
# util.launcher runs torchrun (one node, or this node of several) and prints a failure once, not once per process.
exec python -m util.launcher "$(( ngpus > 1 ? ngpus : 1 ))" \
    scalematch.py --config "$config" ${device_flag[@]+"${device_flag[@]}"} ${split_override[@]+"${split_override[@]}"} "$@"
