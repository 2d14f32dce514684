"""Stream a spoken reply with the OpenAI Python SDK: print the text and save (or play) the
speech as it arrives.

Each ``chat.completion.chunk`` carries new text in ``delta.content`` and new speech in
``delta.audio.data``: base64 little-endian 16-bit PCM, mono, at ``delta.audio.sample_rate``
(24000 Hz).  The samples are appended to a WAV file as they come (its header is finished when
the stream ends) and, with ``--play``, piped to ``aplay`` or ``ffplay`` if one is installed.

    python client/openai_stream_example.py [--url http://localhost:8000] [--out reply_stream.wav] [--play]
"""

import argparse
import base64
import os
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path

from openai import OpenAI

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SAMPLE_RATE = 24000


def player(rate: int):
    """A process that plays raw PCM16 mono from its stdin, or None."""
    if shutil.which("aplay"):
        cmd = ["aplay", "-q", "-f", "S16_LE", "-c", "1", "-r", str(rate)]
    elif shutil.which("ffplay"):
        cmd = ["ffplay", "-loglevel", "quiet", "-nodisp", "-autoexit", "-f", "s16le", "-ch_layout", "mono",
               "-ar", str(rate), "-"]
    else:
        print("(no aplay/ffplay found: saving only)", file=sys.stderr)
        return None
    return subprocess.Popen(cmd, stdin=subprocess.PIPE)


def audio_data(delta) -> str | None:
    """``delta.audio.data`` (a typed field in recent SDKs, an extra field in older ones)."""
    audio = getattr(delta, "audio", None) or (delta.model_extra or {}).get("audio")
    return audio.get("data") if isinstance(audio, dict) else getattr(audio, "data", None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("CHROMA_URL", "http://localhost:8000"))
    parser.add_argument("--out", default="reply_stream.wav")
    parser.add_argument("--max-tokens", type=int, default=200, help="audio frames of 80 ms")
    parser.add_argument("--voice", default="default", help="a named voice (GET /v1/voices)")
    parser.add_argument("--play", action="store_true", help="also play the audio as it arrives")
    args = parser.parse_args()

    client = OpenAI(api_key=os.environ.get("CHROMA_API_KEY", "dummy"), base_url=f"{args.url}/v1")
    question = base64.b64encode((ASSETS / "question_audio.wav").read_bytes()).decode()

    started = time.perf_counter()
    stream = client.chat.completions.create(
        model="chroma",
        modalities=["text", "audio"],
        audio={"voice": args.voice, "format": "pcm16"},
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": question,
                                                                                       "format": "wav"}}]}],
        max_completion_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )

    speaker = player(SAMPLE_RATE) if args.play else None
    first_audio = None
    samples = 0
    with wave.open(args.out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        for chunk in stream:
            if chunk.usage is not None:
                print(f"\nusage: {chunk.usage}")
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            if delta.content:
                print(delta.content, end="", flush=True)
            data = audio_data(delta)
            if data:
                pcm = base64.b64decode(data)
                first_audio = first_audio or time.perf_counter() - started
                samples += len(pcm) // 2
                wav.writeframes(pcm)
                if speaker is not None:
                    speaker.stdin.write(pcm)
            if chunk.choices[0].finish_reason:
                print(f"\n[finish: {chunk.choices[0].finish_reason}]")
    if speaker is not None:
        speaker.stdin.close()
        speaker.wait()
    print(f"saved {samples / SAMPLE_RATE:.2f} s of audio to {args.out}; first audio after "
          f"{(first_audio or 0) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
