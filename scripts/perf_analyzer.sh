#!/usr/bin/env bash
# perf_analyzer recipe for the `chroma` ensemble over gRPC streaming (it is decoupled: one request,
# many streamed responses, so perf_analyzer needs --streaming).
#
#   scripts/perf_analyzer.sh [-u localhost:8001] [-c "1 8 64 256"] [-n 100] [-o perf_analyzer_out] [-- extra args]
#
#   -u  Triton gRPC endpoint                                   (default localhost:8001)
#   -c  concurrencies, one perf_analyzer run each               (default "1 8 64 256")
#   -n  max_tokens: audio frames of 80 ms per reply             (default 100)
#   -o  output folder: input_data.json, c<N>.csv (perf_analyzer's -f report with --verbose-csv),
#       c<N>.profile.json (per-request send/response timestamps), c<N>.log (what it printed)
#   -w  measurement windows per concurrency (>= 3), each at least max(2*N, 4) requests (default: 3 windows)
#   after --: passed to perf_analyzer as is (e.g. --collect-metrics --metrics-url localhost:8002/metrics)
#
# The input data is the README example: messages = one user turn with audio part 0, user_audio =
# assets/question_audio.wav, prompt_audio/prompt_text = assets/ref_audio.wav and its transcript
# (the server's cached default voice), temperature 1, top_k -1 (the checkpoint's), one entry per
# seed 0..7 (perf_analyzer cycles through them). BYTES inputs go in as {"b64": ...} holding Triton's
# serialized form (4-byte little-endian length + bytes), which perf_analyzer sends unchanged.
#
# perf_analyzer's numbers are per request (reply) and per response, not per second of audio: its
# "infer/sec" is replies per second, "Response Throughput" streamed responses per second (text-only
# responses included). For a decoupled model 2.41 prints "using the first response for measuring
# latency", yet the latencies it printed here matched each request's *last* response in the profile
# export. So after each run this script reads the export (every response's timestamp) and prints
# time to first and to last response, p50/p90/p99. The first response may carry text only; TTFA,
# RTF and underruns come from scripts/bench_serving.py.
#
# Binary: $PERF_ANALYZER, else `perf_analyzer` on PATH (pip install perf-analyzer: 2.60 needs
# glibc >= 2.38, e.g. Ubuntu 24.04; the GPU machines have it). docs/benchmarks.md says more.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
URL=localhost:8001
LEVELS="1 8 64 256"
MAX_TOKENS=100
OUT=perf_analyzer_out
WINDOWS=3
while getopts "u:c:n:o:w:h" opt; do
  case $opt in
    u) URL=$OPTARG ;;
    c) LEVELS=$OPTARG ;;
    n) MAX_TOKENS=$OPTARG ;;
    o) OUT=$OPTARG ;;
    w) WINDOWS=$OPTARG ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
if [ "$WINDOWS" -lt 3 ]; then
  # perf_analyzer judges stability over the last 3 windows: with fewer it always fails
  # ("Failed to obtain stable measurement within 2 measurement windows", seen on the H100)
  echo "-w must be at least 3 (perf_analyzer compares the last 3 windows)" >&2; exit 2
fi

PA=${PERF_ANALYZER:-$(command -v perf_analyzer || true)}
if [ -z "$PA" ]; then
  echo "no perf_analyzer: set PERF_ANALYZER=/path/to/perf_analyzer or put it on PATH (pip install perf-analyzer)" >&2
  exit 2
fi
PY=${CHROMA_PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"

"$PY" - "$ROOT" "$OUT/input_data.json" "$MAX_TOKENS" <<'PYEOF'
import base64, json, struct, sys
from pathlib import Path

root, target, max_tokens = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
assets = root / "assets"


def text_or_bytes(value):
    """A one-element BYTES tensor in Triton's serialized form, base64 for the JSON."""
    raw = value.encode() if isinstance(value, str) else value
    return {"b64": base64.b64encode(struct.pack("<I", len(raw)) + raw).decode(), "shape": [1]}


fixed = {
    "messages": text_or_bytes(json.dumps([{"role": "user", "content": [{"type": "audio", "audio_index": 0}]}])),
    "user_audio": text_or_bytes((assets / "question_audio.wav").read_bytes()),
    "prompt_audio": text_or_bytes((assets / "ref_audio.wav").read_bytes()),
    "prompt_text": text_or_bytes((assets / "ref_audio.txt").read_text().strip()),
    "max_tokens": {"content": [max_tokens], "shape": [1]},
    "temperature": {"content": [1.0], "shape": [1]},
    "top_k": {"content": [-1], "shape": [1]},
    "top_p": {"content": [1.0], "shape": [1]},
}
data = [{**fixed, "seed": {"content": [seed], "shape": [1]}} for seed in range(8)]
Path(target).write_text(json.dumps({"data": data}))
print(f"wrote {target}: {len(data)} requests, {max_tokens} frames each")
PYEOF

echo "perf_analyzer: $PA ($("$PA" --version 2>&1 | head -1))"
for c in $LEVELS; do
  count=$(( 2 * c > 4 ? 2 * c : 4 ))
  echo "== concurrency $c ($count requests per window) =="
  "$PA" -m chroma -i grpc -u "$URL" --streaming --async \
    --input-data "$OUT/input_data.json" \
    --concurrency-range "$c:$c" \
    --measurement-mode count_windows --measurement-request-count "$count" \
    --max-trials "$WINDOWS" --stability-percentage 999 \
    -f "$OUT/c$c.csv" --verbose-csv --profile-export-file "$OUT/c$c.profile.json" \
    "$@" 2>&1 | tee "$OUT/c$c.log"
  set +e  # a summary that fails must not stop the remaining concurrencies
  "$PY" - "$OUT/c$c.profile.json" <<'PYEOF' | tee -a "$OUT/c$c.log"
import json, sys
import numpy as np

# the export holds the responses' outputs too, raw bytes included (not always valid UTF-8)
with open(sys.argv[1], "rb") as f:
    export = json.loads(f.read().decode("utf-8", "replace"), strict=False)
requests = [r for e in export["experiments"] for r in e["requests"]]
first = [(r["response_timestamps"][0] - r["timestamp"]) / 1e6 for r in requests if r["response_timestamps"]]
last = [(r["response_timestamps"][-1] - r["timestamp"]) / 1e6 for r in requests if r["response_timestamps"]]
p = lambda xs: "/".join(f"{np.percentile(xs, q):.0f}" for q in (50, 90, 99)) if xs else "-"
print(f"profile export: {len(requests)} requests; first response ms p50/p90/p99 {p(first)}; "
      f"last response ms {p(last)}; responses per request p50 "
      f"{np.median([len(r['response_timestamps']) for r in requests]) if requests else '-'}")
PYEOF
  [ "${PIPESTATUS[0]}" -eq 0 ] || echo "could not read $OUT/c$c.profile.json (perf_analyzer's own report above stands)"
  set -e
done
echo "reports in $OUT/"
