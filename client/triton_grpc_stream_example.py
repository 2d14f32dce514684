"""Talk to the Triton ensemble ``chroma`` directly over gRPC streaming (no OpenAI frontend).

``chroma`` is decoupled: one request, many responses.  Each response carries the new reply text
(``text``), new speech (``audio``: float32 PCM, 24 kHz mono, seamless when concatenated) and, on
the last data response, ``finish_reason`` and ``usage`` (prompt tokens, text tokens, audio
frames); then an empty response with the final flag ends the request.

    python client/triton_grpc_stream_example.py [--url localhost:8001] [--out reply_grpc.wav]
"""

import argparse
import json
import os
import queue
import wave
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SAMPLE_RATE = 24000


def tensor(name, datatype, values):
    array = np.array(values, dtype=np.object_ if datatype == "BYTES" else None)
    if datatype != "BYTES":
        array = array.astype({"INT32": np.int32, "INT64": np.int64, "FP32": np.float32}[datatype])
    item = grpcclient.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("TRITON_GRPC_URL", "localhost:8001"))
    parser.add_argument("--out", default="reply_grpc.wav")
    parser.add_argument("--max-tokens", type=int, default=200, help="audio frames of 80 ms")
    args = parser.parse_args()

    # Audio parts point into the user_audio list; prompt_audio b"" = the server's default voice.
    messages = [{"role": "user", "content": [{"type": "text", "text": "Please answer this."},
                                             {"type": "audio", "audio_index": 0}]}]
    inputs = [
        tensor("messages", "BYTES", [json.dumps(messages).encode()]),
        tensor("user_audio", "BYTES", [(ASSETS / "question_audio.wav").read_bytes()]),
        tensor("prompt_audio", "BYTES", [(ASSETS / "ref_audio.wav").read_bytes()]),
        tensor("prompt_text", "BYTES", [(ASSETS / "ref_audio.txt").read_text().strip().encode()]),
        tensor("max_tokens", "INT32", [args.max_tokens]),
        tensor("temperature", "FP32", [1.0]),
        tensor("top_k", "INT32", [-1]),  # -1: the checkpoint's default
        tensor("top_p", "FP32", [1.0]),
        tensor("seed", "INT64", [-1]),  # -1: a random seed
    ]

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(args.url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    text, audio = [], []
    try:
        # sequence_*: the conversation this request belongs to. A server started with
        # --conversation-affinity on keeps a conversation's turns on one GPU and refuses requests
        # without it (a server without ignores them); later turns send the same sequence_id without
        # sequence_start; a request no turn follows sets sequence_end (README "Conversation affinity").
        client.async_stream_infer("chroma", inputs, request_id="grpc-example", enable_empty_final_response=True,
                                  sequence_id="grpc-example", sequence_start=True, sequence_end=True)
        while True:
            result, error = responses.get(timeout=600)
            if error is not None:
                raise SystemExit(f"Triton error: {error}")
            if result.get_response().outputs:
                delta = result.as_numpy("text")[0].decode()
                print(delta, end="", flush=True)
                text.append(delta)
                audio.append(result.as_numpy("audio").reshape(-1))  # [1, samples] -> samples
                finish = result.as_numpy("finish_reason")[0].decode()
                if finish:
                    prompt_tokens, text_tokens, frames = result.as_numpy("usage").tolist()
                    print(f"\n[finish: {finish}; prompt {prompt_tokens} tokens, reply {text_tokens} tokens, "
                          f"{frames} audio frames]")
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()

    pcm = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    with wave.open(args.out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes((np.clip(pcm, -1, 1) * 32767).round().astype("<i2").tobytes())
    print(f"saved {len(pcm) / SAMPLE_RATE:.2f} s of audio to {args.out}")


if __name__ == "__main__":
    main()
