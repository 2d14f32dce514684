"""Talk to Triton over HTTP: health and model metadata with ``tritonclient.http``, then a reply
through Triton's ``generate_stream`` endpoint (server-sent events).

HTTP ``/infer`` cannot call a decoupled model such as ``chroma`` (one request, many
responses); ``generate_stream`` can.  It takes JSON, so this example sends text only (no binary
user audio) and ``prompt_audio: ""`` (the server's default voice); for audio input use gRPC
(``triton_grpc_stream_example.py``) or the OpenAI frontend. ``generate_stream`` cannot name a
conversation (Triton 2.51 takes no sequence fields there), so it needs a server started without
``--conversation-affinity on``.

    python client/triton_http_example.py [--url localhost:8080] [--out reply_http.wav]
"""

import argparse
import json
import os
import wave

import numpy as np
import requests
import tritonclient.http as httpclient

SAMPLE_RATE = 24000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("TRITON_HTTP_URL", "localhost:8080"),
                        help="Triton's HTTP endpoint, host:port")
    parser.add_argument("--out", default="reply_http.wav")
    parser.add_argument("--max-tokens", type=int, default=200, help="audio frames of 80 ms")
    args = parser.parse_args()

    client = httpclient.InferenceServerClient(args.url)
    print("server ready:", client.is_server_ready(), "| model ready:", client.is_model_ready("chroma"))
    metadata = client.get_model_metadata("chroma")
    print("inputs:", ", ".join(f"{i['name']} {i['datatype']}{i['shape']}" for i in metadata["inputs"]))
    print("outputs:", ", ".join(f"{o['name']} {o['datatype']}{o['shape']}" for o in metadata["outputs"]))

    messages = [{"role": "user", "content": "Hello! What can you tell me about tacos?"}]
    body = {
        "messages": json.dumps(messages),
        "prompt_audio": "",  # the server's default voice
        "prompt_text": "",
        "max_tokens": args.max_tokens,
        "temperature": 1.0,
        "top_k": -1,
        "top_p": 1.0,
        "seed": -1,
    }
    text, audio = [], []
    with requests.post(f"http://{args.url}/v2/models/chroma/generate_stream", json=body, stream=True,
                       timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[len(b"data: "):])
            if "error" in event:
                raise SystemExit(f"Triton error: {event['error']}")
            delta = event.get("text") or ""
            print(delta, end="", flush=True)
            text.append(delta)
            audio.append(np.asarray(event.get("audio") or [], dtype=np.float32).reshape(-1))  # [1, samples]
            if event.get("finish_reason"):
                print(f"\n[finish: {event['finish_reason']}; usage {event.get('usage')}]")

    pcm = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    with wave.open(args.out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes((np.clip(pcm, -1, 1) * 32767).round().astype("<i2").tobytes())
    print(f"saved {len(pcm) / SAMPLE_RATE:.2f} s of audio to {args.out}")


if __name__ == "__main__":
    main()
