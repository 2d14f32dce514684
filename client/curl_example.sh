#!/usr/bin/env bash
# The seed server's curl example, against this project's assets: a spoken question
# (assets/question_audio.wav) and a reference voice to clone (assets/ref_audio.wav + its
# transcript).  The files are named by path, as the seed's example does: the server reads them
# because it allows the project's assets/ folder (--allowed-local-media-path).  The reply JSON
# goes to reply.json; its "audio" (base64 WAV) is decoded into reply.wav.
#
#   bash client/curl_example.sh                      # server at http://localhost:8000
#   CHROMA_URL=http://host:port MAX_TOKENS=50 OUT=/tmp/reply.wav bash client/curl_example.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
URL=${CHROMA_URL:-http://localhost:8000}
MAX_TOKENS=${MAX_TOKENS:-200}
OUT=${OUT:-reply.wav}
JSON=${OUT%.*}.json
PYTHON=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
AUTH=()
if [ -n "${CHROMA_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer $CHROMA_API_KEY"); fi
PROMPT_TEXT=$(cat "$ROOT/assets/ref_audio.txt")

curl -sS --fail-with-body -X POST "$URL/v1/chat/completions" \
  -H "Content-Type: application/json" "${AUTH[@]}" \
  -o "$JSON" \
  -d @- <<JSON
{
  "model": "chroma",
  "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": [{"type": "audio", "audio": "assets/question_audio.wav"}]}
  ],
  "prompt_text": "$PROMPT_TEXT",
  "prompt_audio": "assets/ref_audio.wav",
  "max_tokens": $MAX_TOKENS,
  "temperature": 1.0,
  "return_audio": true
}
JSON

"$PYTHON" - "$JSON" "$OUT" <<'PY'
import base64, json, sys
reply = json.load(open(sys.argv[1]))
open(sys.argv[2], "wb").write(base64.b64decode(reply["audio"]))
print("reply text:", reply["choices"][0]["message"]["content"])
print("usage:", reply["usage"])
print("audio saved to", sys.argv[2])
PY
