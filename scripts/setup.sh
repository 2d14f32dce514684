#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with everything the server and
# the tests need: torch, the package itself with its [test] extra, and the tritonserver binary
# shipped in the nvidia-pytriton wheel (with its Python-backend stub put in place).
# Idempotent: a second run with an unchanged pyproject.toml returns in about a second.
#
# Environment:
#   PYTHON         interpreter used to create the venv (default: python3)
#   TORCH_SPEC     pip requirement for torch when the venv has none (default: torch==2.13.0,
#                  the CPU build on our CPU machines); set it to e.g. "torch" to take any build
#   CHROMA_VENV    where the venv lives (default: <repo>/.venv)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${CHROMA_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTRITON_SPEC=${PYTRITON_SPEC:-nvidia-pytriton==0.7.0}

log() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

stamp="$VENV/.chroma-setup-stamp"
want=$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import chroma_triton, torch" 2>/dev/null; then
  exit 0
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
  log "installing $TORCH_SPEC"
  "${PIP[@]}" "$TORCH_SPEC"
fi

log "installing chroma-triton and its test dependencies"
"${PIP[@]}" -e "$ROOT[test]"

# The tritonserver binary (Triton 2.51) and the Python backend come from the nvidia-pytriton wheel.
# Its own Python package wants numpy<2 and more; only the binary is used, so install it without deps.
if ! "$PY" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('pytriton') else 1)"; then
  log "installing $PYTRITON_SPEC (tritonserver binary, --no-deps)"
  "${PIP[@]}" --no-deps "$PYTRITON_SPEC"
fi
"$PY" - <<'PYEOF'
import os, shutil, sys, importlib.util
root = os.path.dirname(importlib.util.find_spec("pytriton").origin)
stub = os.path.join(root, "tritonserver", "python_backend_stubs",
                    f"{sys.version_info.major}.{sys.version_info.minor}", "triton_python_backend_stub")
dest = os.path.join(root, "tritonserver", "backends", "python", "triton_python_backend_stub")
if not os.path.exists(stub):
    sys.exit(f"no Triton Python-backend stub for Python {sys.version_info.major}.{sys.version_info.minor} in nvidia-pytriton")
if not os.path.exists(dest) or os.path.getsize(dest) != os.path.getsize(stub):
    shutil.copy2(stub, dest)
    os.chmod(dest, 0o755)
PYEOF

echo "$want" > "$stamp"
log "ready: $VENV"
