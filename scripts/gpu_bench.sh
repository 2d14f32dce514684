#!/usr/bin/env bash
# The GPU benchmark procedure behind docs/benchmarks.md, one step per call (each fits the 10-minute
# limit of a lent GPU machine, which keeps /root between calls while warm):
#
#   bash scripts/gpu_bench.sh env WHEEL_DIR...   # scripts/gpu_env.sh: venv with numpy<2, tritonserver, clients
#   bash scripts/gpu_bench.sh checkpoint         # random `full` checkpoint in $CKPT (skipped when present)
#   bash scripts/gpu_bench.sh engine             # scripts/bench_engine.py (pacing on/off, batch-1 kernel profile)
#   bash scripts/gpu_bench.sh serving [DP] [LEVELS] [extra bench_serving args...]
#                                                # scripts/bench_serving.py --start on DP GPUs
#   bash scripts/gpu_bench.sh perf               # scripts/perf_analyzer.sh against a stack started here
#
# Results go to $OUT (default ./gpu-results). Contexts are sized for 100-frame replies so that 256
# streams fit one H100: thinker 1024, backbone 1536 positions per stream.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu-results}
CKPT=${CKPT:-/root/chroma-full}
ENV=${CHROMA_GPU_ENV:-/root/chroma-env}
PY="$ENV/bin/python"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SERVE_ARGS=(--max-batch 256 --param chroma_lm.thinker_max_len=1024 --param chroma_lm.backbone_max_len=1536)

step=${1:?usage: gpu_bench.sh env|checkpoint|engine|serving|perf ...}
shift
case $step in
  env)
    bash scripts/gpu_env.sh "$@" ;;
  checkpoint)
    [ -f "$CKPT/config.json" ] || "$PY" scripts/make_checkpoint.py --preset full --out "$CKPT" --no-visual ;;
  engine)
    "$PY" scripts/bench_engine.py --model "$CKPT" --concurrency "${LEVELS:-1,8,64,256}" --frames 100 \
      --baseline-frames 20 --profile-frames 16 --out "$OUT/bench_engine.json" 2>&1 | tee "$OUT/bench_engine.log" ;;
  serving)
    dp=${1:-1}; levels=${2:-1,8,64,256}; shift $(( $# < 2 ? $# : 2 ))
    launcher=()
    for a in "${SERVE_ARGS[@]}"; do launcher+=(--launcher-arg="$a"); done
    "$PY" scripts/bench_serving.py --start --model "$CKPT" --dp-size "$dp" --concurrency "$levels" \
      --max-tokens 100 --baseline-frames 20 --workdir "/root/stack-dp$dp" "${launcher[@]}" \
      --out "$OUT/bench_serving_dp$dp.json" "$@" 2>&1 | tee "$OUT/bench_serving_dp$dp.log" ;;
  perf)
    "$PY" -m chroma_triton.serving.launcher --chroma-model-path "$CKPT" "${SERVE_ARGS[@]}" --quiet \
      --workdir /root/stack-perf > "$OUT/perf_stack.log" 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
    for _ in $(seq 1 300); do curl -sf localhost:8000/health >/dev/null && break; sleep 2; done
    PERF_ANALYZER=${PERF_ANALYZER:-perf_analyzer} bash scripts/perf_analyzer.sh -u localhost:8001 \
      -c "${LEVELS:-1 8 64}" -n 100 -o "$OUT/perf_analyzer" 2>&1 | tee "$OUT/perf_analyzer.log" ;;
  *)
    echo "unknown step $step" >&2; exit 2 ;;
esac
