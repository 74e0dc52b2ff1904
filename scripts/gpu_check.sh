#!/usr/bin/env bash
# The one-GPU check of megatron-capaware (docs/gpu.md): the CUDA paths in a few
# minutes, on a machine with one GPU and PyTorch, without network.
#
#   bash scripts/gpu_check.sh [--wheels DIR] [--out DIR] [--dry-run] [ARGS of the module...]
#
# --wheels DIR: install megatron-core (and optionally transformer-engine, tqdm,
# tokenizers, ...) from the wheels in DIR, offline, into a private folder put
# first on PYTHONPATH. Without it the Python environment must have them.
# Writes DIR/gpu_check.json and prints a table. Exit status 0 when every step
# passed. Runs at most CAPAWARE_GPU_CHECK_TIMEOUT_S seconds (default 480).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="" out="gpu-check" args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --out) out="$2"; args+=("--out" "$2"); shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exec python3 -m megatron_capaware.tools.gpu_check --help ;;
    *) args+=("$1"); shift ;;
  esac
done
py=${PYTHON:-python3}
if [ -n "$wheels" ]; then
  site="$(mktemp -d)/site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site:$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
mkdir -p "$out"
exec timeout "${CAPAWARE_GPU_CHECK_TIMEOUT_S:-480}" "$py" -m megatron_capaware.tools.gpu_check "${args[@]}"
