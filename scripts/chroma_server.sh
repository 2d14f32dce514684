#!/usr/bin/env bash
# Serve Chroma on Triton: render the model repository, start tritonserver (the NGC binary when
# present, else the one in the nvidia-pytriton wheel), wait until it is ready, start the
# OpenAI-compatible frontend, and stop both on Ctrl-C / SIGTERM.
#
#   scripts/chroma_server.sh [--host 0.0.0.0] [--port 8000] [--chroma-model-path PATH]
#                            [--base-qwen-path PATH] [--dp-size 1] [--workers 2xDP]
#                            [--triton-http-port 8080] [--triton-grpc-port 8001]
#                            [--triton-metrics-port 8002] [--dry-run] [--no-frontend] ...
#
# `--help` lists every flag. The logic lives in chroma_triton/serving/launcher.py.
#
# Environment:
#   CHROMA_PYTHON      interpreter to run (default: the project venv, set up by scripts/setup.sh;
#                      in the Docker image: the system python3, where the project is installed)
#   CHROMA_SKIP_SETUP  1: do not run scripts/setup.sh (the Docker image sets it)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ -n "${CHROMA_PYTHON:-}" ]; then
  PY=$CHROMA_PYTHON
else
  if [ "${CHROMA_SKIP_SETUP:-0}" != "1" ]; then
    bash "$ROOT/scripts/setup.sh"
  fi
  PY="${CHROMA_VENV:-$ROOT/.venv}/bin/python"
fi
if [ -x "$(dirname "$PY")/activate" ] || [ -f "$(dirname "$PY")/activate" ]; then
  # tritonserver's Python stubs take their packages from the *active* environment
  export VIRTUAL_ENV
  VIRTUAL_ENV=$(cd "$(dirname "$PY")/.." && pwd)
  export PATH="$VIRTUAL_ENV/bin:$PATH"
fi
cd "$ROOT"
exec "$PY" -m chroma_triton.serving.launcher "$@"
