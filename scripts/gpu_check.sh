#!/usr/bin/env bash
# The one command for a GPU host: full-size LongLive with random weights in the official
# formats (nothing to download), through the real loaders; writes out/gpu-check/gpu-check.{json,md}.
#
#   scripts/gpu_check.sh [--mode auto|engine|service] [--no-compile] [--switches 10] ...
#   scripts/gpu_check.sh --device cpu --size tiny --no-compile    # a rehearsal on any machine
#
# engine mode needs PyTorch and this repository only (a bare GPU machine); service mode also
# runs the real channel (RTMP to a local nginx-rtmp, HLS) and needs the service packages.
# auto (default) takes service mode where they import. docs/engine.md#gpu-check says what it reports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mode=auto
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --mode) mode=$2; shift 2 ;;
    --mode=*) mode=${1#--mode=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ "$mode" = auto ]; then
  if "$PY" -c "import av, aiohttp, pydantic, yaml" 2>/dev/null; then mode=service; else mode=engine; fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "gpu_check: $mode mode ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"
case "$mode" in
  engine) exec "$PY" -m engine.gpu_check "${args[@]+"${args[@]}"}" ;;
  service) exec "$PY" -m broadcaster.gpu_check_service "${args[@]+"${args[@]}"}" ;;
  *) echo "unknown --mode $mode (auto, engine, service)" >&2; exit 2 ;;
esac
