#!/usr/bin/env bash
# The full reliability measurements of docs/reliability.md, one after the other (each starts and
# stops its own servers on free loopback ports; about 5 minutes on 2 otherwise idle CPU cores):
#   fuzz  - schemathesis, every operation, >= 500 cases       -> $OUT/fuzz.json
#   soak  - 200 concurrent streams x 3 rounds, 30% hang up     -> $OUT/soak.json
#   faults - kill -9 of each model process and of tritonserver -> $OUT/faults.json
# Usage: bash scripts/reliability/run_all.sh [OUT_DIR]   (default: $TMPDIR/chroma-reliability)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${1:-${TMPDIR:-/tmp}/chroma-reliability}
PY=${CHROMA_PYTHON:-$ROOT/.venv/bin/python}
mkdir -p "$OUT"
cd "$ROOT"
status=0
"$PY" scripts/reliability/fuzz.py --max-examples 250 --report "$OUT/fuzz.json" > "$OUT/fuzz.log" 2>&1 || status=1
"$PY" scripts/reliability/soak.py --streams 200 --rounds 3 --disconnect 0.3 --report "$OUT/soak.json" > "$OUT/soak.log" 2>&1 || status=1
"$PY" scripts/reliability/faults.py --report "$OUT/faults.json" > "$OUT/faults.log" 2>&1 || status=1
echo "reports in $OUT (exit $status)"
exit $status
