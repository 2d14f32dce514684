"""The engine's algorithm and its continuous batching, on the tiny checkpoint (CPU)."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chroma_triton.engine.graphs import batch_buckets, length_buckets
from chroma_triton.engine.pacing import AdmissionPacer
from chroma_triton.engine import (AudioChunk, ChromaEngine, EngineOptions, Finished, GenerationRequest,
                                  RequestFailed, SamplingParams, TextDelta)
from chroma_triton.errors import EngineError, InvalidRequestError
from chroma_triton.engine.voice_prefix import voice_key
from chroma_triton.pipeline import ChromaPipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    p = ChromaPipeline.from_pretrained(tiny_checkpoint, options=EngineOptions(max_batch=8))
    yield p
    p.close()


@pytest.fixture(scope="module")
def parts(pipe):
    return pipe.parts


def make_engine(pipe, **kw) -> ChromaEngine:
    pipe.engine.shutdown()  # one engine at a time owns the model's caches
    kw.setdefault("start_slack_s", 0.0)  # chunk plans must not depend on this machine's step time
    return ChromaEngine(pipe.parts, EngineOptions(**kw)).start()


def request(pipe, question_wav, ref_voice, text="Tell me something.", **sampling) -> GenerationRequest:
    content = [{"type": "audio", "audio": question_wav}, {"type": "text", "text": text}]
    return pipe.prepare([{"role": "user", "content": content}], ref_voice[0], ref_voice[1],
                        SamplingParams(**{"seed": 7, "max_tokens": 16, **sampling}))


def run(engine: ChromaEngine, req: GenerationRequest) -> dict:
    return collect(engine.submit(copy.deepcopy(req)))


def collect(stream) -> dict:
    out = {"text": "", "chunks": [], "finished": None, "failed": None}
    for ev in stream:
        if isinstance(ev, TextDelta):
            out["text"] += ev.text
        elif isinstance(ev, AudioChunk):
            out["chunks"].append(ev)
        elif isinstance(ev, Finished):
            out["finished"] = ev
        elif isinstance(ev, RequestFailed):
            out["failed"] = ev
    chunks = out["chunks"]
    out["codes"] = np.concatenate([c.codes[c.context_frames:] for c in chunks]) if chunks else np.zeros((0, 8), int)
    return out


def wait_idle(engine, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = engine.stats()
        if s["active"] == 0 and s["queued"] == 0 and s["free_rows"] == s["max_batch"]:
            return s
        time.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


# -- algorithm ----------------------------------------------------------------------------------
def test_backbone_prompt_layout(pipe, question_wav, ref_voice):
    req = request(pipe, question_wav, ref_voice)
    engine = pipe.engine
    x = engine._backbone_prompt(req)
    sp = pipe.parts.special
    thinker, frames = engine.thinker, engine.frames
    n_text = len(req.prompt_text_ids)
    n_frames = len(req.prompt_codes)
    assert x.shape[0] == 1 + n_text + 1 + n_frames + 1
    emb = thinker.embed(torch.tensor([sp.text_start, *req.prompt_text_ids, sp.text_end]))
    torch.testing.assert_close(x[: n_text + 2], emb)
    audio = frames.frame_embedding(torch.as_tensor(np.array(req.prompt_codes)))
    torch.testing.assert_close(x[n_text + 2 : n_text + 2 + n_frames], audio)
    # a frame embedding is the sum of its K codebook rows (codebook k uses rows k*V + code)
    table = frames.backbone.audio_embedding.embed_audio_tokens.weight
    v = pipe.cfg.backbone.audio_vocab_size
    manual = sum(table[k * v + int(req.prompt_codes[0][k])] for k in range(pipe.cfg.num_codebooks))
    torch.testing.assert_close(audio[0], manual)
    assert torch.count_nonzero(x[-1]) == 0, "the reference audio ends with an all-zero vector"


def test_interleave_schedule(pipe, question_wav, ref_voice, monkeypatch):
    engine = make_engine(pipe, max_batch=2)
    widths, thinker_calls = [], []
    orig_step, orig_decode = engine.frames.backbone_step, engine.thinker.decode

    def spy_step(x, positions, last, key_len, row_start=0, from_start=False):
        widths.append((x.shape[1], last.tolist(), positions[:, 0].tolist()))
        return orig_step(x, positions, last, key_len, row_start, from_start)

    def spy_decode(tokens, positions, key_len):
        h, nxt = orig_decode(tokens, positions, key_len)
        thinker_calls.append((tokens.tolist(), positions.tolist(), h.clone(), nxt.tolist()))
        return h, nxt

    monkeypatch.setattr(engine.frames, "backbone_step", spy_step)
    monkeypatch.setattr(engine.thinker, "decode", spy_decode)
    req = request(pipe, question_wav, ref_voice, max_tokens=12)
    try:
        out = run(engine, req)
    finally:
        engine.shutdown()
    prompt_len = engine._backbone_prompt(req).shape[0]
    # frame 0: the reference prompt (computed once per voice, then cached) and [h0, embed(t1)]
    # after it; then frame n feeds [frame n-1] and, on even n while the thinker talks,
    # [h, embed(t)] (a 3-wide step whose state is read at index 2)
    assert widths[0] == (prompt_len, [prompt_len - 1], [0])
    assert widths[1] == (2, [1], [prompt_len])
    frames = out["finished"].audio_frames
    steps = widths[2:frames + 1]
    expect_pos = prompt_len + 2
    for n, (width, last, pos) in enumerate(steps, start=1):
        talking = n % 2 == 0 and n // 2 <= len(thinker_calls)
        assert width == (3 if talking else 1), f"frame {n}"  # alone, a silent row never pads to 3
        assert last == [2 if talking else 0] and pos == [expect_pos], f"frame {n}"
        expect_pos += last[0] + 1
    # the thinker fed its own greedy tokens back at consecutive positions
    for (tok_a, pos_a, _, nxt_a), (tok_b, pos_b, _, _) in zip(thinker_calls, thinker_calls[1:]):
        assert tok_b == nxt_a and pos_b[0] == pos_a[0] + 1
    assert thinker_calls[0][1] == [len(req.thinker_ids)]


@pytest.mark.parametrize("ahead", [False, True])
def test_thinker_stops_after_im_end_pair(pipe, question_wav, ref_voice, monkeypatch, ahead):
    """Force <|im_end|> as the 3rd token: that pair is still fed (width 3), then frames only.
    Running ahead, the thinker computes one step past <|im_end|> before the host has read it; that
    step is dropped."""
    engine = make_engine(pipe, max_batch=1, thinker_ahead=ahead)
    im_end = pipe.parts.special.im_end
    orig_decode, orig_step = engine.thinker.decode, engine.frames.backbone_step
    calls, widths = [], []

    def decode(tokens, positions, key_len):
        h, nxt = orig_decode(tokens, positions, key_len)
        calls.append(1)
        if len(calls) == 2:
            nxt = torch.full_like(nxt, im_end)
        return h, nxt

    def step(x, positions, last, key_len, row_start=0, from_start=False):
        widths.append(int(last[0]) + 1)  # inputs the row really fed
        return orig_step(x, positions, last, key_len, row_start, from_start)

    monkeypatch.setattr(engine.thinker, "decode", decode)
    monkeypatch.setattr(engine.frames, "backbone_step", step)
    try:
        out = run(engine, request(pipe, question_wav, ref_voice, max_tokens=14))
    finally:
        engine.shutdown()
    assert len(calls) == 2 + ahead  # after the <|im_end|> pair the thinker is not called again
    # the prefill's two calls (the voice's prefix, then [h0, embed(t1)]), then the frames
    assert widths[2:] == [1, 3, 1, 3] + [1] * (len(widths) - 6)
    assert out["finished"].text_tokens == 2  # t1 and t2; <|im_end|> is not text


def _forced_frames(engine, monkeypatch, forced: dict[int, list[int]]):
    """Make frame n (counted per engine step) take the given codes."""
    orig = engine.frames.sample_frame
    count = [0]

    def sample_frame(state, params):
        codes = orig(state, params)
        if count[0] in forced:
            codes[:] = torch.tensor(forced[count[0]])
        count[0] += 1
        return codes

    monkeypatch.setattr(engine.frames, "sample_frame", sample_frame)


def test_eos_rule(pipe, question_wav, ref_voice, monkeypatch):
    engine = make_engine(pipe, max_batch=1)
    # frame 3: six zeros is not EOS; frame 5: first seven zeros (last one not) is EOS
    _forced_frames(engine, monkeypatch, {3: [0, 0, 0, 0, 0, 0, 5, 5], 5: [0, 0, 0, 0, 0, 0, 0, 9]})
    try:
        out = run(engine, request(pipe, question_wav, ref_voice, max_tokens=40))
    finally:
        engine.shutdown()
    assert out["finished"].reason == "stop"
    assert out["finished"].audio_frames == 5 == len(out["codes"])
    assert out["codes"][3].tolist() == [0, 0, 0, 0, 0, 0, 5, 5]


def test_max_tokens_is_frames(pipe, question_wav, ref_voice):
    engine = make_engine(pipe, max_batch=2)
    try:
        for n in (1, 7):
            out = run(engine, request(pipe, question_wav, ref_voice, max_tokens=n))
            assert out["finished"].reason == "length"
            assert out["finished"].audio_frames == n == len(out["codes"])
    finally:
        engine.shutdown()


def test_codes_are_clamped_before_decoding(parts):
    codec = parts.codec
    size = parts.config.codebook_size
    codes = np.random.default_rng(0).integers(0, size, (6, 8))
    over = codes.copy()
    over[2, 3] = size + 2  # a special id (e.g. pad) reaching the codec
    clamped = codes.copy()
    clamped[2, 3] = size - 1
    np.testing.assert_array_equal(codec.decode(over), codec.decode(clamped))
    assert len(codec.decode(codes)) == 6 * parts.config.frame_size


def test_chunks_start_small_and_grow(pipe, question_wav, ref_voice):
    engine = make_engine(pipe, max_batch=1, first_chunk_frames=2, chunk_frames=5, context_frames=3)
    try:
        out = run(engine, request(pipe, question_wav, ref_voice, max_tokens=14))
        wait_idle(engine)
        stats = engine.stats()
    finally:
        engine.shutdown()
    # the engine thread's time in steps: wall and CPU (a thread's CPU time never exceeds its wall)
    assert 0 < stats["host_cpu_s"] <= stats["host_step_s"] * 1.05 + 0.01
    new = [len(c.codes) - c.context_frames for c in out["chunks"]]
    assert new == [2, 2, 4, 5, 1]
    assert [c.context_frames for c in out["chunks"]] == [0, 2, 3, 3, 3]
    starts = [c.start_frame for c in out["chunks"]]
    assert starts == [0, 2, 4, 8, 13]


@pytest.mark.parametrize("step_ms, first", [(5.0, 2), (26.0, 3), (45.0, 4), (70.0, 10), (90.0, 10)])
def test_first_chunk_grows_when_steps_are_slow(pipe, step_ms, first):
    """f frames leave f x (80 ms - step) in hand when the second chunk goes out: the least f that
    leaves start_slack_s (capped at chunk_frames; a step slower than a frame gets chunk_frames)."""
    pipe.engine.shutdown()
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=1, start_slack_s=0.14))  # not started: no loop
    assert engine._chunk_plan().first == 2  # no step measured yet
    engine.pacer.step_s = step_ms / 1000
    assert engine._chunk_plan().first == first
    engine.opts.start_slack_s = 0.0
    assert engine._chunk_plan().first == 2
    with pytest.raises(ValueError, match="must be >= 0"):
        ChromaEngine(pipe.parts, EngineOptions(max_batch=1, forced_admissions=-1))
    with pytest.raises(ValueError, match="admission_wait_clock must be free_row or arrival"):
        ChromaEngine(pipe.parts, EngineOptions(max_batch=1, admission_wait_clock="submit"))


def test_waiting_requests_make_first_chunks_cover_their_prefill(pipe):
    """While requests wait for rows, a listener keeps their estimated prefill (+ the pacer's
    margin) in hand, not just start_slack_s: the pacer can then admit them without a stutter."""
    pipe.engine.shutdown()
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=1, start_slack_s=0.14, admission_margin_s=0.1))
    engine.pacer.step_s = 0.045  # 35 ms of audio gained per step
    engine.pacer.cost.observe(1000, 0.2)  # 0.2 s per 1000 prompt positions
    assert engine._chunk_plan().first == 4  # nobody waiting: 0.14 s
    engine._next_prefill_tokens = 1000
    plan = engine._chunk_plan()
    assert plan.slack_s == pytest.approx(0.3) and plan.first == 9  # ceil(0.3 / 0.035)
    engine.opts.admission_slack = False
    assert engine._chunk_plan().first == 4
    engine.opts.admission_slack, engine.opts.admission_pacing = True, False
    assert engine._chunk_plan().first == 4


def test_chunks_double_only_while_the_listener_keeps_the_slack(pipe):
    """After a chunk went out with `in_hand_s` of audio left at the listener, the next waits for at
    most as many frames as keep start_slack_s in hand when it goes out (at least
    first_chunk_frames): doubling alone runs thin when a step takes over half a frame time."""
    pipe.engine.shutdown()
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=1, start_slack_s=0.14, first_chunk_frames=2,
                                                    chunk_frames=10))
    engine.pacer.step_s = 0.045
    plan = engine._chunk_plan()
    stream = SimpleNamespace(sent=8, in_hand_s=0.4)
    assert engine._chunk_target(stream, plan) == 5  # (0.4 - 0.14) / 0.045 = 5.8 steps
    stream.in_hand_s = 2.0
    assert engine._chunk_target(stream, plan) == 8  # doubling: the audio already sent
    stream.sent = 40
    assert engine._chunk_target(stream, plan) == 10  # chunk_frames
    stream.in_hand_s = 0.1
    assert engine._chunk_target(stream, plan) == 2  # behind: first_chunk_frames
    engine.opts.start_slack_s = 0.0
    assert engine._chunk_target(stream, engine._chunk_plan()) == 10  # guard off with the start slack


def test_room_is_what_no_request_has_claimed(pipe, question_wav, ref_voice):
    """has_room / wait_for_room (hold_when_full): a row taken by a running request, by one being
    admitted or by one waiting is not room; a row freed by a finished one is, and wakes a waiter."""
    engine = make_engine(pipe, max_batch=1)
    try:
        assert engine.has_room() and engine.wait_for_room(0.01)
        stream = engine.submit(request(pipe, question_wav, ref_voice, max_tokens=40))
        assert not engine.has_room()  # queued: its row is claimed already
        assert not engine.wait_for_room(0.05)
        woke = []
        waiter = threading.Thread(target=lambda: woke.append(engine.wait_for_room(60)))
        waiter.start()
        collect(stream)
        waiter.join(60)
        assert woke == [True] and engine.has_room()
    finally:
        engine.shutdown()
    assert engine.has_room()  # a stopped engine holds nobody back (its submit fails clearly)


def test_chunks_sent_after_the_listener_ran_dry_are_counted(pipe):
    pipe.engine.shutdown()
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=1))
    sent = []
    stream = SimpleNamespace(frames=[np.zeros(8, dtype=np.int64)] * 6, sent=2, in_hand_s=0.0, chunks=1,
                             first_chunk_at=time.monotonic() - 1.0, stream=SimpleNamespace(put=sent.append))
    engine._send_chunk(stream)  # 2 frames (0.16 s) went out 1 s ago: 0.84 s late
    assert engine.counters["late_chunks"] == 1
    assert engine.counters["late_chunk_s"] == pytest.approx(0.84, abs=0.05)
    assert stream.sent == 6 and stream.in_hand_s == pytest.approx(6 * 0.08 - 1.0, abs=0.05)
    assert [c.start_frame for c in sent] == [2]
    stream.frames = stream.frames + [np.zeros(8, dtype=np.int64)] * 2
    stream.first_chunk_at = time.monotonic()  # 6 frames out just now: on time
    engine._send_chunk(stream)
    assert engine.counters["late_chunks"] == 1


def test_slow_steps_start_with_a_larger_chunk(pipe, question_wav, ref_voice):
    """Through the loop: with steps taking 45 ms, a stream's chunks are 4, 4, then the rest."""
    class Steps45ms(AdmissionPacer):  # the step time stays 45 ms (the loop neither learns nor resets it)
        step_s = property(lambda self: 0.045, lambda self, value: None)

    pipe.engine.shutdown()
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=1, start_slack_s=0.14, chunk_frames=10, context_frames=3))
    engine.pacer = Steps45ms()
    engine.start()
    try:
        out = run(engine, request(pipe, question_wav, ref_voice, max_tokens=14))
    finally:
        engine.shutdown()
    new = [len(c.codes) - c.context_frames for c in out["chunks"]]
    # then up to 6 (the rest) at once; fewer if this machine took so long for the second chunk's
    # 4 steps that 6 more would leave less than 0.14 s in hand (the 45 ms is the pacer's belief)
    assert new[:2] == [4, 4] and sum(new) == 14 and min(new[2:]) >= 2


# -- batching -----------------------------------------------------------------------------------
TEXTS = ["Hi.", "What is the capital of France and why?", "Count to five.", "Tell me a long story about a dragon.",
         "OK", "Explain tacos.", "Weather?", "Sing."]


def _requests(pipe, question_wav, ref_voice):
    return [request(pipe, question_wav, ref_voice, text=t, seed=100 + i, max_tokens=6 + 3 * i,
                    temperature=[1.0, 0.8][i % 2], top_p=[1.0, 0.9][i % 2]) for i, t in enumerate(TEXTS)]


def test_batch_invariance_alone_vs_concurrent_vs_joining(pipe, question_wav, ref_voice):
    reqs = _requests(pipe, question_wav, ref_voice)
    engine = make_engine(pipe, max_batch=8)
    try:
        alone = [run(engine, r) for r in reqs]
        # all 8 at once
        streams = [engine.submit(copy.deepcopy(r)) for r in reqs]
        together = [collect(s) for s in streams]
        # joining mid-run: start 4, wait for their first audio, then add the other 4
        first = [engine.submit(copy.deepcopy(r)) for r in reqs[:4]]
        results: dict[int, dict] = {}
        threads = [threading.Thread(target=lambda i=i, s=s: results.__setitem__(i, collect(s))) for i, s in enumerate(first)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        late = [collect(engine.submit(copy.deepcopy(r))) for r in reqs[4:]]
        for t in threads:
            t.join()
        joined = [results[i] for i in range(4)] + late
    finally:
        engine.shutdown()
    for i, a in enumerate(alone):
        assert a["finished"].audio_frames > 0
        for other in (together[i], joined[i]):
            np.testing.assert_array_equal(other["codes"], a["codes"], err_msg=f"request {i}")
            assert other["text"] == a["text"]
            assert other["finished"].reason == a["finished"].reason


def test_rows_are_reused_without_leaking_state(pipe, question_wav, ref_voice):
    """More requests than rows: queued requests reuse freed rows and still match their solo run."""
    reqs = _requests(pipe, question_wav, ref_voice)
    engine = make_engine(pipe, max_batch=8)
    try:
        alone = [run(engine, r) for r in reqs]
    finally:
        engine.shutdown()
    engine = make_engine(pipe, max_batch=3)
    try:
        streams = [engine.submit(copy.deepcopy(r)) for r in reqs]
        queued = [collect(s) for s in streams]
        wait_idle(engine)
    finally:
        engine.shutdown()
    for a, q in zip(alone, queued):
        np.testing.assert_array_equal(q["codes"], a["codes"])


def _chunk_plan(out: dict) -> list[tuple[int, int, int]]:
    return [(c.start_frame, c.context_frames, len(c.codes)) for c in out["chunks"]]


def test_overlap_changes_nothing_a_client_sees(pipe, question_wav, ref_voice, monkeypatch):
    """Launching step n+1 before reading step n (overlap) gives every stream the same text, codes,
    chunks and finish as reading each step at once: with rows reused (more requests than rows),
    an EOS in the middle of a batch, and a row that reaches the end of its backbone cache."""
    reqs = _requests(pipe, question_wav, ref_voice)
    reqs[2].sampling.max_tokens = 200  # runs into the backbone cache end (backbone_max_len below)
    prompt = pipe.engine._backbone_prompt(reqs[2]).shape[0]  # the same voice for all
    results = {}
    for overlap in (False, True):
        # room for the others' <= 27 frames (<= 3 positions each), not for request 2's 200
        engine = make_engine(pipe, max_batch=3, overlap=overlap, backbone_max_len=prompt + 100)
        orig = engine.frames.sample_frame

        def sample_frame(state, params, orig=orig):
            codes = orig(state, params)
            # request 3 (seed 103) says EOS at its 5th frame, wherever its row is
            codes[(params.seeds == 103) & (params.frames == 4)] = 0
            return codes

        monkeypatch.setattr(engine.frames, "sample_frame", sample_frame)
        try:
            streams = [engine.submit(copy.deepcopy(r)) for r in reqs]
            results[overlap] = [collect(s) for s in streams]
            wait_idle(engine)
        finally:
            engine.shutdown()
    plain, overlapped = results[False], results[True]
    assert plain[3]["finished"].reason == "stop" and plain[3]["finished"].audio_frames == 4
    assert plain[2]["finished"].reason == "length" and plain[2]["finished"].audio_frames < 200
    for i, (a, b) in enumerate(zip(plain, overlapped)):
        np.testing.assert_array_equal(b["codes"], a["codes"], err_msg=f"request {i}")
        assert (b["text"], b["finished"], _chunk_plan(b)) == (a["text"], a["finished"], _chunk_plan(a)), f"request {i}"


@pytest.mark.parametrize("overlap", [False, True])
def test_thinker_running_ahead_changes_nothing_a_client_sees(pipe, question_wav, ref_voice, monkeypatch, overlap):
    """The thinker's step for the next talking step computed right after this one (thinker_ahead)
    gives every stream the same text, codes, chunks and finish: with rows reused (more requests
    than rows), admissions, an EOS in the middle of a batch and the thinker's own <|im_end|>."""
    reqs = _requests(pipe, question_wav, ref_voice)
    results, used = {}, {}
    for ahead in (False, True):
        engine = make_engine(pipe, max_batch=3, overlap=overlap, thinker_ahead=ahead)
        orig_frame, orig_decode = engine.frames.sample_frame, engine.thinker.decode

        def sample_frame(state, params, orig=orig_frame):
            codes = orig(state, params)
            codes[(params.seeds == 103) & (params.frames == 4)] = 0  # request 3: EOS at its 5th frame
            return codes

        def decode(tokens, positions, key_len, orig=orig_decode, engine=engine):
            h, nxt = orig(tokens, positions, key_len=key_len)
            # the thinker says <|im_end|> from position 126 on (prompts here are 120-127 tokens)
            return h, torch.where(positions >= 126, torch.full_like(nxt, engine.special.im_end), nxt)

        monkeypatch.setattr(engine.frames, "sample_frame", sample_frame)
        monkeypatch.setattr(engine.thinker, "decode", decode)
        try:
            streams = [engine.submit(copy.deepcopy(r)) for r in reqs]
            results[ahead] = [collect(s) for s in streams]
            wait_idle(engine)
            used[ahead] = engine.stats()["thinker_ahead_used"]
        finally:
            engine.shutdown()
    assert used[False] == 0 and used[True] > 5
    plain, early = results[False], results[True]
    assert plain[3]["finished"].reason == "stop"
    assert any(r["finished"].text_tokens < r["finished"].audio_frames // 2 for r in plain), "no reply text ended"
    for i, (a, b) in enumerate(zip(plain, early)):
        np.testing.assert_array_equal(b["codes"], a["codes"], err_msg=f"request {i}")
        assert (b["text"], b["finished"], _chunk_plan(b)) == (a["text"], a["finished"], _chunk_plan(a)), f"request {i}"


def test_a_broken_loop_fails_requests_instead_of_leaving_them_waiting(pipe, question_wav, ref_voice, monkeypatch):
    """If the engine's thread stops (here: its setup raises, as torch.cuda.set_device did for a
    device without an index), every request it held or gets fails at once; none waits forever."""
    pipe.engine.shutdown()
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=2))
    gate = threading.Event()

    def broken_serve():
        gate.wait(5)
        raise RuntimeError("setup failed")

    monkeypatch.setattr(engine, "_serve", broken_serve)
    engine.start()
    try:
        queued = engine.submit(request(pipe, question_wav, ref_voice))  # waits in the queue
        gate.set()
        out = collect(queued)
        assert out["failed"] is not None and "setup failed" in out["failed"].message
        engine._thread.join(5)
        with pytest.raises(EngineError, match="setup failed"):
            engine.submit(request(pipe, question_wav, ref_voice))
    finally:
        engine.shutdown()


def test_admitted_requests_let_go_of_their_audio_embeddings(pipe, question_wav, ref_voice):
    """Once prefilled, a request's audio embeddings (megabytes a conversation, held as long as it
    streams) are dropped; a prefill that failed keeps them for the retry (one by one)."""
    engine = make_engine(pipe, max_batch=2)
    orig, seen = engine._prefill, []

    def prefill(items):
        seen.append([r.audio_embeds is not None for r, _ in items])
        if len(seen) == 1:
            raise RuntimeError("prefill broke")
        return orig(items)

    engine._prefill = prefill
    try:
        req = request(pipe, question_wav, ref_voice, max_tokens=2)
        out = collect(engine.submit(req))
        assert out["finished"] is not None, out
        assert seen == [[True], [True]]  # the retry still had them
        assert req.audio_embeds is None
    finally:
        engine.shutdown()


def test_admission_that_keeps_failing_fails_the_waiting_requests(pipe, question_wav, ref_voice):
    """A step that fails with nothing running (here: admission itself) would be retried forever by
    the requests waiting for it: after three failures in a row they are failed, and the engine
    serves the next request once admission works again."""
    engine = make_engine(pipe, max_batch=2)
    orig, broken = engine._admit, [True]

    def admit(**kw):
        if broken[0]:
            raise RuntimeError("admission broke")
        return orig(**kw)

    engine._admit = admit
    try:
        out = collect(engine.submit(request(pipe, question_wav, ref_voice, max_tokens=4)))
        assert out["failed"] is not None and "admission broke" in out["failed"].message
        broken[0] = False
        assert run(engine, request(pipe, question_wav, ref_voice, max_tokens=4))["finished"].reason == "length"
    finally:
        engine.shutdown()


def test_a_failed_step_fails_its_requests_even_if_rows_cannot_be_released(pipe, question_wav, ref_voice, monkeypatch):
    """A step fails and the thinker then refuses to free the row (an SGLang scheduler that died):
    the running request still gets its failure, the queued ones are served, the loop lives on."""
    pipe.engine.shutdown()
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=1, admission_pacing=False))
    calls = [0]
    orig = engine.frames.sample_frame

    def sample_frame(state, params):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("step failed")
        return orig(state, params)

    def release_row(row):
        raise RuntimeError("scheduler gone")

    monkeypatch.setattr(engine.frames, "sample_frame", sample_frame)
    engine._release_row = release_row
    engine.start()
    try:
        streams = [engine.submit(request(pipe, question_wav, ref_voice, seed=s, max_tokens=8)) for s in range(3)]
        ends = []
        for stream in streams:
            events = []
            while (ev := stream.get(timeout=20)) is not None:
                events.append(ev)
            ends.append(type(events[-1]).__name__)
        assert ends == ["RequestFailed", "Finished", "Finished"]
        assert engine._thread.is_alive()
    finally:
        engine.shutdown()


def test_overlap_admits_into_a_freed_row_as_early_as_without_it(pipe, question_wav, ref_voice):
    """With every row taken, a row finished by the step in flight is read before the next talking
    (admitting) step is launched, so a queued request starts at the same step as without overlap."""
    admitted = {}
    for overlap in (False, True):
        pipe.engine.shutdown()
        # one prefill per admitting step: the first two requests start at two steps even when the
        # second is queued before the engine thread takes the first (a start-up race on a busy CPU)
        engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=2, overlap=overlap, admission_pacing=False,
                                                        max_prefills_per_step=1))
        steps, orig = [], engine._admit

        def admit(orig=orig, engine=engine, steps=steps, **kw):
            states = orig(**kw)
            if states:
                steps.append(engine.counters["steps"])
            return states

        engine._admit = admit
        engine.start()
        try:
            streams = [engine.submit(request(pipe, question_wav, ref_voice, seed=s, max_tokens=m))
                       for s, m in [(1, 8), (2, 30), (3, 10)]]
            for stream in streams:
                collect(stream)
        finally:
            engine.shutdown()
        admitted[overlap] = steps
    assert len(admitted[False]) == 3 and admitted[True] == admitted[False]


@pytest.mark.parametrize("capacity", [32, 1])  # 1: fewer than the voices of one admission
def test_cached_voice_prefixes_change_nothing_a_client_sees(pipe, question_wav, ref_voice, capacity):
    """Voices' backbone prefixes computed once and copied into later requests' rows give the same
    streams as prefilling every request's whole prompt: three voices, admitted together and again."""
    voices = [ref_voice] + [((ROOT / f"assets/voices/{n}.wav").read_bytes(),
                             (ROOT / f"assets/voices/{n}.txt").read_text().strip()) for n in ("bright", "deep")]
    content = [{"type": "audio", "audio": question_wav}]
    reqs = [pipe.prepare([{"role": "user", "content": content}], *voices[i % 3], SamplingParams(seed=i, max_tokens=10))
            for i in range(6)]
    results = {}
    for cache in (0, capacity):
        engine = make_engine(pipe, max_batch=6, voice_prefix_cache=cache)
        try:
            first = [collect(engine.submit(copy.deepcopy(r))) for r in reqs[:1]]  # one voice cached
            together = [collect(s) for s in [engine.submit(copy.deepcopy(r)) for r in reqs]]
            results[cache] = first + together
            if cache:
                held = len(engine.voice_prefixes)
                stats = engine.stats()
                misses, hits = stats["voice_prefix_misses"], stats["voice_prefix_hits"]
                assert held == min(cache, 3)
                if cache >= 3:  # each voice computed once; request 0's voice found cached by the
                    # 2 others with it, the other voices by those admitted after their first
                    assert misses == 3 and 2 <= hits <= 4
                else:  # evicted voices are computed again, in the row that needs them
                    assert misses > 3
                # a held voice's prefill counts two backbone positions in the pacer's cost model
                cached = [r for r in reqs if voice_key(r.prompt_text_ids, r.prompt_codes) in engine.voice_prefixes]
                assert engine._prefill_tokens(cached[0]) == len(cached[0].thinker_ids) + 2
        finally:
            engine.shutdown()
    for i, (a, b) in enumerate(zip(results[0], results[capacity])):
        np.testing.assert_array_equal(b["codes"], a["codes"], err_msg=f"stream {i}")
        assert (b["text"], b["finished"]) == (a["text"], a["finished"])


def test_seed_controls_the_audio(pipe, question_wav, ref_voice):
    engine = make_engine(pipe, max_batch=2)
    try:
        a = run(engine, request(pipe, question_wav, ref_voice, seed=1, max_tokens=10))
        b = run(engine, request(pipe, question_wav, ref_voice, seed=1, max_tokens=10))
        c = run(engine, request(pipe, question_wav, ref_voice, seed=2, max_tokens=10))
        greedy = run(engine, request(pipe, question_wav, ref_voice, temperature=0.0, max_tokens=10))
        tiny_p = run(engine, request(pipe, question_wav, ref_voice, seed=3, top_p=1e-6, max_tokens=10))
        top1 = run(engine, request(pipe, question_wav, ref_voice, seed=4, top_k=1, max_tokens=10))
    finally:
        engine.shutdown()
    np.testing.assert_array_equal(a["codes"], b["codes"])
    assert not np.array_equal(a["codes"], c["codes"])
    assert a["text"] == c["text"], "the thinker is greedy: text does not depend on the seed"
    # top_p is honoured: a vanishing nucleus is greedy decoding, as is top_k = 1
    np.testing.assert_array_equal(tiny_p["codes"], greedy["codes"])
    np.testing.assert_array_equal(top1["codes"], greedy["codes"])


def test_cancellation_frees_the_row(pipe, question_wav, ref_voice):
    engine = make_engine(pipe, max_batch=2)
    try:
        stream = engine.submit(request(pipe, question_wav, ref_voice, max_tokens=2000))
        other = engine.submit(request(pipe, question_wav, ref_voice, seed=9, max_tokens=12))
        for ev in stream:
            if isinstance(ev, AudioChunk):
                break
        stream.cancel()
        rest = list(stream)
        assert isinstance(rest[-1], Finished) and rest[-1].reason == "cancelled"
        assert collect(other)["finished"].reason == "length"
        stats = wait_idle(engine)
        assert stats["cancelled"] >= 1
    finally:
        engine.shutdown()


def test_bad_requests_do_not_disturb_good_ones(pipe, question_wav, ref_voice, monkeypatch):
    good = request(pipe, question_wav, ref_voice, seed=11, max_tokens=12)
    engine = make_engine(pipe, max_batch=4)
    try:
        baseline = run(engine, good)
        # rejected at submit: clear client errors
        bad = copy.deepcopy(good)
        bad.prompt_codes = np.full((3, 8), 10**6)
        with pytest.raises(InvalidRequestError, match="prompt_codes"):
            engine.submit(bad)
        bad = copy.deepcopy(good)
        bad.audio_embeds = None
        with pytest.raises(InvalidRequestError, match="audio"):
            engine.submit(bad)
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            engine.submit(request(pipe, question_wav, ref_voice, max_tokens=0))
        # fails inside the engine: only that request fails
        orig = engine.thinker.prefill
        poison = len(good.thinker_ids) + 1

        def prefill(row, prompts, **kwargs):
            if any(len(ids) == poison for ids, _ in prompts):
                raise RuntimeError("injected failure")
            return orig(row, prompts, **kwargs)

        monkeypatch.setattr(engine.thinker, "prefill", prefill)
        failing = copy.deepcopy(good)
        failing.thinker_ids = good.thinker_ids[:1] + [good.thinker_ids[1]] + good.thinker_ids[1:]
        s_bad = engine.submit(failing)
        s_good = engine.submit(copy.deepcopy(good))
        out_bad, out_good = collect(s_bad), collect(s_good)
        assert out_bad["failed"] is not None and "injected failure" in out_bad["failed"].message
        np.testing.assert_array_equal(out_good["codes"], baseline["codes"])
        wait_idle(engine)
    finally:
        engine.shutdown()


def test_prompt_longer_than_context_is_rejected(pipe, question_wav, ref_voice):
    engine = make_engine(pipe, max_batch=1, thinker_max_len=64)
    try:
        with pytest.raises(InvalidRequestError, match="at most"):
            engine.submit(request(pipe, question_wav, ref_voice))
    finally:
        engine.shutdown()


def test_kernel_choices_change_nothing_a_client_sees(pipe, question_wav, ref_voice):
    """Math attention in every trunk's steps and the segmented top-k (engine options meant for
    GPUs) give the streams of the defaults: same text, codes and finishes."""
    reqs = _requests(pipe, question_wav, ref_voice)
    results = {}
    for name, kw in (("default", {}), ("choices", {"math_attention": "thinker,backbone,decoder", "topk_segments": 8})):
        engine = make_engine(pipe, max_batch=4, **kw)
        try:
            results[name] = [collect(s) for s in [engine.submit(copy.deepcopy(r)) for r in reqs]]
            wait_idle(engine)
            if name == "choices":
                assert engine.thinker.lm.model.layers[0].self_attn.math_steps
                assert engine.frames.topk_segments == 8
        finally:
            engine.shutdown()
    for i, (a, b) in enumerate(zip(results["default"], results["choices"])):
        np.testing.assert_array_equal(b["codes"], a["codes"], err_msg=f"request {i}")
        assert (b["text"], b["finished"]) == (a["text"], a["finished"]), f"request {i}"
    engine = make_engine(pipe, max_batch=2)  # options are set both ways on the shared modules
    try:
        assert not engine.thinker.lm.model.layers[0].self_attn.math_steps and engine.frames.topk_segments == 1
        assert engine.stats()["gpu_step_s"] == 0.0  # CUDA-event timings: nothing to time on the CPU
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="math_attention"):
        ChromaEngine(pipe.parts, EngineOptions(max_batch=2, math_attention="talker"))


def test_capture_at_start_covers_every_step_a_request_needs(pipe, question_wav, ref_voice, recording_runner):
    """`capture_at_start` asks for every (function, batch bucket, key-length bucket) graph before
    serving; requests afterwards, at the batch sizes and context lengths a GPU engine pads to, need
    no graph that was not asked for (each one would have been captured mid-stream). The CPU has no
    graphs: the engine is given the GPU's buckets and a runner that records the keys."""
    pipe.engine.shutdown()
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=4, thinker_max_len=512, backbone_max_len=512,
                                                    start_slack_s=0.0))
    engine._batch_sizes = batch_buckets(4)  # [1, 2, 4]
    engine._thinker_lens = engine._backbone_lens = length_buckets(512, 256)  # [256, 512]
    engine.runner = engine.thinker_runner = recorder = recording_runner
    engine._capture_step_graphs()
    asked = set(recorder.keys)
    k_max = engine._k_max_of([engine.default_top_k])
    assert asked == {(name, size, length) for size in (1, 2, 4) for length in (256, 512)
                     for name in ("thinker", "backbone1", "backbone3")} | {("sample", size, k_max) for size in (1, 2, 4)}
    recorder.keys.clear()
    engine.start()
    try:
        streams = [engine.submit(copy.deepcopy(request(pipe, question_wav, ref_voice, seed=s, max_tokens=12 + 4 * s)))
                   for s in range(3)]
        results = [collect(s) for s in streams]
    finally:
        engine.shutdown()
    assert all(r["finished"] is not None and r["finished"].reason in ("stop", "length") for r in results)
    used = set(recorder.keys)
    assert used and used <= asked, used - asked


def test_prefill_graphs_write_what_the_eager_prefill_writes(pipe, question_wav, ref_voice):
    """The graph path of the thinker's prefill (padded to bucket shapes, run into scratch rows, then
    copied into the engine's rows) leaves the same keys and values at every prompt position and
    returns the same states and tokens as the eager prefill. The CPU runs it without graphs, the
    same code a GPU captures."""
    from chroma_triton.engine.prefill_graphs import PrefillGraphs

    pipe.engine.shutdown()
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=8))
    thinker = engine.thinker
    graphs = PrefillGraphs(thinker, max_rows=4, max_len=256, device=torch.device("cpu"))
    reqs = [request(pipe, question_wav, ref_voice, text=t) for t in ("Hi.", "Tell me a long story about the sea.", "Why?")]
    prompts = [(torch.tensor(r.thinker_ids), r.audio_embeds) for r in reqs]
    longest = max(len(r.thinker_ids) for r in reqs)
    assert graphs.bucket_for(3, longest) and graphs.bucket_for(6, longest) is None  # 6 rows > 4
    assert PrefillGraphs(thinker, max_rows=4, max_len=64, device=torch.device("cpu")).bucket_for(3, longest) is None  # too long
    untouched = thinker.cache.k[:, 6:].clone()
    with torch.no_grad():
        h_eager, t_eager = thinker.prefill(0, prompts)
        h_graph, t_graph = graphs.prefill(3, prompts)
    assert graphs.calls == 1
    assert torch.equal(thinker.cache.k[:, 6:], untouched)  # rows past row_start + 3: as they were
    torch.testing.assert_close(h_graph, h_eager)
    assert torch.equal(t_graph, t_eager)
    for i, (ids, _) in enumerate(prompts):
        n = ids.shape[0]
        torch.testing.assert_close(thinker.cache.k[:, 3 + i, :, :n], thinker.cache.k[:, i, :, :n])
        torch.testing.assert_close(thinker.cache.v[:, 3 + i, :, :n], thinker.cache.v[:, i, :, :n])


def test_backbone_tail_graphs_write_what_the_eager_step_writes(pipe, question_wav, ref_voice):
    """The graph path of an admission's backbone step after cached voice prefixes (rows padded to a
    bucket, run in scratch rows, prefix and tail copied into the engine's rows) leaves the same keys
    and values and returns the same states as the eager step, for rows of two voices. The CPU runs
    it without graphs, the same code a GPU captures."""
    from chroma_triton.engine.prefill_graphs import BackboneTailGraphs
    from chroma_triton.engine.voice_prefix import copy_prefixes

    pipe.engine.shutdown()
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=8))
    frames, cache = engine.frames, engine.frames.backbone_cache
    other_voice = (question_wav, "What is the weather like?")
    reqs = [request(pipe, question_wav, voice) for voice in (ref_voice, ref_voice, other_voice)]
    with torch.no_grad():
        voices = [engine._voice_prefixes_of(0, [r])[0] for r in (reqs[0], reqs[2])]
    prefixes = [voices[0], voices[0], voices[1]]
    lengths = [pk.shape[2] for pk, _ in prefixes]
    assert lengths[0] != lengths[2]
    graphs = BackboneTailGraphs(frames, max_rows=4, max_len=512, device=torch.device("cpu"))
    assert graphs.fits(3, max(lengths)) and not graphs.fits(5, max(lengths)) and not graphs.fits(3, 511)
    tails = torch.randn(3, 2, frames.backbone.model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    untouched = cache.k[:, 7:].clone()
    with torch.no_grad():
        copy_prefixes(cache, 1, prefixes)
        positions = torch.tensor(lengths)[:, None] + torch.arange(2)
        eager = frames.backbone_step(tails, positions, torch.ones(3, dtype=torch.long), max(lengths) + 2, row_start=1)
        graphed = graphs.run(4, prefixes, tails)
    assert graphs.calls == 1
    torch.testing.assert_close(graphed, eager)
    assert torch.equal(cache.k[:, 7:], untouched)  # rows past row_start + 3: as they were
    for i, n in enumerate(lengths):
        torch.testing.assert_close(cache.k[:, 4 + i, :, :n + 2], cache.k[:, 1 + i, :, :n + 2])
        torch.testing.assert_close(cache.v[:, 4 + i, :, :n + 2], cache.v[:, 1 + i, :, :n + 2])
    assert torch.equal(cache.k[:, 4, :, :lengths[0]], voices[0][0])  # the voice's own prefix, copied


def test_engine_with_prefill_graphs_streams_the_eager_codes(pipe, question_wav, ref_voice):
    """Through the loop: `prefill_graphs` takes the graph path for its prefills and streams what the
    eager prefill streams (on this CPU the padded shapes round alike; on a GPU in bf16 they may not,
    which tests/test_gpu.py bounds)."""
    reqs = [request(pipe, question_wav, ref_voice, text=t, seed=s, max_tokens=12 + 2 * s)
            for s, t in enumerate(("Hi.", "Tell me a long story about the sea.", "Why?"))]
    codes = {}
    for on in (False, True):
        engine = make_engine(pipe, max_batch=4, prefill_graphs=on)
        try:
            results = [collect(s) for s in [engine.submit(copy.deepcopy(r)) for r in reqs]]  # batched admissions
            if on:
                assert engine.prefill_graphs.calls >= 1 and engine.backbone_tails.calls >= 1
            else:
                assert engine.prefill_graphs is None and engine.backbone_tails is None
        finally:
            engine.shutdown()
        codes[on] = [np.concatenate([c.codes[c.context_frames:] for c in r["chunks"]]) for r in results]
    for a, b in zip(codes[False], codes[True]):
        np.testing.assert_array_equal(a, b)


def history_request(pipe, question_wav, ref_voice, turns: int, **sampling) -> GenerationRequest:
    """A conversation's next turn, as the benchmarks send it (chroma_triton/bench/conversation.py):
    `turns` earlier exchanges (the question clip, a text reply) before the question again; each turn
    adds about 120 prompt tokens."""
    from chroma_triton.bench.conversation import conversation

    messages = conversation([{"type": "audio", "audio": question_wav}] * (turns + 1))
    return pipe.prepare(messages, ref_voice[0], ref_voice[1], SamplingParams(**{"seed": 7, "max_tokens": 16, **sampling}))


def test_admission_buckets_give_long_prompts_fewer_rows():
    from chroma_triton.engine.prefill_graphs import admission_buckets, scratch_positions

    served = admission_buckets(16, 4096, 8192)
    assert {(16, 512), (8, 1024), (4, 2048), (2, 4096), (1, 4096)} <= set(served)
    assert (16, 1024) not in served and (4, 4096) not in served
    assert scratch_positions(served) == 8192  # what 16 x 512 took before
    assert [length for _, length in served] == sorted(length for _, length in served)  # shortest first
    assert admission_buckets(3, 100) == [(1, 64), (2, 64), (3, 64), (1, 100), (2, 100), (3, 100)]
    assert admission_buckets(4, 256, 100) == [(1, 64), (1, 128), (1, 256)]  # one row always
    # the engine reserves scratch before it knows its rows: fewer rows can need more positions
    from chroma_triton.engine.prefill_graphs import scratch_positions_up_to
    assert scratch_positions(admission_buckets(16, 512, 6200)) == 8 * 512
    assert scratch_positions(admission_buckets(12, 512, 6200)) == 12 * 512
    assert scratch_positions_up_to(16, 512, 6200) == 12 * 512 and scratch_positions_up_to(16, 4096, 8192) == 8192


def test_prefill_plan_groups_prompts_of_similar_length(pipe):
    """`PrefillGraphs.plan`: prompts (ascending) in consecutive groups, each one replay, split where
    that pads least counting a replay's own cost; prompts past the longest bucket go eagerly."""
    from chroma_triton.engine.prefill_graphs import PrefillGraphs

    pipe.engine.shutdown()
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=8))
    graphs = PrefillGraphs(engine.thinker, max_rows=4, max_len=512, device=torch.device("cpu"), max_tokens=512)
    assert graphs.buckets == [(1, 64), (2, 64), (4, 64), (1, 128), (2, 128), (4, 128), (1, 256), (2, 256), (1, 512)]
    assert graphs.plan([100, 110, 120]) == [(3, True)]  # one 4 x 128 replay
    assert graphs.plan([30, 40]) == [(2, True)]  # 2 x 64 beats two 1 x 64 replays
    assert graphs.plan([60, 250]) == [(2, True)]  # 2 x 256 (512 + one replay) beats 64 and 256 (320 + two)
    assert graphs.plan([100, 120, 300, 490]) == [(2, True), (1, True), (1, True)]  # no 2 x 512 bucket
    assert graphs.plan([30, 40, 50, 60, 70]) == [(4, True), (1, True)]  # at most 4 rows
    assert graphs.plan([100, 600, 700]) == [(1, True), (2, False)]  # past 512: eager, together
    assert graphs.plan([600]) == [(1, False)] and graphs.plan([]) == []
    assert graphs.bucket_for(2, 200) == (2, 256) and graphs.bucket_for(3, 200) is None and graphs.bucket_for(1, 513) is None
    with pytest.raises(ValueError):
        graphs.plan([300, 100])


def test_grouped_admission_prefills_what_the_eager_prefill_does(pipe, question_wav, ref_voice):
    """One admission of prompts of different lengths: two graph groups (two short prompts in one
    2 x 128 bucket, a longer one alone in 384) and an eager prompt past the longest bucket leave
    every row's keys and values and return the states and tokens the eager prefill gives."""
    pipe.engine.shutdown()
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=8, prefill_graphs=True, prefill_graph_max_len=384,
                                                    prefill_graph_tokens=512))
    reqs = [request(pipe, question_wav, ref_voice, text="Hi."), request(pipe, question_wav, ref_voice, text="Why?"),
            request(pipe, question_wav, ref_voice, text="Tell me a long story about the sea. " * 20),
            history_request(pipe, question_wav, ref_voice, turns=3)]
    reqs.sort(key=lambda r: len(r.thinker_ids))  # as the engine orders an admission's rows
    lengths = [len(r.thinker_ids) for r in reqs]
    assert lengths[0] <= 128 and lengths[1] <= 128 and 256 < lengths[2] <= 384 < lengths[3], lengths
    assert engine.prefill_graphs.plan(lengths) == [(2, True), (1, True), (1, False)]
    thinker = engine.thinker
    with torch.no_grad():
        h_grouped, t_grouped, counts = engine._prefill_thinker(0, [(r, None) for r in reqs], {})
        h_eager, t_eager = thinker.prefill(4, [(torch.tensor(r.thinker_ids), r.audio_embeds) for r in reqs])
    assert engine.prefill_graphs.calls == 2
    assert counts["prefill_graph_prompts"] == 3 and counts["prefill_eager_prompts"] == 1
    torch.testing.assert_close(h_grouped, h_eager)
    assert torch.equal(t_grouped, t_eager)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(thinker.cache.k[:, i, :, :n], thinker.cache.k[:, 4 + i, :, :n])
        torch.testing.assert_close(thinker.cache.v[:, i, :, :n], thinker.cache.v[:, 4 + i, :, :n])


def test_engine_admitting_prompts_of_mixed_lengths_streams_the_eager_codes(pipe, question_wav, ref_voice):
    """Through the loop, with buckets that hold fewer rows of longer prompts and a prompt past the
    longest: every request streams what the eager engine streams, and both paths were taken."""
    reqs = [history_request(pipe, question_wav, ref_voice, turns=t, seed=t, max_tokens=10 + 2 * t) for t in (3, 0, 1, 0)]
    codes = {}
    for on in (False, True):
        engine = make_engine(pipe, max_batch=4, prefill_graphs=on, prefill_graph_max_len=384, prefill_graph_tokens=512)
        try:
            results = [collect(s) for s in [engine.submit(copy.deepcopy(r)) for r in reqs]]
            stats = engine.stats()
        finally:
            engine.shutdown()
        assert all(r["finished"] is not None for r in results)
        if on:
            assert stats["prefill_graph_prompts"] == 3 and stats["prefill_eager_prompts"] == 1  # 3 turns: past 384
        else:
            assert stats["prefill_graph_prompts"] == 0 and stats["prefill_eager_prompts"] == 4
        codes[on] = [r["codes"] for r in results]
    for a, b in zip(codes[False], codes[True]):
        np.testing.assert_array_equal(a, b)


def test_a_failing_between_steps_hook_is_removed_and_fails_no_request(pipe, question_wav, ref_voice):
    """A profiler's hook (scripts/profile_engine.py) that raises is logged and dropped; the request
    running goes on as if it had never been there."""
    engine = make_engine(pipe, max_batch=2)
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("profiler trouble")
    try:
        engine.between_steps = broken
        out = run(engine, request(pipe, question_wav, ref_voice, max_tokens=6))
        assert out["failed"] is None and out["finished"].reason == "length"
        assert calls == [1] and engine.between_steps is None
    finally:
        engine.shutdown()
