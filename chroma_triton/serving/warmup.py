"""One request through the ``chroma`` ensemble before the launcher reports ready (``--warmup-frames``).

In docs/benchmarks.md run 39 the first request after a GPU stack started waited 0.4-1.9 s for its
first audio, the next one 55-97 ms: first-call costs, of which ones was not measured (candidates:
CUDA kernels loaded at their first launch, eager paths' first calls at their shapes, the voice's
prefix). The launcher sends this request itself, over Triton gRPC like any client, so that the
first user does not pay them; it speaks with the server's default voice (no ``prompt_audio``), so a
user's own new voice still costs its prefix once.

The question is a second of generated noise: what it says does not matter, and the launcher
needs no audio file beside the default voice.
"""

from __future__ import annotations

import io
import queue
import time
from dataclasses import dataclass

import numpy as np

from .protocol import ensemble_inputs, triton_dtype

SAMPLE_RATE = 24000
FRAME_SAMPLES = 1920  # one 80 ms frame at 24 kHz


@dataclass
class WarmupResult:
    first_audio_s: float | None  # None: no audio came back
    total_s: float
    frames: int
    error: str | None = None


def question_wav(seconds: float = 1.0, seed: int = 0) -> bytes:
    """A WAV file of quiet noise (16-bit PCM, 24 kHz mono)."""
    import soundfile as sf

    noise = np.random.default_rng(seed).normal(0.0, 0.01, int(seconds * SAMPLE_RATE)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, noise, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def send_warmup(url: str, frames: int, timeout_s: float = 120.0) -> WarmupResult:
    """One streamed request of up to ``frames`` audio frames to ``chroma`` at the gRPC ``url``;
    never raises for a failed request (``error`` says what failed)."""
    import tritonclient.grpc as grpcclient

    arrays = ensemble_inputs([{"role": "user", "content": [{"type": "audio", "audio_index": 0}]}],
                             user_audio=[question_wav()], max_tokens=frames, seed=0)
    inputs = []
    for name, array in arrays.items():
        item = grpcclient.InferInput(name, list(array.shape), triton_dtype(array))
        item.set_data_from_numpy(array)
        inputs.append(item)
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    start = time.perf_counter()
    first, samples, error = None, 0, None
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error, time.perf_counter())))
        client.async_stream_infer("chroma", inputs, request_id="launcher-warmup", enable_empty_final_response=True)
        deadline = start + timeout_s
        while True:
            result, err, at = responses.get(timeout=max(0.0, deadline - time.perf_counter()))
            if err is not None:
                error = str(err)
                break
            reply = result.get_response()
            if reply.outputs:
                audio = result.as_numpy("audio")
                if audio is not None and audio.size:
                    first = at - start if first is None else first
                    samples += audio.size
            if reply.parameters["triton_final_response"].bool_param:
                break
    except queue.Empty:
        error = f"no final response within {timeout_s:.0f} s"
    except Exception as exc:  # noqa: BLE001 - reported, the launcher goes on
        error = f"{type(exc).__name__}: {exc}"
    finally:
        client.stop_stream(cancel_requests=error is not None)  # a failed one frees its resources
        client.close()
    return WarmupResult(first_audio_s=first, total_s=time.perf_counter() - start,
                        frames=samples // FRAME_SAMPLES, error=error)
