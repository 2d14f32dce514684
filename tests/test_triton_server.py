"""The model repository on a real tritonserver (Triton 2.51 from the nvidia-pytriton wheel, CPU),
with the tiny random checkpoint: the `chroma` ensemble over gRPC streaming, the composing models
over HTTP, cancellation, errors and concurrency. One server for the module, per relays mode."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.request

from functools import partial

import numpy as np
import pytest

from chroma_triton.serving import protocol as P
from chroma_triton.serving.repository import RenderSpec, render_repository
from chroma_triton.serving.tritonserver import TritonServer

pytestmark = pytest.mark.triton
FRAME = 1920  # samples per 80 ms frame at 24 kHz
MAX_BATCH = 4


@pytest.fixture(scope="module", params=["shared", "per_request"])
def server(request, triton_install, tmp_path_factory, tiny_checkpoint):
    """The module's tests run once per way chroma_lm relays responses (its ``relays`` parameter):
    shared relay threads (here two, requests dealt over them; the default is one, which every
    other stack test runs) and a thread per request. The second server also hands the clips'
    embeddings from audio_encoder to chroma_lm as BF16, as GPU deployments do (the CPU's default is
    FP32), so both types run through a real ensemble."""
    repo = tmp_path_factory.mktemp("rendered") / "model_repository"
    traces = tmp_path_factory.mktemp("traces")  # the engine's trace, written inside the stub process
    params = {"chroma_lm": {"max_batch": str(MAX_BATCH), "relays": request.param, "relay_threads": "2",
                            "trace_path": str(traces / "trace_{device}_{instance}.jsonl")},
              # the codec's carried streams (a small pool: the default is 4096)
              "codec_decoder": {"stream_states": "256", "trace_path": str(traces / "codec_{instance}.jsonl")}}
    embeds = "fp32" if request.param == "shared" else "bf16"
    render_repository(repo, RenderSpec(model_path=str(tiny_checkpoint), params=params, embeds_dtype=embeds))
    srv = TritonServer(repo, log_file=tmp_path_factory.mktemp("logs") / "tritonserver.log")
    t0 = time.monotonic()
    srv.start(timeout=180)
    srv.relays, srv.embeds = request.param, embeds
    srv.traces = traces
    print(f"tritonserver with the chroma repository ready in {time.monotonic() - t0:.1f}s")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def codec(tiny_checkpoint):
    from chroma_triton.model.loading import load_parts

    return load_parts(tiny_checkpoint, parts={"codec"}).codec


def user_turn(text="Tell me something.", audio=True):
    content = ([{"type": "audio", "audio_index": 0}] if audio else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def set_instances(repo, model: str, count: int) -> str:
    """Give `model` of a rendered CPU repository `count` instances instead of its one (as
    --dp-size renders one per GPU); returns its config's new text."""
    config = repo / model / "config.pbtxt"
    text = config.read_text()
    assert text.count("count: 1") == 1
    text = text.replace("count: 1", f"count: {count}")
    config.write_text(text)
    return text


class Stream:
    """One gRPC bidirectional stream carrying one `chroma` request."""

    def __init__(self, server, arrays: dict[str, np.ndarray], request_id="r"):
        import tritonclient.grpc as grpcclient

        self.results: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.client.start_stream(callback=lambda result, error: self.results.put(error or result))
        inputs = []
        for name, array in arrays.items():
            inp = grpcclient.InferInput(name, list(array.shape), P.triton_dtype(array))
            inp.set_data_from_numpy(array)
            inputs.append(inp)
        self.client.async_stream_infer("chroma", inputs, request_id=request_id, enable_empty_final_response=True)

    def next(self, timeout=60.0):
        item = self.results.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def collect(self, timeout=60.0) -> dict:
        out = {"text": "", "audio": [], "responses": 0, "finish_reason": None, "usage": None, "finals": 0}
        try:
            while True:
                r = self.next(timeout)
                final = r.get_response().parameters["triton_final_response"].bool_param
                if r.as_numpy("text") is not None:
                    out["responses"] += 1
                    out["text"] += r.as_numpy("text")[0].decode()
                    audio = r.as_numpy("audio")
                    assert audio.ndim == 2 and audio.shape[0] == 1  # [1, samples]: codec_decoder batches
                    out["audio"].append(audio[0])
                    reason = r.as_numpy("finish_reason")[0].decode()
                    out["usage"] = r.as_numpy("usage").tolist()
                    if reason:
                        assert out["finish_reason"] is None, "finish_reason set twice"
                        out["finish_reason"] = reason
                    elif not final:
                        assert out["finish_reason"] is None, "data after the finish reason"
                if final:
                    out["finals"] += 1
                    break
        finally:
            self.close()
        out["pcm"] = np.concatenate(out["audio"]) if out["audio"] else np.zeros(0, np.float32)
        return out

    def close(self, cancel=False):
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def metrics(server) -> dict[str, float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://{server.metrics_url}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(chroma_\w+)\{[^}]*\}\s+([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def by_how(server, family: str) -> dict[str, float]:
    """A counter family's values by their `how` label."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://{server.metrics_url}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(rf'^{family}\{{[^}}]*how="(\w+)"[^}}]*\}}\s+([0-9.e+-]+)$', text, re.M)}


def codec_chunks(server) -> dict[str, float]:
    return by_how(server, "chroma_codec_chunks_total")


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def idle(server) -> bool:
    m = metrics(server)
    return m.get("chroma_lm_active_requests") == 0 and m.get("chroma_lm_free_slots") == MAX_BATCH


# -- the ensemble --------------------------------------------------------------------------------
def test_stream_text_audio_final(server, question_wav, ref_voice):
    arrays = P.ensemble_inputs(user_turn(), [question_wav], ref_voice[0], ref_voice[1], max_tokens=20, seed=11,
                               temperature=0.9, top_k=20, top_p=0.95)
    chunks_before = codec_chunks(server)
    out = Stream(server, arrays).collect()
    prompt_tokens, text_tokens, frames = out["usage"]
    assert out["finals"] == 1 and out["finish_reason"] in ("stop", "length")
    assert out["responses"] >= 2 and out["text"] and text_tokens >= 1 and prompt_tokens > 20
    assert frames >= 1 and (frames == 20 or out["finish_reason"] == "stop")
    assert sum(len(a) > 0 for a in out["audio"]) >= 2  # audio came in several chunks
    assert out["pcm"].dtype == np.float32 and len(out["pcm"]) == frames * FRAME
    assert np.isfinite(out["pcm"]).all() and np.abs(out["pcm"]).max() > 0
    # codec_decoder looked for the stream's SEANet state from its second audio chunk on (the
    # ensemble passes stream_key and start_frame): carried, or restarted where two of its chunks
    # shared a batch; at least one carried
    chunks, after = sum(len(a) > 0 for a in out["audio"]), codec_chunks(server)
    seen = {how: after.get(how, 0) - chunks_before.get(how, 0) for how in ("carried", "restarted")}
    assert seen["carried"] >= 1 and seen["carried"] + seen["restarted"] >= chunks - 1


def test_streamed_audio_is_seamless(server, codec, question_wav, ref_voice):
    """Same request twice (same seed): text and audio are reproducible, and the streamed audio
    has the length of the frames produced."""
    arrays = P.ensemble_inputs(user_turn("Again."), [question_wav], ref_voice[0], ref_voice[1], max_tokens=16, seed=5)
    a, b = Stream(server, arrays).collect(), Stream(server, arrays).collect()
    assert a["text"] == b["text"] and a["usage"] == b["usage"]
    # the codes are equal; PCM may differ in float32 rounding where codec_decoder batched chunks differently
    np.testing.assert_allclose(a["pcm"], b["pcm"], atol=1e-4)
    assert len(a["pcm"]) == a["usage"][2] * FRAME


def test_default_voice_and_text_only(server):
    """No user audio and the default voice: optional inputs left out, or sent empty."""
    arrays = P.ensemble_inputs([{"role": "user", "content": "hello"}], max_tokens=6, seed=1)
    out = Stream(server, arrays).collect()
    assert out["finish_reason"] in ("stop", "length") and len(out["pcm"]) == out["usage"][2] * FRAME
    for empty in (np.zeros(0, dtype=np.object_), np.array([b""], dtype=np.object_)):
        same = Stream(server, {**arrays, "user_audio": empty, "prompt_audio": np.array([b""], dtype=np.object_)}).collect()
        assert same["text"] == out["text"] and same["usage"] == out["usage"]


def test_client_errors_are_triton_errors(server, question_wav, ref_voice):
    cases = [
        (P.ensemble_inputs("not json", max_tokens=4), "messages"),
        (P.ensemble_inputs(user_turn(), [b"garbage bytes"], max_tokens=4), "user_audio[0]"),
        (P.ensemble_inputs(user_turn(), [question_wav], max_tokens=4, top_p=2.0), "top_p"),
        (P.ensemble_inputs(user_turn(), [question_wav], max_tokens=0), "max_tokens"),
        (P.ensemble_inputs(user_turn(), [], max_tokens=4), "audio_index 0 is out of range"),
        (P.ensemble_inputs(user_turn(audio=False), [question_wav], max_tokens=4), "not referenced"),
        (P.ensemble_inputs(user_turn(), [question_wav], ref_voice[0], "", max_tokens=4), "prompt_text"),
    ]
    for arrays, needle in cases:
        stream = Stream(server, arrays)
        with pytest.raises(Exception) as info:
            stream.collect(timeout=30)
        kind, message = P.classify_error(str(info.value))
        assert kind == "invalid_request" and needle in message, str(info.value)
    assert wait_for(lambda: idle(server), what="idle engine")


def gone_marks(server) -> set[str]:
    """The stream keys chroma_lm has marked gone on this server's cancel board."""
    from chroma_triton.serving.cancel_board import GONE, server_dir

    return {p.name for p in (server_dir(server.pid) / GONE).iterdir()}


def test_cancel_frees_the_engine_row(server, question_wav, ref_voice):
    before, gone_before = metrics(server), gone_marks(server)
    arrays = P.ensemble_inputs(user_turn(), [question_wav], ref_voice[0], ref_voice[1], max_tokens=2000, seed=2)
    stream = Stream(server, arrays)
    for _ in range(3):
        stream.next(timeout=30)
    wait_for(lambda: metrics(server)["chroma_lm_active_requests"] == 1, what="the request to be active")
    stream.close(cancel=True)
    wait_for(lambda: metrics(server)["chroma_lm_cancelled_total"] == before.get("chroma_lm_cancelled_total", 0) + 1,
             what="the cancelled counter")
    assert wait_for(lambda: idle(server), what="free rows")
    # and the stream is marked gone, so codec_decoder skips its chunks still queued
    assert len(gone_marks(server) - gone_before) == 1


def test_two_concurrent_streams_complete(server, question_wav, ref_voice):
    arrays = [P.ensemble_inputs(user_turn(f"Question {i}"), [question_wav], ref_voice[0], ref_voice[1],
                                max_tokens=24, seed=i) for i in range(2)]
    results: list = [None, None]

    def run(i):
        results[i] = Stream(server, arrays[i], request_id=f"c{i}").collect()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for out in results:
        assert out is not None and out["finals"] == 1 and out["finish_reason"] in ("stop", "length")
        assert len(out["pcm"]) == out["usage"][2] * FRAME
    exported = metrics(server)
    for family in ("chroma_lm_prefills_total", "chroma_lm_forced_admissions_total", "chroma_lm_late_chunks_total",
                   "chroma_lm_late_chunk_seconds_total", "chroma_lm_gc_full_collections_total",
                   "chroma_lm_gc_full_seconds_total", "chroma_lm_gc_seconds_total"):
        assert family in exported, family
    assert exported["chroma_lm_prefills_total"] >= 1
    # dp instances share Triton's instance name across GPUs: the device label keeps them apart
    text = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        f"http://{server.metrics_url}/metrics", timeout=5).read().decode()
    assert re.search(r'^chroma_lm_free_slots\{[^}]*device="cpu"', text, re.M), text[:500]
    if server.relays == "shared":  # the relay threads' busy time is exported
        assert wait_for(lambda: metrics(server).get("chroma_lm_relay_busy_seconds_total", 0) > 0, what="relay busy time")
    # the engine's trace (flushed once the engine is idle): the admissions, steps and start-up chunks
    trace = next(server.traces.glob("trace_cpu_*.jsonl"))

    def kinds():
        return {json.loads(line)["ev"] for line in trace.read_text().splitlines() if line.strip()}
    assert wait_for(lambda: {"admit", "step", "chunk"} <= kinds(), what="the engine's trace")


# -- the composing models over HTTP -------------------------------------------------------------
def _http_infer(server, model, arrays, outputs):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    inputs = []
    for name, array in arrays.items():
        inp = httpclient.InferInput(name, list(array.shape), P.triton_dtype(array))
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    result = client.infer(model, inputs, outputs=[httpclient.InferRequestedOutput(o) for o in outputs])
    return {o: result.as_numpy(o) for o in outputs}


def test_audio_encoder_http(server, question_wav, ref_voice, tiny_checkpoint):
    """audio_encoder called alone: the clips' embeddings (in the server's audio_embeds type: what an
    encoder in this process computes, rounded once to bf16 on the BF16 server), token counts, the
    voice's codes and transcript; a resent clip comes from the cache."""
    from chroma_triton.model.loading import load_parts
    from chroma_triton.serving.triton_audio_encoder import AudioEncoderService, EncoderInput

    arrays = {  # a batching model: leading batch dimension 1
        "user_audio": np.array([[question_wav, question_wav]], dtype=np.object_),
        "prompt_audio": np.array([[ref_voice[0]]], dtype=np.object_),
        "prompt_text": np.array([[ref_voice[1].encode()]], dtype=np.object_),
    }
    out = _http_infer(server, "audio_encoder", arrays, ["audio_embeds", "audio_token_counts", "prompt_codes", "voice_text"])
    counts = out["audio_token_counts"][0]
    assert len(counts) == 2 and counts[0] == counts[1] > 0
    embeds = out["audio_embeds"]
    assert embeds.shape[:2] == (1, counts.sum()) and str(embeds.dtype) == {"fp32": "float32", "bf16": "bfloat16"}[server.embeds]
    local = AudioEncoderService(load_parts(tiny_checkpoint, parts={"audio_tower", "codec"}), None)
    want = local.encode_batch([EncoderInput([question_wav, question_wav], *ref_voice)])[0].audio_embeds
    if server.embeds == "bf16":  # the tower's float32 rows rounded once (its threads may differ in the last bits)
        np.testing.assert_allclose(embeds[0].astype(np.float32), want, rtol=2 ** -7, atol=1e-6)
    else:
        np.testing.assert_allclose(embeds[0], want, rtol=1e-5, atol=1e-5)
    assert out["prompt_codes"].ndim == 3 and out["prompt_codes"].shape[1] > 10
    assert out["voice_text"][0, 0].decode() == ref_voice[1]
    # the same clips again (a conversation's next turn resends them): none goes through the tower
    before = by_how(server, "chroma_audio_encoder_clips_total")
    again = _http_infer(server, "audio_encoder", arrays, ["audio_embeds", "audio_token_counts"])
    np.testing.assert_array_equal(again["audio_embeds"], out["audio_embeds"])
    after = by_how(server, "chroma_audio_encoder_clips_total")
    assert after["reused"] == before["reused"] + 2 and after["embedded"] == before["embedded"]


def test_codec_decoder_http(server, codec):
    codes = np.random.default_rng(1).integers(0, codec.codebook_size, size=(7, codec.num_codebooks)).astype(np.int32)
    out = _http_infer(server, "codec_decoder", {"audio_codes": codes[None], "context_frames": np.array([[3]], np.int32)},
                      ["audio"])
    audio = out["audio"]
    assert audio.shape == (1, 4 * FRAME)
    np.testing.assert_allclose(audio[0], codec.decode_chunk(codes.astype(np.int64), 3), atol=1e-4)


def test_codec_decoder_batches_concurrent_chunks_of_different_lengths(server, codec):
    """Chunks of several streams sent at once may be decoded in one batch (ragged, padded): each
    answer must equal that chunk decoded alone."""
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(2)
    chunks = [(rng.integers(0, codec.codebook_size, size=(n, codec.num_codebooks)).astype(np.int32), ctx)
              for n, ctx in [(2, 0), (4, 2), (8, 4), (22, 12), (16, 8), (3, 3)] * 3]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results = [None] * len(chunks)

    def done(i, result, error):
        results[i] = error if error is not None else result.as_numpy("audio")

    for i, (codes, ctx) in enumerate(chunks):
        inputs = [grpcclient.InferInput("audio_codes", [1, *codes.shape], "INT32"),
                  grpcclient.InferInput("context_frames", [1, 1], "INT32")]
        inputs[0].set_data_from_numpy(codes[None])
        inputs[1].set_data_from_numpy(np.array([[ctx]], np.int32))
        client.async_infer("codec_decoder", inputs, partial(done, i))
    deadline = time.time() + 120
    while any(r is None for r in results) and time.time() < deadline:
        time.sleep(0.05)
    client.close()
    for (codes, ctx), audio in zip(chunks, results):
        assert isinstance(audio, np.ndarray), audio
        assert audio.shape == (1, (len(codes) - ctx) * FRAME)
        np.testing.assert_allclose(audio[0], codec.decode_chunk(codes.astype(np.int64), ctx), atol=1e-4)


def test_codec_decoder_skips_chunks_of_streams_marked_gone(server, codec):
    """A chunk whose stream chroma_lm marked gone (cancelled) is answered with no audio and counted;
    chunks of other streams, and chunks sent without a stream key (direct callers), are decoded."""
    import uuid

    from chroma_triton.serving.cancel_board import CancelBoard, server_dir

    codes = np.random.default_rng(3).integers(0, codec.codebook_size, size=(6, codec.num_codebooks)).astype(np.int32)
    alive, gone = uuid.uuid4().hex, uuid.uuid4().hex
    CancelBoard(server_dir(server.pid)).mark_gone(gone)
    skipped = metrics(server).get("chroma_codec_skipped_chunks_total", 0)

    def decode(key):
        arrays = {"audio_codes": codes[None], "context_frames": np.array([[2]], np.int32)}
        if key is not None:
            arrays["stream_key"] = P.bytes_tensor(key)[None]
        return _http_infer(server, "codec_decoder", arrays, ["audio"])["audio"]

    expected = codec.decode_chunk(codes.astype(np.int64), 2)
    for key in (alive, None):
        np.testing.assert_allclose(decode(key)[0], expected, atol=1e-4)
    assert decode(gone).shape == (1, 0)
    # at least ours (chunks of a stream cancelled by an earlier test may still be skipped meanwhile)
    assert metrics(server)["chroma_codec_skipped_chunks_total"] >= skipped + 1


def test_codec_decoder_continues_a_stream_given_its_key_and_start_frame(server, codec):
    """Chunks sent with stream_key and start_frame continue the stream's SEANet state (counted as
    carried) and give what the codec service gives in-process; a chunk that does not follow the
    stream's last one decodes statelessly (counted as restarted)."""
    import uuid

    from chroma_triton.serving.triton_codec import CodecChunk, CodecService, chunk_plan

    codes = np.random.default_rng(4).integers(0, codec.codebook_size, size=(30, codec.num_codebooks))
    key = uuid.uuid4().hex
    plan = chunk_plan(len(codes), 2, 10, 12)
    local = CodecService(codec, stream_states=64)
    before = codec_chunks(server)
    for a, s, e in plan:
        arrays = {"audio_codes": codes[a:e].astype(np.int32)[None], "context_frames": np.array([[s - a]], np.int32),
                  "stream_key": P.bytes_tensor(key)[None], "start_frame": np.array([[s]], np.int32)}
        audio = _http_infer(server, "codec_decoder", arrays, ["audio"])["audio"]
        expected = local.decode_many([CodecChunk(codes[a:e], s - a, key, s)])[0]
        np.testing.assert_allclose(audio[0], expected, atol=1e-4)
    a, s, e = plan[1]  # again: the stream is past it now
    arrays = {"audio_codes": codes[a:e].astype(np.int32)[None], "context_frames": np.array([[s - a]], np.int32),
              "stream_key": P.bytes_tensor(key)[None], "start_frame": np.array([[s]], np.int32)}
    audio = _http_infer(server, "codec_decoder", arrays, ["audio"])["audio"]
    np.testing.assert_allclose(audio[0], codec.decode_chunk(codes[a:e], s - a), atol=1e-4)
    after = codec_chunks(server)
    assert after.get("carried", 0) - before.get("carried", 0) >= len(plan) - 1
    assert after.get("restarted", 0) - before.get("restarted", 0) >= 1
    # the codec's trace has a line per execute, these included (line-buffered: written already)
    lines = [json.loads(line) for f in server.traces.glob("codec_*.jsonl") for line in f.read_text().splitlines()]
    assert sum(line["carried"] for line in lines) >= after.get("carried", 0)
    assert all(line["execute_ms"] >= line["decode_ms"] >= 0 and line["chunks"] >= 1 for line in lines)
    assert any(line["frames"] == e - s for line in lines for _, s, e in plan[1:])


# -- the control call: chroma_cancel --------------------------------------------------------------
def cancel_call(server, *ids) -> np.ndarray:
    """Call the control model chroma_cancel over HTTP (it is not decoupled: plain /infer works)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        inp = httpclient.InferInput("request_id", [len(ids)], "BYTES")
        inp.set_data_from_numpy(np.array([i.encode() for i in ids], dtype=object))
        return client.infer("chroma_cancel", [inp]).as_numpy("running")
    finally:
        client.close()


def test_cancel_call_stops_a_running_ensemble_request(server, question_wav, ref_voice):
    """Triton 2.51 never tells the running decoupled chroma_lm step of an ensemble request that
    its client cancelled; the control call does, by request id, while the client's stream stays
    open: the reply ends at once with finish_reason "cancelled" and the row is free again."""
    before = metrics(server)
    for seed in (2, 5, 11):  # the random demo model may end a reply early: then try another seed
        rid = f"ctl-{seed}-{time.monotonic_ns()}"
        arrays = P.ensemble_inputs(user_turn(), [question_wav], ref_voice[0], ref_voice[1], max_tokens=2000, seed=seed)
        stream = Stream(server, arrays, request_id=rid)
        for _ in range(2):
            stream.next(timeout=30)
        running = cancel_call(server, rid)
        out = stream.collect(timeout=60)
        if running.tolist() == [True]:
            break
    else:
        pytest.skip("the demo model ended every reply before the cancel call")
    assert out["finish_reason"] == "cancelled" and out["finals"] == 1, out["finish_reason"]
    assert out["usage"][2] < 2000
    # the counters follow shortly after the reply's end (the metrics thread updates them)
    wait_for(lambda: metrics(server)["chroma_lm_cancelled_total"] >= before.get("chroma_lm_cancelled_total", 0) + 1,
             what="the cancelled counter")
    assert wait_for(lambda: idle(server), what="free rows")
    log = server.log_tail(lines=400)
    assert re.search(rf"cancelled request id={re.escape(rid)} source=control posted=\d.* reason=cancelled", log), log[-2000:]


def test_cancel_call_answers_for_unknown_ids_and_refuses_empty_ones(server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    assert cancel_call(server, "no-such-request", "another").tolist() == [False, False]
    with pytest.raises(InferenceServerException, match="invalid request: request_id"):
        cancel_call(server, "")
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        assert client.is_model_ready("chroma_cancel")
    finally:
        client.close()
