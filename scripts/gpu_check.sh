#!/usr/bin/env bash
# GPU acceptance run (scripts/gpu_check.py): every CUDA path on one GPU within 8 minutes, and a report.
#   bash scripts/gpu_check.sh [--out DIR] [--parts tests,memory,step,eval,wkv] [--require-gpu]
# Installs nothing: runs on the python3 it finds. Without a GPU it says so in one line and exits 0 (1 with --require-gpu).
set -euo pipefail
exec python3 "$(dirname "$0")/gpu_check.py" "$@"
