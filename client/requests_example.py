"""The seed server's `requests` example, against this project's assets.

The reference voice goes as base64 (``prompt_audio``) with its transcript (``prompt_text``);
the question is named by path (the server reads files only inside its allowed media folders,
the project's ``assets/`` by default).  The reply's base64 WAV is saved to ``reply.wav``.

    python client/requests_example.py [--url http://localhost:8000] [--out reply.wav]
"""

import argparse
import base64
import os
from pathlib import Path

import requests

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def load_audio_as_base64(file_path):
    with open(file_path, "rb") as f:
        return base64.b64encode(f.read()).decode("utf-8")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("CHROMA_URL", "http://localhost:8000"))
    parser.add_argument("--out", default="reply.wav")
    parser.add_argument("--max-tokens", type=int, default=200, help="audio frames of 80 ms")
    args = parser.parse_args()

    url = f"{args.url}/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    if os.environ.get("CHROMA_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['CHROMA_API_KEY']}"

    payload = {
        "model": "chroma",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Please respond to my question."},
                    {"type": "audio", "audio": "assets/question_audio.wav"},
                ],
            },
        ],
        "prompt_text": (ASSETS / "ref_audio.txt").read_text().strip(),
        "prompt_audio": load_audio_as_base64(ASSETS / "ref_audio.wav"),
        "max_tokens": args.max_tokens,
        "temperature": 1.0,
        "return_audio": True,
    }

    response = requests.post(url, json=payload, headers=headers, timeout=600)
    result = response.json()
    if response.status_code != 200:
        raise SystemExit(f"HTTP {response.status_code}: {result['error']['message']}")

    if result.get("audio"):
        with open(args.out, "wb") as f:
            f.write(base64.b64decode(result["audio"]))
        print(f"Audio saved to {args.out}")

    print("Reply text:", result["choices"][0]["message"]["content"])
    print("Finish reason:", result["choices"][0]["finish_reason"], "| usage:", result["usage"])


if __name__ == "__main__":
    main()
