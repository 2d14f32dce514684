"""What tritonserver still does for streams whose clients have all cancelled (known problem 16 in
docs/reliability.md): ``--streams`` gRPC streams of the ``chroma`` ensemble (long replies), read
for ``--read-s`` seconds, then every client cancels (``stop_stream(cancel_requests=True)``).
Measured, from Triton's statistics extension and metrics:

* how many chunks ``codec_decoder`` handled after the cancel, and when it handled the last one
  (it runs for every chunk ``chroma_lm`` had sent before it saw the cancel);
* how many of those it skipped (``chroma_codec_skipped_chunks_total``: chunks of streams
  ``chroma_lm`` had marked gone, and chunks Triton itself flagged cancelled) instead of decoding;
* how long until every engine row was free again.

By default a tritonserver of its own (the repository rendered for the CPU, the demo checkpoint);
``--grpc-url`` measures a running one instead (e.g. a GPU stack started by the launcher), whose
``chroma_lm`` must have rows for ``--streams``. Loopback only.

    python scripts/reliability/cancel_drain.py --streams 16 --read-s 8 --report out/cancel_drain.json
    python scripts/reliability/cancel_drain.py --grpc-url localhost:8001 --http-url localhost:8080 \
        --metrics-url localhost:8002 --streams 256 --read-s 5 --max-tokens 1000
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ASSETS, RunInfo, exit_on_sigterm, git_revision, http_get, metrics, write_report  # noqa: E402

from chroma_triton.serving import protocol as P  # noqa: E402
from chroma_triton.serving.repository import RenderSpec, render_repository  # noqa: E402
from chroma_triton.serving.tritonserver import TritonServer  # noqa: E402

SKIPPED = "chroma_codec_skipped_chunks_total"
QUIET_S = 5.0  # codec_decoder counts as drained once it has handled no chunk for this long


def codec_chunks(http_url: str) -> int:
    """Chunks codec_decoder has answered so far (successful requests, Triton's statistics)."""
    status, body = http_get(f"http://{http_url}/v2/models/codec_decoder/stats", timeout=5)
    if status != 200:
        raise RuntimeError(f"codec_decoder statistics answered {status}")
    return int(json.loads(body)["model_stats"][0]["inference_stats"]["success"]["count"])


def open_streams(server, n: int, max_tokens: int) -> list:
    import tritonclient.grpc as grpcclient

    messages = [{"role": "user", "content": [{"type": "audio", "audio_index": 0},
                                             {"type": "text", "text": "Tell me a long story."}]}]
    question = (ASSETS / "question_audio.wav").read_bytes()
    ref = (ASSETS / "ref_audio.wav").read_bytes(), (ASSETS / "ref_audio.txt").read_text().strip()
    streams = []
    for i in range(n):
        client, received = grpcclient.InferenceServerClient(server.grpc_url), queue.Queue()
        client.start_stream(callback=lambda result, error, q=received: q.put(error or result))
        inputs = []
        for name, array in P.ensemble_inputs(messages, [question], *ref, max_tokens=max_tokens, seed=i).items():
            inp = grpcclient.InferInput(name, list(array.shape), P.triton_dtype(array))
            inp.set_data_from_numpy(array)
            inputs.append(inp)
        client.async_stream_infer("chroma", inputs, request_id=f"drain-{i}", enable_empty_final_response=True)
        streams.append((client, received))
    return streams


def measure(server, streams: int, read_s: float, max_tokens: int) -> dict:
    opened = open_streams(server, streams, max_tokens)
    time.sleep(read_s)
    received = sum(q.qsize() for _, q in opened)
    before, skipped_before = codec_chunks(server.http_url), metrics(server.metrics_url, (SKIPPED,))[SKIPPED]
    t0 = time.monotonic()
    for client, _ in opened:
        client.stop_stream(cancel_requests=True)
    cancel_s = time.monotonic() - t0
    last, last_at, idle_at = before, t0, None
    while time.monotonic() - last_at < QUIET_S or idle_at is None:
        count = codec_chunks(server.http_url)
        if count != last:
            last, last_at = count, time.monotonic()
        if idle_at is None:
            rows = metrics(server.metrics_url, ("chroma_lm_active_requests",))["chroma_lm_active_requests"]
            if rows is None:
                raise RuntimeError(f"no chroma_lm_active_requests on {server.metrics_url}: not a chroma tritonserver?")
            idle_at = time.monotonic() if rows == 0 else None
        if time.monotonic() - t0 > 300:
            break
        time.sleep(0.05)
    for client, _ in opened:
        client.close()
    skipped_now = metrics(server.metrics_url, (SKIPPED,))[SKIPPED]
    # None: a codec_decoder without the counter (code before it; it skipped only chunks that
    # Triton flagged cancelled, uncounted)
    skipped = None if skipped_now is None else int(skipped_now - (skipped_before or 0))
    return {
        "streams": streams, "read_s": read_s, "responses_received_before_cancel": received,
        "cancel_calls_s": round(cancel_s, 3),
        "codec_chunks_after_cancel": last - before,
        "codec_skipped_after_cancel": skipped,
        "codec_decoded_after_cancel": None if skipped is None else last - before - skipped,
        "codec_last_chunk_after_s": round(last_at - t0, 3),
        "engine_rows_free_after_s": None if idle_at is None else round(idle_at - t0, 3),
    }


def _gpus() -> list[str]:
    """``nvidia-smi -L``'s lines (RunInfo describes the CPU machines of the other drivers)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams (also chroma_lm's max_batch)")
    ap.add_argument("--read-s", type=float, default=8.0, help="seconds the streams run before every client cancels")
    ap.add_argument("--max-tokens", type=int, default=4000, help="reply length asked for (long: the cancel ends it)")
    ap.add_argument("--rounds", type=int, default=1, help="measurements on the same server")
    ap.add_argument("--grpc-url", help="a running tritonserver's gRPC host:port (default: start one)")
    ap.add_argument("--http-url", default="localhost:8000", help="...its HTTP host:port (with --grpc-url)")
    ap.add_argument("--metrics-url", default="localhost:8002", help="...its metrics host:port (with --grpc-url)")
    ap.add_argument("--report", help="also write the JSON report here")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    info = RunInfo.now()
    if args.grpc_url:
        server = SimpleNamespace(grpc_url=args.grpc_url, http_url=args.http_url, metrics_url=args.metrics_url)
        rounds = [measure(server, args.streams, args.read_s, args.max_tokens) for _ in range(args.rounds)]
        write_report(args.report, {"run": info.__dict__, "revision": git_revision(), "server": vars(server),
                                   "gpus": _gpus(), "rounds": rounds})
        return 0
    with tempfile.TemporaryDirectory(prefix="cancel-drain-") as tmp:
        repo = Path(tmp) / "model_repository"
        render_repository(repo, RenderSpec(kind="cpu", params={"chroma_lm": {"max_batch": str(args.streams)}}))
        server = TritonServer(repo, log_file=Path(tmp) / "tritonserver.log")
        server.start(timeout=300)
        try:
            rounds = [measure(server, args.streams, args.read_s, args.max_tokens) for _ in range(args.rounds)]
        finally:
            server.stop()
    write_report(args.report, {"run": info.__dict__, "revision": git_revision(), "rounds": rounds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
