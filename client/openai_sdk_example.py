"""The OpenAI Python SDK against this server, both ways it accepts audio.

1. The seed server's way: an audio part naming a file, the voice to clone in ``extra_body``
   (``prompt_text`` + ``prompt_audio``); the reply audio is the top-level ``audio`` field.
2. OpenAI's official audio-chat way: ``input_audio`` with base64 data, ``modalities`` and
   ``audio={"voice", "format"}`` (a named voice of this server: GET /v1/voices); the reply audio
   is ``choices[0].message.audio.data`` and its transcript ``...audio.transcript``.

    python client/openai_sdk_example.py [--url http://localhost:8000] [--out reply]
"""

import argparse
import base64
import os
from pathlib import Path

from openai import OpenAI

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("CHROMA_URL", "http://localhost:8000"))
    parser.add_argument("--out", default="reply", help="writes <out>_seed.wav and <out>_openai.wav")
    parser.add_argument("--max-tokens", type=int, default=200, help="audio frames of 80 ms")
    parser.add_argument("--voice", default="default")
    args = parser.parse_args()

    client = OpenAI(api_key=os.environ.get("CHROMA_API_KEY", "dummy"), base_url=f"{args.url}/v1")

    # 1. The seed's example, unchanged but for our assets.
    response = client.chat.completions.create(
        model="chroma",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "audio", "audio": "assets/question_audio.wav"}]},
        ],
        max_tokens=args.max_tokens,
        extra_body={
            "prompt_text": (ASSETS / "ref_audio.txt").read_text().strip(),
            "prompt_audio": "assets/ref_audio.wav",
            "return_audio": True,
        },
    )
    seed_audio = response.model_extra["audio"]  # the seed's top-level field
    with open(f"{args.out}_seed.wav", "wb") as f:
        f.write(base64.b64decode(seed_audio))
    print("seed schema   | text:", response.choices[0].message.content)
    print("              | audio:", f"{args.out}_seed.wav", "| usage:", response.usage)

    # 2. OpenAI's audio chat.
    question = base64.b64encode((ASSETS / "question_audio.wav").read_bytes()).decode()
    completion = client.chat.completions.create(
        model="chroma",
        modalities=["text", "audio"],
        audio={"voice": args.voice, "format": "wav"},
        messages=[
            {"role": "user", "content": [
                {"type": "text", "text": "Please answer the question in the recording."},
                {"type": "input_audio", "input_audio": {"data": question, "format": "wav"}},
            ]},
        ],
        max_completion_tokens=args.max_tokens,
    )
    audio = completion.choices[0].message.audio
    with open(f"{args.out}_openai.wav", "wb") as f:
        f.write(base64.b64decode(audio.data))
    print("openai schema | transcript:", audio.transcript)
    print("              | audio:", f"{args.out}_openai.wav", "| id:", audio.id,
          "| finish:", completion.choices[0].finish_reason)


if __name__ == "__main__":
    main()
