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
import uuid
from concurrent.futures import ThreadPoolExecutor
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


def send_warmup(url: str, frames: int, timeout_s: float = 120.0, stop=lambda: False) -> WarmupResult:
    """One streamed request of up to ``frames`` audio frames to ``chroma`` at the gRPC ``url``.
    Never raises: ``error`` says what failed. ``stop()`` (polled every 0.25 s) ends it early, the
    request cancelled, as does ``timeout_s``."""
    start = time.perf_counter()
    first, samples, error = None, 0, None
    client = None
    request_id = f"launcher-warmup-{uuid.uuid4().hex[:12]}"
    if stop():
        return WarmupResult(first_audio_s=None, total_s=0.0, frames=0, error="stopped")
    try:
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
        client.start_stream(callback=lambda result, error: responses.put((result, error, time.perf_counter())))
        # a sequence of one request: a stack with conversation affinity refuses requests without one
        client.async_stream_infer("chroma", inputs, request_id=request_id, enable_empty_final_response=True,
                                  sequence_id=request_id, sequence_start=True, sequence_end=True)
        while True:
            if stop():
                error = "stopped"
                break
            if time.perf_counter() - start > timeout_s:
                error = f"no final response within {timeout_s:.0f} s"
                break
            try:
                result, err, at = responses.get(timeout=0.25)
            except queue.Empty:
                continue
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
    except Exception as exc:  # noqa: BLE001 - reported, the launcher goes on
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if client is not None:
            try:
                client.stop_stream(cancel_requests=error is not None)
                if error is not None:
                    cancel_in_engine(client, request_id)
                client.close()
            except Exception as exc:  # noqa: BLE001
                error = error or f"closing the stream: {type(exc).__name__}: {exc}"
    return WarmupResult(first_audio_s=first, total_s=time.perf_counter() - start,
                        frames=samples // FRAME_SAMPLES, error=error)


def cancel_in_engine(client, request_id: str) -> None:
    """The gRPC cancel does not reach the ``chroma_lm`` step an ensemble request is already in
    (README "Cancellation"): the ``chroma_cancel`` control model frees its row, so a stop during
    the warm-up does not leave tritonserver waiting for it. Best effort."""
    import tritonclient.grpc as grpcclient

    item = grpcclient.InferInput("request_id", [1], "BYTES")
    item.set_data_from_numpy(np.array([request_id.encode()], dtype=np.object_))
    try:
        client.infer("chroma_cancel", [item], client_timeout=5.0)
    except Exception:  # noqa: BLE001 - e.g. a repository without chroma_cancel: the ensemble's own path remains
        pass


def send_warmups(url: str, frames: int, count: int, stop=lambda: False) -> list[WarmupResult]:
    """``count`` warm-ups at once (one per ``chroma_lm`` instance with dp > 1: Triton hands each
    to an instance that is free, which usually spreads them, but nothing guarantees it)."""
    with ThreadPoolExecutor(max(count, 1)) as pool:
        return list(pool.map(lambda _: send_warmup(url, frames, stop=stop), range(count)))
