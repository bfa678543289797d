#!/usr/bin/env bash
# Full-size LongLive pipeline check on a CUDA host (random weights; nothing to download):
# FPS (DiT only, DiT + VAE), recache cost, peak memory, CUDA vs CPU agreement.
#   scripts/gpu_check.sh [--blocks 24] [--compile] [--no-text-encoder]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" -m engine.gpu_check "$@"
