#!/usr/bin/env bash
# GPU acceptance run (scripts/gpu_check.py): every CUDA path on one GPU within 8 minutes, and a report.
#   bash scripts/gpu_check.sh [--out exp/gpu_check/report.md] [--parts tests,memory,step,eval,wkv]
# Without a GPU it says so in one line and exits 0.
set -euo pipefail
exec python "$(dirname "$0")/gpu_check.py" "$@"
