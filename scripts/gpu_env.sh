#!/usr/bin/env bash
# Build, on an offline GPU machine whose python3 already has CUDA torch and transformers (our lent
# H100 machines, an NGC PyTorch container), the environment the whole stack runs in, from wheels
# carried there (no package index needed):
#
#   bash scripts/gpu_env.sh WHEEL_DIR [WHEEL_DIR ...]      # prints the python to run everything with
#
# Why not just pip install into that python: the Triton Python backend (tritonserver 2.51, from the
# nvidia-pytriton wheel) needs numpy < 2, while such images ship numpy 2, and the backend's stub
# takes its packages from the Python environment first on PATH (PYTHONPATH does not reach it).
# So this makes a venv ($CHROMA_GPU_ENV, default /root/chroma-env) whose own site-packages hold
# the carried wheels (numpy 1.26, nvidia-pytriton, tritonclient, fastapi, ...), and which reaches
# the image's torch/transformers through a .pth file placed after them, plus this checkout.
# Start the launcher with that venv's python: tritonserver, every model stub and the frontend then
# share it (the launcher passes its own prefix to tritonserver's PATH).
# Idempotent: a second run only reinstalls the wheels.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENV=${CHROMA_GPU_ENV:-/root/chroma-env}
BASE_PY=${BASE_PYTHON:-python3}
[ $# -ge 1 ] || { echo "usage: $0 WHEEL_DIR [WHEEL_DIR ...]" >&2; exit 2; }
log() { echo "[gpu_env] $*" >&2; }

base_site=$("$BASE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$BASE_PY" -c 'import torch, transformers' || { log "$BASE_PY lacks torch/transformers"; exit 1; }
[ -x "$ENV/bin/python" ] || "$BASE_PY" -m venv --without-pip "$ENV"
site=$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
wheels=()
for d in "$@"; do wheels+=("$d"/*.whl); done
log "installing ${#wheels[@]} wheels into $site"
"$BASE_PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "${wheels[@]}"
# after the venv's own packages: this checkout, then the image's packages (torch, transformers, ...)
printf '%s\n%s\n' "$ROOT" "$base_site" > "$site/zz_chroma_image.pth"
stubs="$site/pytriton/tritonserver/python_backend_stubs/$("$ENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if [ -d "$stubs" ]; then
  cp "$stubs/triton_python_backend_stub" "$site/pytriton/tritonserver/backends/python/"
fi
"$ENV/bin/python" - <<'EOF' >&2
import numpy, torch, transformers
print(f"[gpu_env] numpy {numpy.__version__}, torch {torch.__version__} (cuda {torch.cuda.is_available()}), "
      f"transformers {transformers.__version__}")
from chroma_triton.serving.tritonserver import find_tritonserver
print(f"[gpu_env] tritonserver: {find_tritonserver().binary}")
EOF
echo "$ENV/bin/python"
