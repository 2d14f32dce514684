"""The Triton models' logic without a server: tensor protocol, audio encoder batching, the LM
relay, the codec's streamed-vs-one-shot difference, repository rendering and the launcher's
fail-fast checks."""

from __future__ import annotations

import json
import os
import time
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from chroma_triton.engine import AudioChunk, Finished, RequestFailed, TextDelta
from chroma_triton.engine.request import RequestStream
from chroma_triton.errors import EngineError, InvalidRequestError
from chroma_triton.serving import protocol as P
from chroma_triton.serving.cancel_board import CONTROL_GRACE_S, GONE, CancelBoard, CancelWatch, live_key, request_key
from chroma_triton.serving.model_args import ModelArgs, resolve_default_voice, thinker_backend
from chroma_triton.serving.repository import RenderSpec, parse_config, render_configs, render_repository
from chroma_triton.serving.triton_codec import chunk_plan, streaming_difference
from chroma_triton.serving.triton_lm import RelayWakeups, _Relay, sampling_params, throttled

ROOT = Path(__file__).resolve().parent.parent


# -- protocol -------------------------------------------------------------------------------------
def test_classify_error_strips_ensemble_prefix():
    assert P.classify_error("in ensemble 'chroma', invalid request: top_p must be in (0, 1]") == (
        "invalid_request", "top_p must be in (0, 1]")
    assert P.classify_error("[StatusCode.INTERNAL] in ensemble 'chroma', internal error: boom") == ("internal", "boom")
    assert P.classify_error("internal error: x")[0] == "internal"
    assert P.error_message(InvalidRequestError("bad", "messages")) == "invalid request: bad"
    assert P.error_message(RuntimeError("oops")) == "internal error: oops"
    from chroma_triton.audio_io import AudioDecodeError

    assert P.error_message(AudioDecodeError("not audio")).startswith("invalid request: ")


def test_resolve_audio_parts_maps_indices_and_checks_range():
    msgs = [{"role": "user", "content": [{"type": "audio", "audio_index": 1}, {"type": "text", "text": "hi"},
                                         {"type": "audio", "audio_index": 0}]}]
    out, used = P.resolve_audio_parts(msgs, 2)
    assert used == [1, 0]
    assert out[0]["content"][0] == {"type": "audio", "audio": 1}
    with pytest.raises(InvalidRequestError, match="out of range"):
        P.resolve_audio_parts(msgs, 1)
    with pytest.raises(InvalidRequestError, match="audio_index"):
        P.resolve_audio_parts([{"role": "user", "content": [{"type": "audio"}]}], 1)


def test_readers_and_ensemble_inputs():
    arrays = P.ensemble_inputs([{"role": "user", "content": "hi"}], [b"a", b"b"], b"v", "t", max_tokens=5, seed=3,
                               temperature=None)
    assert set(arrays) == {"messages", "user_audio", "prompt_audio", "prompt_text", "max_tokens", "seed"}
    assert arrays["max_tokens"].dtype == np.int32 and arrays["seed"].dtype == np.int64
    assert json.loads(P.as_text(arrays["messages"], "messages")) == [{"role": "user", "content": "hi"}]
    assert P.as_bytes_list(arrays["user_audio"][None]) == [b"a", b"b"]  # with a batch dim too
    assert P.as_scalar(np.array([[7]], np.int32), "max_tokens") == 7
    with pytest.raises(InvalidRequestError):
        P.as_scalar(np.array([1.0, 2.0], np.float32), "top_p")
    with pytest.raises(InvalidRequestError, match="JSON"):
        P.parse_messages("{not json")


def test_sampling_params_defaults_and_sentinels():
    s = sampling_params({"max_tokens": None, "temperature": None, "top_k": -1, "top_p": None, "seed": -1})
    assert (s.max_tokens, s.temperature, s.top_k, s.top_p, s.seed) == (1000, 1.0, None, 1.0, None)
    s = sampling_params({"max_tokens": 12, "temperature": 0.5, "top_k": 3, "top_p": 0.9, "seed": 5})
    assert (s.max_tokens, s.top_k, s.seed) == (12, 3, 5)


def test_relay_merges_text_into_chunks_and_flags_the_last():
    relay = _Relay(prompt_tokens=10)
    codes = np.ones((3, 8), np.int64)
    out = relay.responses([TextDelta("a", 1), TextDelta("b", 2), AudioChunk(codes, 1, 1)])
    assert len(out) == 1 and out[0].text == "ab" and out[0].new_frames == 2 and out[0].usage == (10, 2, 2)
    out = relay.responses([AudioChunk(codes, 0, 3), Finished("stop", 10, 4, 5, "abcd")])
    assert len(out) == 1 and out[0].final and out[0].finish_reason == "stop" and out[0].usage == (10, 4, 5)
    assert out[0].start_frame == 3 and out[0].tensors(8, "k")["start_frame"].tolist() == [[3]]
    out = _Relay(1).responses([TextDelta("x", 1), Finished("length", 1, 1, 0, "x")])
    assert [(r.text, r.final, r.codes) for r in out] == [("x", True, None)]
    with pytest.raises(InvalidRequestError):
        _Relay(1).responses([RequestFailed("bad", client_error=True)])
    with pytest.raises(EngineError):
        _Relay(1).responses([RequestFailed("boom")])
    tensors = out[0].tensors(8, "k")
    assert tensors["audio_codes"].shape == (1, 0, 8) and tensors["usage"].dtype == np.int32
    assert tensors["context_frames"].shape == (1, 1) and tensors["stream_key"].shape == (1, 1)


def test_relay_holds_text_for_the_next_chunk():
    now = [0.0]
    relay = _Relay(prompt_tokens=4, hold_s=0.4, clock=lambda: now[0])
    codes = np.ones((2, 8), np.int64)
    assert relay.responses([TextDelta("Hel", 1)]) == []  # held: no response of its own
    now[0] = 0.1
    assert relay.responses([TextDelta("lo", 2)]) == []
    out = relay.responses([AudioChunk(codes, 0, 0)])  # ...it rides on the chunk
    assert len(out) == 1 and out[0].text == "Hello" and out[0].new_frames == 2
    relay.responses([TextDelta(" you", 3)])
    now[0] = 0.45
    assert relay.responses([]) == []  # 0.35 s held so far
    now[0] = 0.55
    out = relay.responses([])  # held long enough: sent alone
    assert [(r.text, r.codes) for r in out] == [(" you", None)]
    relay.responses([TextDelta("!", 4)])
    out = relay.responses([Finished("stop", 4, 4, 2, "Hello you!")])  # the end takes what is held
    assert [(r.text, r.final) for r in out] == [("!", True)]


def test_relay_waits_until_held_text_is_due():
    now = [0.0]
    relay = _Relay(prompt_tokens=4, hold_s=0.4, clock=lambda: now[0])
    assert relay.wait_s(0.25) == 0.25  # nothing held
    now[0] = 1.0
    relay.responses([TextDelta("Hi", 1)])
    assert relay.wait_s(0.25) == 0.25  # due in 0.4 s
    now[0] = 1.3
    assert relay.wait_s(0.25) == pytest.approx(0.1)
    now[0] = 1.5
    assert relay.wait_s(0.25) == 0.0  # overdue: look now
    assert [r.text for r in relay.responses([])] == ["Hi"]
    assert relay.wait_s(0.25) == 0.25
    # text the relay hears of late (it does not wake for text) is held from when it was made
    relay.responses([TextDelta("late", 2, at=1.2)])
    assert relay.wait_s(0.25) == pytest.approx(0.1)  # due at 1.6
    now[0] = 1.6
    assert [r.text for r in relay.responses([])] == ["late"]


def test_stream_text_need_not_wake_a_relay():
    """A relay waits with text_wakes=False: text queued meanwhile does not end the wait (one
    wake-up per token at 256 streams), audio or the end does, and nothing is lost or reordered."""
    import queue
    import threading

    stream = RequestStream("r")
    got, woke = [], threading.Event()

    def relay():
        got.append(stream.get(timeout=30, text_wakes=False))
        woke.set()

    t = threading.Thread(target=relay)
    t.start()
    deadline = time.monotonic() + 10
    while not stream._ready._waiters and time.monotonic() < deadline:  # until the relay waits
        time.sleep(0.001)
    stream.put(TextDelta("a", 1))
    stream.put(TextDelta("b", 2))
    assert not woke.wait(0.3), "a text delta woke the relay"
    codes = np.ones((2, 8), np.int64)
    stream.put(AudioChunk(codes, 0, 0))  # audio wakes it, after the 30 s timeout was long from over
    assert woke.wait(10)
    t.join()
    rest = []
    while True:
        try:
            rest.append(stream.get(timeout=0))
        except queue.Empty:
            break
    assert [type(e).__name__ for e in got + rest] == ["TextDelta", "TextDelta", "AudioChunk"]
    assert [e.text for e in (got + rest)[:2]] == ["a", "b"]
    stream.put(TextDelta("c", 3))
    assert stream.get(timeout=0.05, text_wakes=False).text == "c"  # already queued: returned at once
    with pytest.raises(queue.Empty):
        stream.get(timeout=0.05, text_wakes=False)
    stream.put(Finished("stop", 1, 3, 2, "abc"))
    assert isinstance(stream.get(text_wakes=False), Finished)
    assert stream.get() is None and stream.get() is None  # ended, and stays ended
    # the end wakes every reader, and each sees it
    ended = RequestStream("e")
    readers = [threading.Thread(target=lambda: got.append(list(ended))) for _ in range(3)]
    for r in readers:
        r.start()
    time.sleep(0.05)
    ended.put(Finished("stop", 1, 0, 0, ""))
    for r in readers:
        r.join(10)
    assert not any(r.is_alive() for r in readers)
    # the default (text wakes the caller), as the engine's other consumers iterate
    other = RequestStream("s")
    threading.Timer(0.05, other.put, args=(TextDelta("x", 1),)).start()
    assert other.get(timeout=10).text == "x"


def test_relay_wakeup_modes():
    lean, every, quiet = RelayWakeups.named("lean"), RelayWakeups.named("every_event"), RelayWakeups.named("quiet")
    assert (lean.text_wakes, every.text_wakes, quiet.text_wakes) == (False, True, False)
    assert quiet.poll_s > lean.poll_s > every.poll_s
    assert quiet.sender_cancel_poll_s > lean.sender_cancel_poll_s > every.sender_cancel_poll_s == 0.0
    with pytest.raises(ValueError, match="relay_wakeups must be one of"):
        RelayWakeups.named("sometimes")


def test_throttled_asks_at_most_once_per_period_and_remembers_yes():
    now, asked, answer = [0.0], [], [False]
    check = throttled(lambda: asked.append(now[0]) or answer[0], 0.2, clock=lambda: now[0])
    for t in (0.0, 0.05, 0.1, 0.19, 0.2, 0.3, 0.41):
        now[0] = t
        assert check() is False
    assert asked == [0.0, 0.2, 0.41]
    answer[0] = True
    now[0] = 0.5
    assert check() is False  # not asked yet in this period
    now[0] = 0.61
    assert check() is True and asked[-1] == 0.61
    now[0] = 0.62
    assert check() is True and len(asked) == 4  # once cancelled, never asked again
    every, n = throttled(lambda: asked.append(now[0]) or False, 0.0, clock=lambda: now[0]), len(asked)
    assert [every(), every(), every()] == [False] * 3 and len(asked) == n + 3  # period 0: every call


def test_cancel_board(tmp_path):
    board = CancelBoard(tmp_path)
    assert not board.is_posted("abc")
    board.post("abc")
    assert CancelBoard(tmp_path).is_posted("abc")
    board.clear("abc")
    assert not board.is_posted("abc")
    board.post("../escape")  # not a key: ignored
    assert not (tmp_path.parent / "escape").exists()


def test_gone_marks_for_codec_decoder(tmp_path):
    """Cancelled streams' keys, in a folder of their own (the cancel watch lists only the top level),
    swept once old; keys that are not file names are ignored."""
    board = CancelBoard(tmp_path)
    board.mark_gone("stream1")
    assert board.is_gone("stream1") and not board.is_gone("stream2") and not board.is_gone("")
    assert "stream1" not in board.names()
    board.mark_gone("../stream3")
    assert not board.is_gone("../stream3") and not (tmp_path / "stream3").exists()
    board.mark_gone("stream2")
    old = time.time() - 3600
    os.utime(tmp_path / GONE / "stream1", (old, old))
    assert board.sweep(older_than_s=60) == 1
    assert not board.is_gone("stream1") and board.is_gone("stream2") and (tmp_path / GONE).is_dir()


def test_cancel_watch_control_and_codec_markers(tmp_path):
    board = CancelBoard(tmp_path)
    watch = CancelWatch(board, period_s=3600)  # passes are run by hand below
    try:
        fired = []
        now = time.time()
        a = watch.register([request_key("req a"), "streamA"], now, lambda src, at: fired.append(("a", src)))
        watch.register([request_key("b/../c"), "streamB"], now, lambda src, at: fired.append(("b", src)))
        assert watch.check() == 0 and fired == []
        # the control call: any request id (hashed into a valid marker name); reports "running"
        board.post(live_key("req a"))
        assert board.cancel_request("req a") is True and board.cancel_request("unknown") is False
        assert watch.check() == 1 and fired == [("a", "control")]
        assert watch.check() == 0  # once per request
        board.post("streamB")  # the codec path
        assert watch.check() == 1 and fired[-1] == ("b", "watch")
        watch.unregister(a)
        # a control marker older than the grace period belongs to an earlier request with that id
        board.post(request_key("old"))
        stale = time.time() - CONTROL_GRACE_S - 10
        os.utime(tmp_path / request_key("old"), (stale, stale))
        watch.register([request_key("old")], time.time(), lambda src, at: fired.append(("old", src)))
        assert watch.check() == 0
        # ... but one posted before the request reached chroma_lm (within the grace) counts
        board.post(request_key("early"))
        watch.register([request_key("early")], time.time() + 5, lambda src, at: fired.append(("early", src)))
        assert watch.check() == 1 and fired[-1] == ("early", "control")
        assert request_key("x") != request_key("y") and board._path(request_key("a" * 500)) is not None
        # the sweep leaves live markers of running requests alone
        os.utime(tmp_path / live_key("req a"), (stale, stale))
        board.sweep(older_than_s=1)
        assert board.is_posted(live_key("req a")) and not board.is_posted(request_key("old"))
        # both markers of one request on the board: it fires once, by its first key; a stale
        # control marker does not hide a valid codec marker of the same request
        board.post(request_key("both"))
        board.post("streamBoth")
        watch.register([request_key("both"), "streamBoth"], time.time(), lambda src, at: fired.append(("both", src)))
        board.post(request_key("stale2"))
        os.utime(tmp_path / request_key("stale2"), (stale, stale))
        board.post("streamS")
        watch.register([request_key("stale2"), "streamS"], time.time(), lambda src, at: fired.append(("s", src)))
        assert watch.check() == 2 and fired[-2:] == [("both", "control"), ("s", "watch")]
        assert watch.check() == 0
        assert set(watch._by_key) == {request_key("old")}  # fired ones forgotten; "old" still waits
    finally:
        watch.close()
    with pytest.raises(ValueError, match="must be > 0"):
        CancelWatch(board, period_s=0)


def test_model_args_and_backends():
    cfg = {"name": "chroma_lm", "parameters": {"max_batch": {"string_value": "4"}, "model_path": {"string_value": ""}}}
    a = ModelArgs.from_triton({"model_config": json.dumps(cfg), "model_instance_kind": "GPU",
                               "model_instance_device_id": "1", "model_instance_name": "chroma_lm_0_1"})
    assert a.device == "cuda:1" and a.int("max_batch", 8) == 4 and a.str("model_path", "x") == "x"
    a = ModelArgs.from_triton({"model_config": json.dumps(cfg), "model_instance_kind": "CPU"})
    assert a.device == "cpu" and a.instances == 1  # no instance_group: Triton's one instance
    # how many instances hold_when_full counts (auto: more than one); dp 2 renders gpus [0, 1]
    for groups, n in [([{"count": 1, "kind": "KIND_GPU", "gpus": [0, 1]}], 2), ([{"count": 2, "kind": "KIND_CPU"}], 2),
                      ([{"count": 1, "kind": "KIND_CPU"}], 1), ([{"count": 2, "kind": "KIND_GPU", "gpus": [0]}], 2)]:
        assert ModelArgs.from_triton({"model_config": json.dumps({**cfg, "instance_group": groups})}).instances == n
    assert [thinker_backend(v) for v in ("auto", "Torch", "sglang", "")] == ["auto", "torch", "sglang", "auto"]
    with pytest.raises(ValueError):
        thinker_backend("vllm")
    path, text = resolve_default_voice("assets/voices/default.wav")
    assert path.is_file() and text


@pytest.mark.parametrize("value, kind, expected", [("auto", "GPU", True), ("", "GPU", True), ("auto", "CPU", False),
                                                   ("false", "GPU", False), ("true", "CPU", True)])
@pytest.mark.parametrize("name", ["compile", "prefill_graphs", "fused_sampling", "gemv"])
def test_auto_options_follow_the_device(name, value, kind, expected):
    from chroma_triton.serving.triton_lm import engine_options

    cfg = {"name": "chroma_lm", "parameters": {name: {"string_value": value}}}
    a = ModelArgs.from_triton({"model_config": json.dumps(cfg), "model_instance_kind": kind})
    assert getattr(engine_options(a), name) is expected
    cfg["parameters"][name]["string_value"] = "sometimes"
    with pytest.raises(ValueError, match=name):
        engine_options(ModelArgs.from_triton({"model_config": json.dumps(cfg), "model_instance_kind": kind}))


ALL = "every trunk where Triton is available"  # the value auto gives a GPU instance


@pytest.mark.parametrize("value, kind, expected", [
    ("auto", "GPU", ALL), ("AUTO", "GPU", ALL), ("auto", "CPU", ""), ("", "GPU", ALL), ("none", "GPU", ""),
    (" None ", "GPU", ""), ("backbone", "CPU", "backbone"), ("thinker,decoder", "GPU", "thinker,decoder")])
def test_decode_attention_auto_is_every_trunk_on_a_gpu_and_none_on_the_cpu(value, kind, expected):
    from chroma_triton.model import decode_attention
    from chroma_triton.serving.triton_lm import engine_options

    every = "thinker,backbone,decoder" if decode_attention.available() else ""

    def option(params, kind):
        cfg = {"name": "chroma_lm", "parameters": params}
        return engine_options(ModelArgs.from_triton({"model_config": json.dumps(cfg),
                                                     "model_instance_kind": kind})).decode_attention

    assert option({"decode_attention": {"string_value": value}}, kind) == (every if expected is ALL else expected)
    assert option({}, "GPU") == every and option({}, "CPU") == ""  # left out of the config: auto


def test_trace_path_names_each_instance_its_own_file():
    from chroma_triton.serving.triton_lm import engine_options

    cfg = {"name": "chroma_lm", "parameters": {"trace_path": {"string_value": "/tmp/t_{device}_{instance}.jsonl"}}}
    a = ModelArgs.from_triton({"model_config": json.dumps(cfg), "model_instance_kind": "GPU",
                               "model_instance_device_id": "1", "model_instance_name": "chroma_lm_0_0"})
    assert engine_options(a).trace_path == "/tmp/t_cuda1_chroma_lm_0_0.jsonl"
    assert engine_options(ModelArgs.from_triton({"model_config": json.dumps({"name": "chroma_lm"})})).trace_path == ""


def test_admission_wait_clock_comes_from_the_config():
    from chroma_triton.serving.triton_lm import engine_options

    assert engine_options(ModelArgs.from_triton({"model_config": json.dumps({"name": "chroma_lm"})})).admission_wait_clock == "free_row"
    cfg = {"name": "chroma_lm", "parameters": {"admission_wait_clock": {"string_value": "arrival"}}}
    assert engine_options(ModelArgs.from_triton({"model_config": json.dumps(cfg)})).admission_wait_clock == "arrival"


def test_the_thinker_prefix_cache_is_sized_by_the_config():
    """The shipped config.pbtxt leaves its size to the engine's plan ("auto", since session 26) with
    256 positions to match; a config without the parameter leaves it off (the engine's default); a
    number is MiB; anything else is refused with the parameter's name."""
    from chroma_triton.engine.capacity import PREFIX_CACHE_AUTO
    from chroma_triton.serving.triton_lm import engine_options

    shipped = (ROOT / "model_repository" / "chroma_lm" / "config.pbtxt").read_text()
    assert 'key: "thinker_prefix_cache_mib" value: { string_value: "auto" }' in shipped
    assert 'key: "thinker_prefix_min_tokens" value: { string_value: "256" }' in shipped
    opts = engine_options(ModelArgs.from_triton({"model_config": json.dumps({"name": "chroma_lm"})}))
    assert (opts.thinker_prefix_cache_mib, opts.thinker_prefix_min_tokens) == (0, 256)
    cfg = {"name": "chroma_lm", "parameters": {"thinker_prefix_cache_mib": {"string_value": "2048"},
                                               "thinker_prefix_min_tokens": {"string_value": "128"}}}
    opts = engine_options(ModelArgs.from_triton({"model_config": json.dumps(cfg)}))
    assert (opts.thinker_prefix_cache_mib, opts.thinker_prefix_min_tokens) == (2048, 128)
    for value, expected in (("auto", PREFIX_CACHE_AUTO), (" AUTO ", PREFIX_CACHE_AUTO), ("0", 0)):
        cfg["parameters"]["thinker_prefix_cache_mib"]["string_value"] = value
        assert engine_options(ModelArgs.from_triton({"model_config": json.dumps(cfg)})).thinker_prefix_cache_mib == expected
    for value in ("lots", "-1"):
        cfg["parameters"]["thinker_prefix_cache_mib"]["string_value"] = value
        with pytest.raises(ValueError, match="thinker_prefix_cache_mib.*or auto"):
            engine_options(ModelArgs.from_triton({"model_config": json.dumps(cfg)}))


# -- audio encoder ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder_parts(tiny_checkpoint):
    from chroma_triton.model.loading import load_parts

    return load_parts(tiny_checkpoint, parts={"audio_tower", "codec"})


DEFAULT_VOICE = (ROOT / "assets/voices/default.wav").read_bytes(), "default transcript"


def test_features_device_parameter(encoder_parts):
    """features_device: auto (the tower's GPU, the CPU without one) or cpu; anything else fails the
    load with the values it takes."""
    from chroma_triton.serving.triton_audio_encoder import features_on_device

    assert features_on_device("auto") is True and features_on_device("cpu") is False
    with pytest.raises(ValueError, match="'auto' or 'cpu'"):
        features_on_device("gpu")
    tower = encoder_parts.audio_tower
    assert tower.use_device_features(True) == "cpu"  # a CPU tower: nowhere else to go
    assert tower.features_device == "cpu"


@pytest.fixture(scope="module")
def encoder(encoder_parts):
    from chroma_triton.serving.triton_audio_encoder import AudioEncoderService

    return AudioEncoderService(encoder_parts, DEFAULT_VOICE)


def test_conversation_clips_go_through_the_tower_once(encoder_parts, question_wav, ref_voice):
    """A client resends every earlier turn's clip: with the clip cache each distinct clip is embedded
    once (a clip twice in one batch too), and every request gets the embeddings an encoder without
    the cache computes."""
    from chroma_triton.serving.triton_audio_encoder import AudioEncoderService, EncoderInput
    from chroma_triton.voice_cache import bytes_key

    cached = AudioEncoderService(encoder_parts, DEFAULT_VOICE, clip_cache_mib=64)
    plain = AudioEncoderService(encoder_parts, DEFAULT_VOICE, clip_cache_mib=0)
    second = ref_voice[0]  # another clip (the reference recording) as the user's next turn
    turns = [[question_wav], [question_wav, second], [question_wav, second, question_wav]]
    seen = []
    for clips in turns:  # one conversation, turn by turn
        got, want = cached.encode_batch([EncoderInput(clips, b"", "")])[0], plain.encode_batch([EncoderInput(clips, b"", "")])[0]
        np.testing.assert_array_equal(got.audio_token_counts, want.audio_token_counts)
        np.testing.assert_allclose(got.audio_embeds, want.audio_embeds, rtol=1e-5, atol=1e-5)
        seen.append((cached.clip_counts()["embedded"], cached.clip_counts()["reused"]))
    assert seen == [(1, 0), (2, 1), (2, 4)]  # the third turn: all three from the cache
    both = AudioEncoderService(encoder_parts, DEFAULT_VOICE, clip_cache_mib=64)
    both.encode_batch([EncoderInput([question_wav], b"", ""), EncoderInput([second], b"", "")])  # one tower pass
    kept = [both.clips.get(bytes_key(clip)) for clip in (question_wav, second)]
    assert all(k.untyped_storage().nbytes() == k.nbytes for k in kept)  # each its own memory, not the batch's
    assert both.clips.nbytes == sum(k.nbytes for k in kept)
    assert plain.clip_counts()["embedded"] == 5 and len(plain.clips) == 0  # without the cache: every turn again (a clip twice in one request once)
    # two requests of one batch sharing a clip new to this encoder: one tower pass for it
    fresh = AudioEncoderService(encoder_parts, DEFAULT_VOICE, clip_cache_mib=64)
    out = fresh.encode_batch([EncoderInput([second], b"", ""), EncoderInput([second, b"garbage"], b"", ""),
                              EncoderInput([second], b"", "")])
    assert fresh.clip_counts() == {"embedded": 1, "reused": 1, "shared": 0} and isinstance(out[1], InvalidRequestError)
    # its time by stage: the voice and the clips' features for all three, one tower pass, two outputs
    spent = fresh.stage_seconds()
    assert set(spent) == {"voice", "features", "tower", "output"} and all(v > 0 for v in spent.values()), spent
    np.testing.assert_array_equal(out[0].audio_embeds, out[2].audio_embeds)
    assert len(fresh.clips) == 1  # the bad clip left nothing behind
    with pytest.raises(ValueError):
        AudioEncoderService(encoder_parts, DEFAULT_VOICE, clip_cache_mib=-1)


def test_batched_tower_matches_one_clip_at_a_time(encoder, question_wav):
    from chroma_triton.audio_io import decode_audio

    tower = encoder.tower
    wavs = [decode_audio(question_wav, 16000), decode_audio(question_wav, 16000)[: 16000 * 2 + 123]]
    batched = encoder.embed_features([tower.features(w) for w in wavs])
    for w, b in zip(wavs, batched):
        single = tower.embed(w)
        assert single.shape == b.shape
        torch.testing.assert_close(b, single, atol=1e-4, rtol=1e-4)


def test_encode_batch_isolates_bad_requests(encoder, question_wav, ref_voice):
    from chroma_triton.serving.triton_audio_encoder import EncoderInput

    out = encoder.encode_batch([
        EncoderInput([question_wav, question_wav], ref_voice[0], ref_voice[1]),
        EncoderInput([b"garbage"], b"", ""),
        EncoderInput([], b"", ""),  # default voice, no user audio
        EncoderInput([b""], ref_voice[0], ""),  # voice without transcript
        EncoderInput([b""], b"", "orphan transcript"),
    ])
    good, bad, default, no_text, orphan = out
    assert good.audio_embeds.shape == (int(good.audio_token_counts.sum()), encoder.hidden)
    assert len(good.audio_token_counts) == 2 and good.voice_text == ref_voice[1]
    assert isinstance(bad, InvalidRequestError) and "user_audio[0]" in str(bad)
    assert default.audio_embeds.shape == (0, encoder.hidden) and default.voice_text == "default transcript"
    assert default.prompt_codes.shape[1] == encoder.codec.num_codebooks
    assert isinstance(no_text, InvalidRequestError) and "prompt_text" in str(no_text)
    assert isinstance(orphan, InvalidRequestError)


def test_encoder_output_is_the_clips_rows_in_float32(encoder):
    """A request's rows: its clips' embeddings (kept in the tower's dtype) one after another, as
    float32, values unchanged; no clip: zero rows of the thinker's width."""
    clips = [torch.randn(n, encoder.hidden).to(torch.bfloat16) for n in (3, 1, 5)]
    out = encoder._output(clips, np.zeros((2, 8), np.int64), "text")
    assert out.audio_embeds.dtype == np.float32 and out.audio_embeds.flags.c_contiguous
    np.testing.assert_array_equal(out.audio_embeds, torch.cat(clips).float().numpy())
    np.testing.assert_array_equal(out.audio_token_counts, [3, 1, 5])
    assert out.prompt_codes.dtype == np.int32
    assert encoder._output([], np.zeros((2, 8), np.int64), "text").audio_embeds.shape == (0, encoder.hidden)


def test_encoder_output_in_bf16_is_the_clips_rows_unrounded(encoder, monkeypatch):
    """With audio_embeds typed BF16 (the GPU default), a request's rows are one bf16 torch tensor:
    the clips' bf16 embeddings bit for bit (a GPU tower's dtype: nothing is rounded), float32 ones
    rounded once."""
    monkeypatch.setattr(encoder, "embeds_dtype", torch.bfloat16)
    clips = [torch.randn(n, encoder.hidden).to(torch.bfloat16) for n in (3, 1, 5)]
    out = encoder._output(clips, np.zeros((2, 8), np.int64), "text")
    assert isinstance(out.audio_embeds, torch.Tensor) and out.audio_embeds.dtype == torch.bfloat16
    assert out.audio_embeds.is_contiguous()
    assert torch.equal(out.audio_embeds.view(torch.int16), torch.cat(clips).view(torch.int16))
    wide = [c.float() + 1e-3 for c in clips]
    assert torch.equal(encoder._output(wide, np.zeros((2, 8), np.int64), "t").audio_embeds, torch.cat(wide).bfloat16())
    assert encoder._output([], np.zeros((2, 8), np.int64), "t").audio_embeds.shape == (0, encoder.hidden)


def test_lm_prepare_takes_bf16_embeddings_and_copies_them(tiny_checkpoint, question_wav):
    """chroma_lm reads audio_embeds through DLPack as the config's dtype: bf16 rows go to the engine
    as they came (reordered into prompt order, as float32 ones), in memory of their own (the
    input's is Triton's and goes with the request); float32 numpy still works (direct callers)."""
    from chroma_triton.model.loading import load_parts
    from chroma_triton.serving.triton_lm import LMInput, LMService, PromptBuilder

    parts = load_parts(tiny_checkpoint, parts={"tokenizer"})
    lm = LMService.__new__(LMService)  # prepare needs no engine
    lm.num_codebooks, lm.hidden = parts.config.num_codebooks, int(parts.config.thinker.text.hidden_size)
    lm.prompts = PromptBuilder(parts.tokenizer, parts.special.audio)
    # clip 1 is named first in the conversation: the engine gets its rows first
    messages = json.dumps([{"role": "user", "content": [{"type": "audio", "audio_index": 1},
                                                          {"type": "audio", "audio_index": 0}]}])
    wire = torch.randn(1, 5, lm.hidden).to(torch.bfloat16)

    def prepared(embeds):
        return lm.prepare(LMInput(messages=messages, audio_embeds=embeds, audio_token_counts=np.array([[2, 3]], np.int32),
                                  prompt_codes=np.zeros((1, 4, lm.num_codebooks), np.int32), voice_text="voice"))

    got = prepared(wire).audio_embeds
    assert got.dtype == torch.bfloat16 and torch.equal(got, torch.cat([wire[0, 2:], wire[0, :2]]))
    wire.zero_()  # Triton reuses the input's memory once the request is answered
    assert got.abs().sum() > 0
    as_fp32 = prepared(torch.cat([got[3:], got[:3]])[None].float().numpy()).audio_embeds
    assert as_fp32.dtype == torch.float32 and torch.equal(as_fp32, got.float())
    with pytest.raises(InvalidRequestError, match="float32 or bfloat16"):
        prepared(torch.zeros(1, 5, lm.hidden, dtype=torch.float16))
    with pytest.raises(InvalidRequestError, match="0 rows"):  # none given: no rows, a client's error
        prepared(None)
    with pytest.raises(InvalidRequestError, match="columns"):
        prepared(torch.zeros(1, 5, lm.hidden + 1, dtype=torch.bfloat16))


def test_prepare_threads_give_what_one_thread_gives(encoder_parts, question_wav, ref_voice, monkeypatch):
    """A batch prepared on several threads (every clip and voice at once, the outputs too) answers
    each request as one thread does: the same embeddings, and for a bad request the same first
    error (its voice's before its clips', its first bad clip's before later ones). One thread
    stops a request at its first error; the threads encode a new voice once per batch."""
    import threading

    from chroma_triton.serving.triton_audio_encoder import AudioEncoderService, EncoderInput

    second = ref_voice[0]
    voice = (question_wav, "a voice new to the service")  # (the reference recording is its default voice)
    batch = [EncoderInput([question_wav, second, question_wav], *voice),
             EncoderInput([second, b"garbage", b""], b"", ""),  # two bad clips: the first one is reported
             EncoderInput([b"garbage"], ref_voice[0], ""),  # a bad voice and a bad clip: the voice
             EncoderInput([second], *voice)]  # the first request's voice again
    answers, clip_threads, voice_encodes = {}, {}, {}
    for threads in (1, 4):
        service = AudioEncoderService(encoder_parts, DEFAULT_VOICE, prepare_threads=threads)
        seen, encodes = [], []
        user_clip, encode = service.user_clip, service.codec.encode
        monkeypatch.setattr(service, "user_clip", lambda *a: (seen.append(threading.current_thread().name), user_clip(*a))[1])
        monkeypatch.setattr(service.codec, "encode", lambda wav: (encodes.append(1), encode(wav))[1])
        answers[threads] = service.encode_batch(batch)
        clip_threads[threads], voice_encodes[threads] = seen, len(encodes)
        monkeypatch.undo()
        assert service.clip_counts() == {"embedded": 2, "reused": 2, "shared": 0}  # the good requests: 4 clips, 2 distinct
        assert all(v > 0 for v in service.stage_seconds().values())
        service.close()
    for one, many in zip(answers[1], answers[4]):
        if isinstance(one, Exception):
            assert type(one) is type(many) and str(one) == str(many)
        else:
            np.testing.assert_array_equal(one.audio_embeds, many.audio_embeds)
            np.testing.assert_array_equal(one.audio_token_counts, many.audio_token_counts)
            np.testing.assert_array_equal(one.prompt_codes, many.prompt_codes)
    assert "user_audio[1]" in str(answers[4][1]) and "prompt_text" in str(answers[4][2])
    # one thread: request 1 stops at its bad clip (its empty third one is never looked at), request
    # 2 at its voice (no clip); the threads did every clip, none on the caller's thread
    assert len(clip_threads[1]) == 3 + 2 + 0 + 1 and set(clip_threads[1]) == {threading.current_thread().name}
    assert len(clip_threads[4]) == 3 + 3 + 1 + 1 and all(n.startswith("encoder-prepare") for n in clip_threads[4])
    assert voice_encodes[1] == voice_encodes[4] == 1  # the new voice, twice in the batch: encoded once
    with pytest.raises(ValueError, match="prepare_threads"):
        AudioEncoderService(encoder_parts, DEFAULT_VOICE, prepare_threads=0)


# -- codec: streamed vs one-shot ------------------------------------------------------------------
def test_codec_streamed_decode_matches_one_shot(encoder):
    """Measured difference of chunked decoding with left context vs decoding everything at once
    (tiny checkpoint's Mimi; numbers are in README.md ("Serving on Triton")). Chunks cut the way the engine cuts
    them: 2 frames, then growing to 10, each with 12 frames of context."""
    codec = encoder.codec
    codes = np.random.default_rng(0).integers(0, codec.codebook_size, size=(120, codec.num_codebooks))
    plan, sent, ctx = [], 0, 12
    while sent < len(codes):
        end = min(len(codes), sent + (2 if sent == 0 else min(10, sent)))
        plan.append((codes[sent - min(ctx, sent):end], min(ctx, sent)))
        sent = end
    d = streaming_difference(codec, codes, plan)
    carried = streaming_difference(codec, codes, plan, carried=True)
    print(f"codec streamed vs one-shot: {d}, SNR {d.snr_db:.1f} dB; carried {carried}, SNR {carried.snr_db:.1f} dB")
    assert d.samples == carried.samples == len(codes) * codec.frame_size
    assert d.rms < 1e-4 * max(d.signal_rms, 1.0) and d.snr_db > 80
    assert carried.rms < 1e-4 * max(d.signal_rms, 1.0) and carried.snr_db > 80
    no_ctx = streaming_difference(codec, codes, [(codes[s:e], 0) for _, s, e in chunk_plan(len(codes), 2, 10, 0)])
    assert no_ctx.rms > 100 * d.rms  # without left context there are seams
    # with only 4 frames of context the stateless SEANet decoder misses part of its receptive field
    # (seams); carried, it continues its own state and only the transformer sees less history
    short = [(codes[a:e], s - a) for a, s, e in chunk_plan(len(codes), 2, 10, 4)]
    short_stateless, short_carried = (streaming_difference(codec, codes, short, carried=c) for c in (False, True))
    assert short_carried.rms < short_stateless.rms / 100 and short_carried.snr_db > 80


# -- repository rendering and the launcher ---------------------------------------------------------
def test_render_gpu_and_cpu(tmp_path):
    configs = render_configs(RenderSpec(model_path="/m", kind="gpu", dp_size=2, params={"chroma_lm": {"max_batch": "3"}}))
    lm = parse_config(configs["chroma_lm"])
    assert lm.instance_group[0].kind == lm.instance_group[0].KIND_GPU and list(lm.instance_group[0].gpus) == [0, 1]
    assert lm.parameters["model_path"].string_value == "/m" and lm.parameters["max_batch"].string_value == "3"
    assert "gpus: [0, 1]" in configs["chroma_lm"]
    repo = render_repository(tmp_path / "repo", RenderSpec())
    assert (tmp_path / "repo/chroma_lm/1/model.py").is_file() and (tmp_path / "repo/chroma/1").is_dir()
    assert "KIND_CPU" in repo["codec_decoder"]
    with pytest.raises(ValueError, match="no parameter"):
        render_configs(RenderSpec(params={"chroma_lm": {"nope": "1"}}))


def test_codec_instances_share_stream_states_only_on_several_gpus():
    """One codec_decoder instance per GPU at dp > 1: their streams' states are shared (1024 per
    instance); one GPU or the CPU: one instance, nothing to share; an explicit value wins."""
    def shared(**kw):
        codec = parse_config(render_configs(RenderSpec(**kw))["codec_decoder"])
        return codec.parameters["shared_stream_states"].string_value

    assert shared(kind="gpu", dp_size=2) == "1024" and shared(kind="gpu", dp_size=4) == "1024"
    assert shared(kind="gpu", dp_size=1) == "0" and shared(kind="cpu") == "0"
    assert shared(kind="gpu", dp_size=2, params={"codec_decoder": {"shared_stream_states": "0"}}) == "0"


def test_lm_instances_share_thinker_prefixes_only_on_several_gpus():
    """One chroma_lm instance per GPU at dp > 1: each copies the stored prompts it lacks from the
    other's thinker prefix cache; one GPU or the CPU: nothing to share; an explicit value wins.
    The parameter names the tritonserver's board folder as the engines' meeting place."""
    from chroma_triton.serving.cancel_board import default_dir
    from chroma_triton.serving.model_args import ModelArgs
    from chroma_triton.serving.triton_lm import engine_options

    def shared(**kw):
        lm = parse_config(render_configs(RenderSpec(**kw))["chroma_lm"])
        return lm.parameters["shared_thinker_prefixes"].string_value

    assert shared(kind="gpu", dp_size=2) == "true" and shared(kind="gpu", dp_size=1) == "false"
    assert shared(kind="cpu") == "false"
    assert shared(kind="gpu", dp_size=2, params={"chroma_lm": {"shared_thinker_prefixes": "false"}}) == "false"

    def folder(value):
        args = ModelArgs("chroma_lm", {}, {"shared_thinker_prefixes": value}, "cpu", "chroma_lm_0")
        return engine_options(args).thinker_prefix_peers

    assert folder("false") == "" and folder("true") == str(default_dir() / "thinker-prefixes")


def test_audio_embeds_dtype_follows_the_device_unless_given():
    """audio_embeds (audio_encoder's output, chroma_lm's input) is BF16 on GPUs and FP32 on the CPU
    (auto), or what RenderSpec.embeds_dtype names; the models read their type from the config."""
    from chroma_triton.serving.model_args import tensor_dtype

    def types(**kw):
        configs = render_configs(RenderSpec(**kw))
        enc, lm = parse_config(configs["audio_encoder"]), parse_config(configs["chroma_lm"])
        out = next(t for t in enc.output if t.name == "audio_embeds")
        inp = next(t for t in lm.input if t.name == "audio_embeds")
        assert out.data_type == inp.data_type  # the ensemble refuses to load otherwise
        from tritonclient.grpc import model_config_pb2

        return model_config_pb2.DataType.Name(out.data_type)

    assert types(kind="gpu") == "TYPE_BF16" and types(kind="cpu") == "TYPE_FP32"
    assert types(kind="gpu", embeds_dtype="fp32") == "TYPE_FP32" and types(kind="cpu", embeds_dtype="bf16") == "TYPE_BF16"
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        render_configs(RenderSpec(embeds_dtype="fp16"))
    config = {"name": "m", "output": [{"name": "audio_embeds", "data_type": "TYPE_BF16"}],
              "input": [{"name": "x", "data_type": "TYPE_INT32"}]}
    assert tensor_dtype(config, "audio_embeds") == torch.bfloat16
    with pytest.raises(ValueError, match="TYPE_INT32"):
        tensor_dtype(config, "x")
    with pytest.raises(ValueError, match="no tensor"):
        tensor_dtype(config, "y")


def _launcher(*args, env=None, timeout=60):
    full_env = {**os.environ, "CHROMA_GPU_COUNT": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "chroma_triton.serving.launcher", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=ROOT)


@pytest.mark.triton
def test_dry_run_dp2_renders_two_gpus():
    out = _launcher("--dry-run", "--dp-size", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("gpus: [0, 1]") == 3  # chroma_lm, audio_encoder, codec_decoder
    assert "KIND_GPU" in out.stdout and "NOISE" in out.stderr  # no model path: demo warning


@pytest.mark.triton
def test_dry_run_conversation_affinity_is_off_unless_asked_for():
    """--conversation-affinity on gives chroma_lm a sequence batcher (off, the default, at any dp);
    --conversation-idle-s sets its idle timeout; a timeout <= 0 is refused."""
    def batcher(*args):
        out = _launcher("--dry-run", *args)
        assert out.returncode == 0, out.stderr
        lm = parse_config(out.stdout.split("# ===== chroma_lm/config.pbtxt =====")[1].split("# =====")[0])
        return lm.sequence_batching.max_sequence_idle_microseconds if lm.HasField("sequence_batching") else None

    assert batcher() is None and batcher("--dp-size", "2") is None
    assert batcher("--dp-size", "2", "--conversation-affinity", "on") == 120_000_000
    assert batcher("--conversation-affinity", "on", "--conversation-idle-s", "2.5") == 2_500_000
    for bad in ("0", "inf", "1e9"):
        out = _launcher("--dry-run", "--conversation-idle-s", bad)
        assert out.returncode == 2 and "--conversation-idle-s must be between 1 and 86400 seconds" in out.stderr, out.stderr


def test_render_conversation_affinity_only_in_chroma_lm():
    from chroma_triton.serving.affinity import CANDIDATE_SEQUENCES

    configs = render_configs(RenderSpec(conversation_idle_s=30))
    lm = parse_config(configs["chroma_lm"])
    assert lm.sequence_batching.max_sequence_idle_microseconds == 30_000_000
    assert lm.sequence_batching.oldest.max_candidate_sequences == CANDIDATE_SEQUENCES
    assert lm.model_transaction_policy.decoupled and len(lm.instance_group) == 1
    assert [n for n, text in configs.items() if "sequence_batching" in text] == ["chroma_lm"]
    assert "sequence_batching" not in render_configs(RenderSpec())["chroma_lm"]
    with pytest.raises(ValueError, match="must be between"):
        render_configs(RenderSpec(conversation_idle_s=-1))


def test_conversation_key_names_every_turn_of_a_conversation_alike():
    """The key digests the messages up to the first user turn (audio by its clip's bytes): a later
    turn, which resends them, gets the same key; another first clip or system prompt another."""
    from chroma_triton.serving.affinity import conversation_key, needs_start, opens_conversation

    def user(i):
        return {"role": "user", "content": [{"type": "audio", "audio_index": i}, {"type": "text", "text": "hi"}]}

    system = {"role": "system", "content": "Be brief."}
    first = [system, user(0)]
    later = [system, user(0), {"role": "assistant", "content": "Sure."}, user(1)]
    key = conversation_key(first, [b"clip-a"])
    assert key == conversation_key(later, [b"clip-a", b"clip-b"]) and key.startswith("conv-")
    assert key != conversation_key(first, [b"clip-c"])
    assert key != conversation_key([{"role": "system", "content": "Be long."}, user(0)], [b"clip-a"])
    assert conversation_key([user(5)], []) == conversation_key([user(5)], [])  # an index out of range: as it is
    assert opens_conversation(first) and not opens_conversation(later)
    message = ("in ensemble 'chroma', inference request for sequence conv-1 to model 'chroma_lm' must "
               "specify the START flag on the first request of the sequence")
    assert needs_start(message) and not needs_start("invalid request: max_tokens must be > 0")


def test_python_shared_memory_flag_reaches_tritonserver_or_is_refused():
    """--python-shm-mib INITIAL[,GROWTH] becomes the Python backend's --backend-config arguments
    (tests/test_tritonserver_runtime.py checks that Triton takes them); a bad value is a usage error."""
    out = _launcher("--dry-run", "--python-shm-mib", "64,16")
    assert out.returncode == 0, out.stderr
    assert (f"# tritonserver arguments beyond the defaults: --backend-config=python,shm-default-byte-size={64 << 20} "
            f"--backend-config=python,shm-growth-byte-size={16 << 20}") in out.stdout
    assert "tritonserver arguments" not in _launcher("--dry-run").stdout
    out = _launcher("--dry-run", "--python-shm-mib", "0")
    assert out.returncode == 2 and "--python-shm-mib '0': give INITIAL[,GROWTH] in MiB" in out.stderr, out.stderr


def test_warmup_frames_default_by_device_and_must_not_be_negative():
    out = _launcher("--dry-run", "--warmup-frames", "-1")
    assert out.returncode == 2 and "--warmup-frames must be >= 0" in out.stderr, out.stderr
    from chroma_triton.serving.launcher import WARMUP_FRAMES_GPU, build_parser, warmup_frames

    default = build_parser().parse_args([]).warmup_frames
    assert warmup_frames(default, "gpu") == WARMUP_FRAMES_GPU > 0 and warmup_frames(default, "cpu") == 0
    assert warmup_frames(5, "cpu") == 5 and warmup_frames(0, "gpu") == 0


def test_warmup_reports_a_server_that_is_not_there_and_a_stop():
    from chroma_triton.serving.tritonserver import free_port
    from chroma_triton.serving.warmup import send_warmup, send_warmups

    url = f"127.0.0.1:{free_port()}"  # nothing listens: the stream fails, the warm-up says so
    result = send_warmup(url, 3, timeout_s=20)
    assert result.error and result.first_audio_s is None and result.frames == 0 and result.total_s < 20
    stopped = send_warmups(url, 3, 2, stop=lambda: True)  # one per instance, each ends at the stop
    assert [r.error for r in stopped] == ["stopped", "stopped"]


def test_frontend_workers_are_two_per_gpu_unless_given():
    from types import SimpleNamespace

    from chroma_triton.serving.launcher import Launcher, build_parser

    def workers(*argv):
        launcher = Launcher(build_parser().parse_args(list(argv)))
        launcher.server = SimpleNamespace(grpc_url="localhost:8001")
        cmd = launcher._frontend_command()
        return cmd[cmd.index("--workers") + 1]

    assert workers() == "2" and workers("--dp-size", "2") == "4"  # two event loops per GPU's streams
    assert workers("--dp-size", "2", "--workers", "3") == "3" and workers("--workers", "1") == "1"


def test_the_launcher_passes_the_start_timeout_to_the_frontend_when_given():
    from types import SimpleNamespace

    from chroma_triton.serving.launcher import Launcher, build_parser

    def command(*argv):
        launcher = Launcher(build_parser().parse_args(list(argv)))
        launcher.server = SimpleNamespace(grpc_url="localhost:8001")
        return launcher._frontend_command()

    assert "--start-timeout" not in command()  # the frontend's own default
    cmd = command("--start-timeout", "45")
    assert cmd[cmd.index("--start-timeout") + 1] == "45.0"
    # with conversation affinity the frontend names conversations, and learns Triton's idle timeout
    assert "--conversation-idle-s" not in command("--conversation-idle-s", "30")
    cmd = command("--conversation-affinity", "on", "--conversation-idle-s", "30")
    assert cmd[cmd.index("--conversation-idle-s") + 1] == "30.0"


def _fake_mps_control(tmp_path, fail=False):
    """A stand-in for nvidia-cuda-mps-control (the real one needs an NVIDIA driver): it records
    each call's arguments, stdin and pipe directory."""
    calls = tmp_path / "mps_calls.txt"
    script = tmp_path / "bin" / "nvidia-cuda-mps-control"
    script.parent.mkdir()
    script.write_text(f"""#!/bin/sh
stdin=$( [ "$1" = "-d" ] && echo - || cat )
echo "args=$* stdin=$stdin pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY gpus=$CUDA_VISIBLE_DEVICES" >> {calls}
{"echo 'cannot start: no GPU' >&2; exit 3" if fail else "exit 0"}
""")
    script.chmod(0o755)
    return script, calls


def test_cuda_mps_modes(tmp_path):
    from chroma_triton.serving.cuda_mps import MpsError, find_control

    found = {"nvidia-cuda-mps-control": "/usr/bin/nvidia-cuda-mps-control"}.get
    assert find_control("auto", "gpu", which=found) == "/usr/bin/nvidia-cuda-mps-control"
    assert find_control("auto", "cpu", which=found) is None  # nothing to share on the CPU
    assert find_control("auto", "gpu", which=lambda _name: None) is None  # no driver utilities: without MPS
    assert find_control("off", "gpu", which=found) is None
    with pytest.raises(MpsError, match="not on PATH"):
        find_control("on", "gpu", which=lambda _name: None)
    with pytest.raises(MpsError, match="needs GPUs"):
        find_control("on", "cpu", which=found)
    with pytest.raises(MpsError, match="must be one of"):
        find_control("yes", "gpu", which=found)


def test_cuda_mps_daemon_has_its_own_pipes_and_quits(tmp_path):
    from chroma_triton.serving.cuda_mps import MpsDaemon, MpsError

    script, calls = _fake_mps_control(tmp_path)
    daemon = MpsDaemon(str(script), tmp_path / "mps-log")
    daemon.start()
    env = daemon.env
    assert Path(env["CUDA_MPS_PIPE_DIRECTORY"]).is_dir() and len(env["CUDA_MPS_PIPE_DIRECTORY"]) < 60
    daemon.stop()
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("args=-d stdin=- pipe=" + env["CUDA_MPS_PIPE_DIRECTORY"])
    assert lines[1].startswith("args= stdin=quit pipe=" + env["CUDA_MPS_PIPE_DIRECTORY"])
    assert not Path(env["CUDA_MPS_PIPE_DIRECTORY"]).exists()
    (tmp_path / "b").mkdir()
    broken, _ = _fake_mps_control(tmp_path / "b", fail=True)
    with pytest.raises(MpsError, match="exited with 3: cannot start: no GPU"):
        MpsDaemon(str(broken), tmp_path / "log2").start()


def test_cuda_mps_clients_count_gpus_within_the_daemons(tmp_path):
    """The daemon sees the launcher's CUDA_VISIBLE_DEVICES; its clients number those GPUs from 0
    (a client asking for GPU 1 of a daemon that sees only GPU 1 finds none)."""
    from chroma_triton.serving.cuda_mps import MpsDaemon

    script, calls = _fake_mps_control(tmp_path)
    daemon = MpsDaemon(str(script), tmp_path / "mps-log", visible="2,3")
    assert daemon.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    daemon.start()
    daemon.stop()
    assert [line.rsplit(" ", 1)[1] for line in calls.read_text().splitlines()] == ["gpus=2,3", "gpus=2,3"]
    assert MpsDaemon(str(script), tmp_path / "l2", visible="1").env["CUDA_VISIBLE_DEVICES"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in MpsDaemon(str(script), tmp_path / "l3", visible="").env


def test_launcher_points_the_stack_at_its_mps_daemon(tmp_path, monkeypatch):
    """--cuda-mps: the daemon starts before tritonserver (whose processes inherit its pipe
    directory) and quits after; `auto` runs on without MPS when the daemon cannot start, `on`
    refuses to."""
    from chroma_triton.serving.launcher import LaunchError, Launcher, build_parser

    script, calls = _fake_mps_control(tmp_path)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    launcher = Launcher(build_parser().parse_args([]))
    env = launcher._start_mps("gpu", tmp_path)
    assert env["CUDA_MPS_PIPE_DIRECTORY"] and env["CUDA_MPS_LOG_DIRECTORY"] == str(tmp_path / "mps-log")
    launcher._shutdown()
    assert [line.split(" stdin")[0] for line in calls.read_text().splitlines()] == ["args=-d", "args="]
    assert Launcher(build_parser().parse_args([]))._start_mps("cpu", tmp_path) == {}
    assert Launcher(build_parser().parse_args(["--cuda-mps", "off"]))._start_mps("gpu", tmp_path) == {}

    (tmp_path / "bad").mkdir()
    broken, _ = _fake_mps_control(tmp_path / "bad", fail=True)
    monkeypatch.setenv("PATH", f"{broken.parent}:{os.environ['PATH']}")
    assert Launcher(build_parser().parse_args([]))._start_mps("gpu", tmp_path) == {}  # auto: a warning
    with pytest.raises(LaunchError, match="exited with 3"):
        Launcher(build_parser().parse_args(["--cuda-mps", "on"]))._start_mps("gpu", tmp_path)


@pytest.mark.triton
def test_fail_fast_checks(tmp_path, tiny_checkpoint):
    out = _launcher("--dp-size", "3", env={"CHROMA_GPU_COUNT": "2"})
    assert out.returncode == 2 and "--dp-size 3 needs 3 GPU(s) but 2 are visible" in out.stderr
    out = _launcher("--dp-size", "3")  # this machine's real count (none here)
    assert out.returncode == 2 and "needs 3 GPU(s)" in out.stderr
    out = _launcher("--chroma-model-path", str(tmp_path / "missing"))
    assert out.returncode == 2 and "no such folder" in out.stderr
    out = _launcher("--chroma-model-path", str(tmp_path))
    assert out.returncode == 2 and "no config.json" in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _launcher("--chroma-model-path", str(tiny_checkpoint), "--host", "127.0.0.1", "--no-frontend",
                        "--triton-grpc-port", str(port))
    assert out.returncode == 2 and f"--triton-grpc-port {port}" in out.stderr and "already in use" in out.stderr
    out = _launcher("--thinker-backend", "sglang", "--device", "cpu", "--no-frontend")
    assert out.returncode == 2 and "needs a GPU" in out.stderr


def test_model_processes_get_small_thread_pools_on_gpus():
    from chroma_triton.serving.launcher import thread_env

    assert thread_env(None, "gpu", {}) == {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert thread_env(None, "cpu", {}) == {}  # the CPU demo computes on the CPU: keep the libraries' default
    assert thread_env(4, "cpu", {})["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in thread_env(None, "gpu", {"OMP_NUM_THREADS": "8"})  # the operator's setting wins


def test_compile_cache_survives_restarts_on_gpus(monkeypatch, tmp_path):
    from chroma_triton.serving.launcher import compile_cache_env

    monkeypatch.setenv("CHROMA_CACHE_DIR", str(tmp_path))
    assert compile_cache_env(None, "gpu", {}) == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "torch-compile")}
    assert compile_cache_env("/data/tc", "gpu", {}) == {"TORCHINDUCTOR_CACHE_DIR": "/data/tc"}
    assert compile_cache_env(None, "gpu", {"TORCHINDUCTOR_CACHE_DIR": "/x"}) == {}  # the operator's setting wins
    assert compile_cache_env("none", "gpu", {}) == {}
    assert compile_cache_env(None, "cpu", {}) == {}  # nothing compiles on the CPU (compile: auto)


def test_codec_decoder_batches_on_gpus_only():
    from chroma_triton.serving.repository import RenderSpec, render_configs

    assert "dynamic_batching" in render_configs(RenderSpec(kind="gpu", dp_size=1))["codec_decoder"]
    cpu = render_configs(RenderSpec(kind="cpu"))
    assert "dynamic_batching" not in cpu["codec_decoder"] and "max_batch_size: 64" in cpu["codec_decoder"]
    assert "dynamic_batching" in cpu["audio_encoder"]


def test_chroma_lm_defaults_on_the_cpu_relay_per_request_and_double_chunks():
    """The CPU render keeps the 200-stream soak flat (docs/reliability.md 2d); GPUs keep the
    config's values, and parameters given explicitly win on both."""
    from chroma_triton.serving.repository import RenderSpec, parse_config, render_configs

    def params(spec):
        config = parse_config(render_configs(spec)["chroma_lm"])
        return {k: config.parameters[k].string_value for k in ("relays", "start_slack_s")}

    assert params(RenderSpec(kind="cpu")) == {"relays": "per_request", "start_slack_s": "0"}
    assert params(RenderSpec(kind="gpu")) == {"relays": "shared", "start_slack_s": "0.14"}
    assert params(RenderSpec(kind="cpu", params={"chroma_lm": {"relays": "shared"}}))["relays"] == "shared"
