#!/usr/bin/env bash
# The GPU benchmark procedure behind docs/benchmarks.md, one step per call (each fits the 10-minute
# limit of a lent GPU machine, which keeps /root between calls while warm):
#
#   bash scripts/gpu_bench.sh env WHEEL_DIR...   # scripts/gpu_env.sh: venv with numpy<2, tritonserver, clients
#   bash scripts/gpu_bench.sh checkpoint         # random `full` checkpoint in $CKPT (skipped when present)
#   bash scripts/gpu_bench.sh env-copy TREE NEW_ENV  # that environment again, importing TREE's code (an older
#                                                # checkout for an A/B; its stacks: CHROMA_GPU_ENV=NEW_ENV, run from TREE)
#   bash scripts/gpu_bench.sh tests              # tests/test_gpu.py (a test blocked 5 min dumps its stacks and exits)
#   bash scripts/gpu_bench.sh engine             # scripts/bench_engine.py (pacing on/off, batch-1 kernel profile;
#                                                # MPS=on: under a private CUDA MPS daemon, see below)
#   bash scripts/gpu_bench.sh launch             # scripts/bench_launch.py: per-kernel and per-step launch costs,
#                                                # the sampler per call (MPS=on: under the private daemon)
#   bash scripts/gpu_bench.sh profile [profile_engine.py args...]
#                                                # scripts/profile_engine.py: a batched step's and a prefill's
#                                                # kernels and host work (TAG=name: file suffix; MPS=on)
#   bash scripts/gpu_bench.sh variants VARIANT... # bench_engine.py --variants: engine options compared
#                                                # (compiled, LEVELS), the best written to $OUT/best_params.txt
#   bash scripts/gpu_bench.sh serving [DP] [LEVELS] [extra bench_serving args...]
#                                                # the stack on DP GPUs, measured by scripts/bench_serving.py,
#                                                # then by scripts/perf_analyzer.sh when PERF_LEVELS is set
#   bash scripts/gpu_bench.sh up NAME GPUS PORT [launcher args...]
#                                                # a stack left running across calls (its own session):
#                                                # GPUS "0" or "0,1" (dp = their count), frontend on PORT,
#                                                # Triton gRPC/metrics/HTTP on PORT+1/+2/+3; log /root/stack-NAME.log
#                                                # (the launcher runs it under CUDA MPS: --cuda-mps off for without)
#   bash scripts/gpu_bench.sh frontend NAME STACK PORT [frontend args...]
#                                                # a second frontend (python -m openai_frontend, e.g.
#                                                # --workers 2) on PORT, in front of stack STACK's
#                                                # tritonserver; bench NAME then drives it (gRPC levels
#                                                # and engine traces are STACK's); log /root/stack-NAME.log
#   bash scripts/gpu_bench.sh wait NAME...       # until those stacks answer (or one died)
#   bash scripts/gpu_bench.sh bench NAME TAG LEVELS [bench_serving args...]
#                                                # measure stack NAME -> $OUT/bench_NAME_TAG.json (+ py-spy files)
#   bash scripts/gpu_bench.sh seq SECONDS NAME:TAG:LEVELS[:CLIENT_PROCS[:VIA]]...
#                                                # bench those in turn (--rounds ${ROUNDS:-2}, via grpc unless
#                                                # VIA), each only if it should end within SECONDS of the
#                                                # start (a lent machine's call limit), printing a few lines each;
#                                                # BENCH_EXTRA: more bench_serving args (e.g. --inline-audio)
#   bash scripts/gpu_bench.sh down NAME...       # stop those stacks
#
# Two stacks, one per GPU, compare two settings on one machine without restarts between runs:
#   up a 0 8000 ; up b 1 8100 --param=chroma_lm.relay_wakeups=every_event ; wait a b ;
#   bench a 1 256 ; bench b 1 256 ; bench a 2 256 ; bench b 2 256
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
SERVE_ARGS=(--triton-http-port=${TRITON_HTTP_PORT:-8080} --max-batch=256 --param=chroma_lm.thinker_max_len=1024 --param=chroma_lm.backbone_max_len=1536)

step=${1:?usage: gpu_bench.sh env|checkpoint|tests|engine|serving ...}
shift

# MPS=on (engine, variants, tests, launch): the step runs as a client of a private CUDA MPS daemon, as the
# launcher's stacks do, with nothing else on the GPU: MPS's own cost at batch 1 apart from the
# codec's kernels running beside the engine's (docs/benchmarks.md run 39: 4.93-4.94 vs 4.65-4.69 ms
# per frame served). Results get the suffix _mps.
SUFFIX=""
if [ "${MPS:-off}" = on ] && [[ $step =~ ^(engine|variants|tests|launch|profile)$ ]]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/gpu-bench-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/gpu-bench-mps/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  echo quit | nvidia-cuda-mps-control 2>/dev/null || true  # one left by a step killed at the call limit
  nvidia-cuda-mps-control -d
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then  # a client counts GPUs within the daemon's (see serving/cuda_mps.py)
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $(( $(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES") - 1 )))
  fi
  SUFFIX=_mps
elif [ "${MPS:-off}" = on ]; then
  echo "MPS=on applies to engine, variants, tests, launch and profile only (stacks: up ... --cuda-mps on|off)" >&2
fi
case $step in
  env)
    bash scripts/gpu_env.sh "$@" ;;
  env-copy)
    # a copy of the environment whose .pth names another checkout, for a stack of older code beside
    # this one (docs/benchmarks.md run 53): env-copy /root/old /root/chroma-env-old, then
    # (cd /root/old && CHROMA_GPU_ENV=/root/chroma-env-old bash scripts/gpu_bench.sh up o 1 8100)
    tree=$(cd "${1:?usage: env-copy TREE NEW_ENV}" && pwd); new=${2:?usage: env-copy TREE NEW_ENV}
    rm -rf "$new" && cp -a "$ENV" "$new"
    site=$(ls -d "$new"/lib/python3*/site-packages)
    printf '%s\n%s\n' "$tree" "$(sed -n 2p "$site/zz_chroma_image.pth")" > "$site/zz_chroma_image.pth"
    (cd / && "$new/bin/python" -c 'import chroma_triton; print("env-copy:", chroma_triton.__file__)') ;;
  checkpoint)
    [ -f "$CKPT/config.json" ] || "$PY" scripts/make_checkpoint.py --preset full --out "$CKPT" --no-visual ;;
  tests)
    "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_gpu.py "$@" 2>&1 | tee "$OUT/test_gpu$SUFFIX.log" ;;
  engine)
    # COMPILE_LEVELS (e.g. 1,64,256): the same levels again on an engine with compile on;
    # PACING / OVERLAP: the modes each level runs with (default on,off / on)
    "$PY" scripts/bench_engine.py --model "$CKPT" --concurrency "${LEVELS:-1,8,64,256}" --frames 100 \
      --pacing "${PACING:-on,off}" --overlap "${OVERLAP:-on}" \
      --baseline-frames 20 --profile-frames 16 --compile-levels "${COMPILE_LEVELS:-}" \
      --out "$OUT/bench_engine$SUFFIX.json" 2>&1 | tee "$OUT/bench_engine$SUFFIX.log" ;;
  profile)
    # where a step's and a prefill's time goes (torch.profiler on the engine's thread, served options):
    # gpu_bench.sh profile --rows 256 --prefills 1,16 [--set prefill_graphs=false] [--spy-s 3]
    spy=$(ls "$ENV"/lib/python3*/site-packages/bin/py-spy 2>/dev/null | head -1 || true)
    PY_SPY=${PY_SPY:-$spy} "$PY" scripts/profile_engine.py --model "$CKPT" --keep-traces "$OUT/traces_profile${TAG:+_$TAG}$SUFFIX" \
      --out "$OUT/profile_engine${TAG:+_$TAG}$SUFFIX.json" "$@" 2>&1 | tee "$OUT/profile_engine${TAG:+_$TAG}$SUFFIX.log" ;;
  launch)
    "$PY" scripts/bench_launch.py --out "$OUT/bench_launch$SUFFIX.json" 2>&1 | tee "$OUT/bench_launch$SUFFIX.log" ;;
  variants)
    "$PY" scripts/bench_engine.py --model "$CKPT" --variants-only --variants "$@" --variant-levels "${LEVELS:-1,64,256}" \
      --variant-repeats "${REPEATS:-2}" --profile-frames 16 --best-params-out "$OUT/best_params$SUFFIX.txt" \
      --out "$OUT/bench_variants$SUFFIX.json" 2>&1 | tee "$OUT/bench_variants$SUFFIX.log" ;;
  serving)
    # start the stack once (launcher, DP GPUs), measure it with bench_serving, then (PERF_LEVELS
    # set) with perf_analyzer, then stop it
    dp=${1:-1}; levels=${2:-1,8,64,256}; shift $(( $# < 2 ? $# : 2 ))
    # shellcheck disable=SC2086  # LAUNCHER_EXTRA: more launcher flags, e.g. "--thinker-backend sglang"
    "$PY" -m chroma_triton.serving.launcher --chroma-model-path "$CKPT" --dp-size "$dp" "${SERVE_ARGS[@]}" ${LAUNCHER_EXTRA:-} \
      --quiet --workdir "/root/stack-dp$dp" > "$OUT/stack_dp$dp.log" 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
    t0=$(date +%s)
    until curl -sf localhost:8000/health >/dev/null; do
      kill -0 $pid 2>/dev/null || { echo "stack exited"; tail -40 "$OUT/stack_dp$dp.log"; exit 1; }
      sleep 2
    done
    echo "stack dp$dp ready in $(( $(date +%s) - t0 )) s"
    "$PY" scripts/bench_serving.py --model "$CKPT" --frontend-url http://localhost:8000 --grpc-url localhost:8001 \
      --metrics-url http://localhost:8002/metrics --concurrency "$levels" --max-tokens 100 --baseline-frames 20 \
      --client-procs "${CLIENT_PROCS:-8}" \
      --out "$OUT/bench_serving_dp$dp.json" "$@" 2>&1 | tee "$OUT/bench_serving_dp$dp.log"
    if [ -n "${PERF_LEVELS:-}" ]; then
      pa=$(ls "$ENV"/lib/python3*/site-packages/bin/perf_analyzer 2>/dev/null | head -1)
      printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$PY" "$pa" > /tmp/perf_analyzer && chmod +x /tmp/perf_analyzer
      PERF_ANALYZER=${PERF_ANALYZER:-/tmp/perf_analyzer} \
        bash scripts/perf_analyzer.sh -u localhost:8001 -c "$PERF_LEVELS" -n 100 -o "$OUT/perf_analyzer" \
        2>&1 | tee "$OUT/perf_analyzer.log" || echo "perf_analyzer failed"
    fi ;;
  up)
    name=${1:?usage: up NAME GPUS PORT [launcher args...]}; gpus=${2:?GPUS}; port=${3:?PORT}; shift 3
    dp=$(awk -F, '{print NF}' <<<"$gpus")
    printf 'PORT=%s\nDP=%s\nGPUS=%s\nARGS="%s"\n' "$port" "$dp" "$gpus" "$*" > "/root/stack-$name.env"
    # setsid: the stack outlives this call (a lent machine keeps it while warm)
    # every instance traces its admissions and late chunks (chroma_triton/engine/trace.py), and
    # codec_decoder its executes (chroma_triton/serving/codec_trace.py); bench empties the files
    # before its levels and copies them next to its results (one bench call's levels share a file:
    # give each level its own call to read them apart)
    CUDA_VISIBLE_DEVICES=$gpus setsid nohup "$PY" -m chroma_triton.serving.launcher --chroma-model-path "$CKPT" \
      --dp-size "$dp" "${SERVE_ARGS[@]}" --param="chroma_lm.trace_path=/root/trace-$name-{device}_{instance}.jsonl" \
      --param="codec_decoder.trace_path=/root/codectrace-$name-{device}_{instance}.jsonl" \
      --port "$port" --triton-grpc-port $((port + 1)) \
      --triton-metrics-port $((port + 2)) --triton-http-port $((port + 3)) "$@" \
      --quiet --workdir "/root/stack-$name" > "/root/stack-$name.log" 2>&1 < /dev/null &
    echo "stack $name: GPUs $gpus, frontend :$port, launcher pid $!" ;;
  frontend)
    name=${1:?usage: frontend NAME STACK PORT [frontend args...]}; stack=${2:?STACK}; port=${3:?PORT}; shift 3
    source "/root/stack-$stack.env"
    printf 'PORT=%s\nGRPC=%s\nMETRICS=%s\nTRACE=%s\nDP=%s\nGPUS=%s\nARGS="frontend of stack %s: %s"\n' \
      "$port" $((PORT + 1)) $((PORT + 2)) "$stack" "$DP" "$GPUS" "$stack" "$*" > "/root/stack-$name.env"
    mkdir -p "/root/stack-$name"
    # the last media folder names /root/stack-NAME/ on the command line: bench's --server-match and down find it
    setsid nohup "$PY" -m openai_frontend --port "$port" --triton-grpc-url "localhost:$((PORT + 1))" \
      --allowed-local-media-path "$ROOT/assets" "$@" --allowed-local-media-path "/root/stack-$name/" \
      > "/root/stack-$name.log" 2>&1 < /dev/null &
    echo "frontend $name: :$port in front of stack $stack (gRPC :$((PORT + 1))), pid $!" ;;
  wait)
    t0=$(date +%s)
    for name in "$@"; do
      source "/root/stack-$name.env"
      until curl -sf "localhost:$PORT/health" >/dev/null; do
        if ! pgrep -f "/root/stack-$name(/| |$)" >/dev/null; then echo "stack $name exited"; tail -40 "/root/stack-$name.log"; exit 1; fi
        sleep 2
      done
      echo "stack $name ready after $(( $(date +%s) - t0 )) s"
    done ;;
  bench)
    name=${1:?usage: bench NAME TAG LEVELS [bench_serving args...]}; tag=${2:?TAG}; levels=${3:?LEVELS}; shift 3
    GRPC="" METRICS="" TRACE=""
    source "/root/stack-$name.env"
    GRPC=${GRPC:-$((PORT + 1))} METRICS=${METRICS:-$((PORT + 2))} TRACE=${TRACE:-$name}
    spy=$(ls "$ENV"/lib/python3*/site-packages/bin/py-spy 2>/dev/null | head -1 || true)
    mkdir -p "$OUT/$name"
    for f in /root/trace-"$TRACE"-*.jsonl /root/codectrace-"$TRACE"-*.jsonl; do [ -f "$f" ] && : > "$f"; done  # appended to: this call's alone
    PY_SPY=$spy "$PY" scripts/bench_serving.py --model "$CKPT" --frontend-url "http://localhost:$PORT" \
      --grpc-url "localhost:$GRPC" --metrics-url "http://localhost:$METRICS/metrics" \
      --concurrency "$levels" --max-tokens 100 --baseline-frames 0 --client-procs "${CLIENT_PROCS:-8}" \
      --server-match "/root/stack-$name" --note "stack $name: GPUs $GPUS, $ARGS" --out "$OUT/$name/bench_${name}_$tag.json" "$@" 2>&1 \
      | tee "$OUT/$name/bench_${name}_$tag.log" | grep -v '^|'
    sleep 1  # the engine flushes its trace when it goes idle
    for f in /root/trace-"$TRACE"-*.jsonl; do
      [ -f "$f" ] || continue
      cp "$f" "$OUT/$name/trace_${name}_${tag}_$(basename "$f" .jsonl | sed "s/^trace-$TRACE-//").jsonl"
    done
    for f in /root/codectrace-"$TRACE"-*.jsonl; do
      [ -f "$f" ] && cp "$f" "$OUT/$name/codectrace_${name}_${tag}_$(basename "$f" .jsonl | sed "s/^codectrace-$TRACE-//").jsonl"
    done
    "$PY" scripts/engine_trace_summary.py "$OUT/$name"/trace_"${name}_${tag}"_*.jsonl 2>/dev/null \
      | tee -a "$OUT/$name/bench_${name}_$tag.log" || true ;;
  seq)
    # levels above 256 streams take longer: ~80 s for 512 x 2 requests, ~50 s for 256 x 2 (H100)
    budget=${1:?usage: seq SECONDS NAME:TAG:LEVELS[:CLIENT_PROCS[:VIA]]...}; shift
    t0=$(date +%s)
    for item in "$@"; do
      IFS=: read -r name tag levels procs via <<<"$item"
      need=$(( ${levels##*,} > 256 ? 80 : 50 ))
      if (( $(date +%s) - t0 + need > budget )); then echo "seq: $item skipped (no time left)"; continue; fi
      CLIENT_PROCS=${procs:-${CLIENT_PROCS:-8}} bash "$0" bench "$name" "$tag" "$levels" --via "${via:-grpc}" \
        --rounds "${ROUNDS:-2}" ${BENCH_EXTRA:-} > "$OUT/seq_${name}_$tag.log" 2>&1 || echo "seq: $item failed (see $OUT/seq_${name}_$tag.log)"
      echo "== $item"
      grep -E "^(grpc|frontend) x[0-9]+:|^  (engine|encoder and codec):|^  (prefill time|over the pacer|chunk [12]:|late chunks' windows|garbage|relay passes)" \
        "$OUT/seq_${name}_$tag.log" || true
    done
    echo "seq: done after $(( $(date +%s) - t0 )) s" ;;
  down)
    for name in "$@"; do
      # `up` and `frontend` start each stack in its own session: signal the whole process group, so
      # that uvicorn's worker processes (whose command lines name no stack) go too; never our own
      # group (a caller whose command line names the stack); wait up to 30 s for the launcher's own
      # shutdown (frontend, tritonserver, the MPS daemon) before killing what is left
      own=$(ps -o pgid= -p $$ | tr -d ' ')
      groups=$(for pid in $(pgrep -f "/root/stack-$name(/| |$)" || true); do ps -o pgid= -p "$pid" || true; done \
               | tr -d ' ' | sort -u | grep -vx "$own" || true)
      for g in $groups; do kill -TERM -- "-$g" 2>/dev/null || true; done
      for _ in $(seq 30); do
        alive=0; for g in $groups; do pgrep -g "$g" >/dev/null && alive=1; done
        [ $alive = 0 ] && break; sleep 1
      done
      for g in $groups; do kill -KILL -- "-$g" 2>/dev/null || true; done
    done ;;
  *)
    echo "unknown step $step" >&2; exit 2 ;;
esac
