#!/usr/bin/env python3
"""CPU cost of the frontend's own work on its event loop's thread (no server needed): per request
(parsing the body, the plan, the gRPC message) for the bench's request with its audio given as
paths and as inline base64, and per streamed audio event (one SSE line from a Delta).

The frontend has one event loop per worker, shared by every stream it serves: at 256 streams
its thread ran near a full core (docs/benchmarks.md run 44), so each millisecond here is a
millisecond every other stream's chunks wait.

    python scripts/bench_frontend.py [--repeats 200] [--frames 10] [--out report.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pydantic_core

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chroma_triton.bench.clients import Workload  # noqa: E402
from openai_frontend.app import tune_malloc  # noqa: E402
from openai_frontend.backend import SAMPLES_PER_FRAME, Delta  # noqa: E402
from openai_frontend.chat import ChatService, sse  # noqa: E402
from openai_frontend.media import MediaResolver  # noqa: E402
from openai_frontend.schemas import ChatCompletionRequest  # noqa: E402
from openai_frontend.settings import Settings  # noqa: E402
from openai_frontend.triton_backend import TritonBackend  # noqa: E402
from openai_frontend.voices import VoiceLibrary  # noqa: E402


def per_call_us(fn, repeats: int) -> float:
    """Median wall time of fn() in microseconds, over batches of 10 calls (at least 5 batches)."""
    fn()
    times = []
    for _ in range(max(5, repeats // 10)):
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        times.append((time.perf_counter() - t0) / 10 * 1e6)
    return statistics.median(times)


def request_costs(service: ChatService, repeats: int) -> list[dict]:
    backend = TritonBackend("localhost:1")  # only builds messages; connects to nothing
    out = []
    for inline in (False, True):
        raw = json.dumps(Workload(inline_audio=inline).chat_body(seed=1)).encode()
        req = ChatCompletionRequest.model_validate_json(raw)
        plan = service.plan(req, "bench")
        out.append({
            "audio": "inline base64" if inline else "paths (the bench's default)", "body_bytes": len(raw),
            # as the route parses it (openai_frontend.routes.FastJSONRequest, then validation), and as
            # FastAPI alone would (Python's json)
            "parse_us": per_call_us(lambda: ChatCompletionRequest.model_validate(pydantic_core.from_json(raw)), repeats),
            "parse_stdlib_json_us": per_call_us(lambda: ChatCompletionRequest.model_validate(json.loads(raw)), repeats),
            "plan_us": per_call_us(lambda: service.plan(req, "bench"), repeats),
            "grpc_message_us": per_call_us(lambda: backend._infer_request(plan.engine), repeats),
        })
    return out


def event_costs(service: ChatService, frames: int, repeats: int) -> dict:
    """One audio event of `frames` frames (with a few words of text): the whole `events` step per
    delta, and the SSE serialisation alone with the audio spliced in (as served) or inside the
    json.dumps (as before)."""
    plan = service.plan(ChatCompletionRequest.model_validate_json(json.dumps(Workload().chat_body(seed=1))), "bench")
    audio = (np.random.default_rng(0).standard_normal(frames * SAMPLES_PER_FRAME) * 0.1).astype(np.float32)
    deltas = [Delta(text="a few words ", audio=audio) for _ in range(repeats)]

    async def feed():
        for d in deltas:
            yield d

    async def drain() -> float:
        gen = service.events(plan, None, feed())
        await gen.__anext__()  # the role event
        t0 = time.perf_counter()
        async for _ in gen:
            pass
        return (time.perf_counter() - t0) / repeats * 1e6

    data = base64.b64encode(np.round(audio * 32767).astype("<i2").tobytes())
    body = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "chroma",
            "choices": [{"index": 0, "delta": {"content": "a few words ", "audio": {
                "id": "audio_x", "data": "", "format": "pcm16", "sample_rate": 24000, "transcript": "a few words "}},
                "finish_reason": None, "logprobs": None}], "usage": None}
    inline = json.loads(json.dumps(body))
    inline["choices"][0]["delta"]["audio"]["data"] = data.decode()
    assert sse(body, data) == sse(inline).encode()
    return {"frames": frames, "base64_bytes": len(data), "event_us": asyncio.run(drain()),
            "sse_spliced_us": per_call_us(lambda: sse(body, data), repeats),
            "sse_inside_json_us": per_call_us(lambda: sse(inline), repeats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--frames", type=int, default=10, help="audio frames (80 ms) per event")
    ap.add_argument("--out", help="JSON report")
    ap.add_argument("--malloc", choices=("frontend", "glibc"), default="frontend",
                    help="frontend: the allocator settings the frontend's process applies (tune_malloc); "
                         "glibc: glibc's defaults (its mmap threshold adapts)")
    args = ap.parse_args()
    malloc_tuned = tune_malloc() if args.malloc == "frontend" else False
    settings = Settings(allowed_local_media_paths=(str(ROOT / "assets"),))
    service = ChatService(settings, TritonBackend("localhost:1"),
                          MediaResolver(settings.allowed_local_media_paths, max_bytes=settings.max_body_bytes),
                          VoiceLibrary({}))
    report = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
              "malloc_tuned": malloc_tuned,
              "requests": request_costs(service, args.repeats), "event": event_costs(service, args.frames, args.repeats)}
    for r in report["requests"]:
        print(f"request, audio as {r['audio']} ({r['body_bytes']} B body): parse {r['parse_us']:.0f} us (with Python's json {r['parse_stdlib_json_us']:.0f}), "
              f"plan {r['plan_us']:.0f} us, gRPC message {r['grpc_message_us']:.0f} us")
    e = report["event"]
    print(f"audio event of {e['frames']} frames ({e['base64_bytes']} B base64): {e['event_us']:.0f} us per event; "
          f"SSE line {e['sse_spliced_us']:.1f} us spliced, {e['sse_inside_json_us']:.1f} us with the audio inside json.dumps")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
