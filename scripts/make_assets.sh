#!/usr/bin/env bash
# (Re)create the project's own speech assets under assets/ with espeak-ng + sox.
#
# Everything here is synthesized locally from the texts below, so the files carry the project's
# license (Apache-2.0) and nothing is copied from a third-party data set.  The output is
# deterministic: espeak-ng has no randomness and sox runs in repeatable mode (-R) without dither (-D),
# so rerunning the script reproduces the committed files byte for byte (for the same tool versions).
#
# Needs: espeak-ng, sox  (Debian/Ubuntu: apt-get install -y espeak-ng sox)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ASSETS="$ROOT/assets"

for tool in espeak-ng sox; do
    command -v "$tool" >/dev/null || { echo "make_assets: '$tool' not found; apt-get install -y espeak-ng sox" >&2; exit 1; }
done

QUESTION_TEXT="Hi! Can you tell me a good recipe for tacos tonight?"
DEFAULT_TEXT="Hello, this is the default voice of the Chroma demo server. It was made with a speech synthesizer."
BRIGHT_TEXT="Hi there! I am the bright voice. I speak a little faster and a little higher than the others."
DEEP_TEXT="Good evening. I am the deep voice, slow and low, for calm and steady answers."

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# speak OUT RATE TEXT [espeak-ng options...]
# Synthesizes TEXT, trims leading/trailing silence, keeps 0.15 s of padding at both ends,
# normalizes the peak to -3 dBFS and writes a mono PCM16 WAV at RATE.
speak() {
    local out=$1 rate=$2 text=$3
    shift 3
    espeak-ng "$@" -w "$WORK/raw.wav" "$text"
    sox -R -D "$WORK/raw.wav" -r "$rate" -c 1 -b 16 -e signed-integer "$out" \
        silence 1 0.02 0.5% reverse silence 1 0.02 0.5% reverse \
        pad 0.15 0.15 norm -3
}

# write_text FILE TEXT: one line, no trailing spaces, ending in a newline.
write_text() {
    printf '%s\n' "$2" >"$1"
}

mkdir -p "$ASSETS/voices"

# The user's question (input to the speech-to-speech model): 16 kHz, like a typical microphone upload.
speak "$ASSETS/question_audio.wav" 16000 "$QUESTION_TEXT" -v en-us -s 160
write_text "$ASSETS/question_audio.txt" "$QUESTION_TEXT"

# The reference voice for cloning: 24 kHz, the Mimi codec's rate.
speak "$ASSETS/ref_audio.wav" 24000 "$DEFAULT_TEXT" -v en-us -s 165
write_text "$ASSETS/ref_audio.txt" "$DEFAULT_TEXT"

# Named voices served by the frontend; "default" is the reference voice above.
cp "$ASSETS/ref_audio.wav" "$ASSETS/voices/default.wav"
cp "$ASSETS/ref_audio.txt" "$ASSETS/voices/default.txt"

speak "$ASSETS/voices/bright.wav" 24000 "$BRIGHT_TEXT" -v en-us+f3 -p 70 -s 175
write_text "$ASSETS/voices/bright.txt" "$BRIGHT_TEXT"

speak "$ASSETS/voices/deep.wav" 24000 "$DEEP_TEXT" -v en-gb+m3 -p 25 -s 140
write_text "$ASSETS/voices/deep.txt" "$DEEP_TEXT"

for f in "$ASSETS/question_audio.wav" "$ASSETS/ref_audio.wav" "$ASSETS"/voices/*.wav; do
    printf '%-40s %6s Hz  %5.2f s  %7d bytes\n' "${f#"$ROOT"/}" "$(soxi -r "$f")" "$(soxi -D "$f")" "$(stat -c %s "$f")"
done
