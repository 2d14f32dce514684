"""Engine capacity (KV rows sized from free memory) and admission pacing (engine/pacing.py)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest

from chroma_triton.engine import EngineOptions, Finished, SamplingParams
from chroma_triton.engine.capacity import (AUTO_PREFIX_CACHE_UNMEASURED, AUTO_PREFIX_SHARE, GIB, admission_scratch_bytes,
                                           kv_bytes_per_row, plan_rows, trunk_kv_bytes)
from chroma_triton.engine.pacing import AdmissionPacer, PrefillCost, StreamState
from chroma_triton.pipeline import ChromaPipeline

ROOT = Path(__file__).resolve().parent.parent


# -- capacity -----------------------------------------------------------------------------------

def test_per_row_bytes_match_the_caches_the_engine_allocates(tiny_checkpoint):
    pipe = ChromaPipeline.from_pretrained(tiny_checkpoint, options=EngineOptions(max_batch=3, thinker_max_len=96,
                                                                                 backbone_max_len=80))
    try:
        eng = pipe.engine
        frames = pipe.parts.frame_model
        allocated = eng.thinker.cache.nbytes() + frames.backbone_cache.nbytes() + frames.decoder_cache.nbytes()
        dtype_bytes = frames.backbone.codebook0_head.weight.element_size()
        assert allocated == 3 * kv_bytes_per_row(pipe.parts.config, 96, 80, dtype_bytes)
        assert eng.capacity.rows == 3 and eng.capacity.free_bytes is None  # the CPU is not sized
        assert eng.stats()["requested_batch"] == 3
    finally:
        pipe.close()


@pytest.mark.parametrize("graph_len, graph_tokens, thinker_positions, backbone_positions", [
    (64, 8192, 3 * 64, 3 * 64),  # 3 rows of 64 thinker and 64 backbone positions
    (4096, 8192, 3 * 96, 3 * 80),  # lengths up to the contexts (96, 80)
    (4096, 128, 2 * 64, 3 * 80),  # the thinker's buckets within 128 positions (2 x 64, 1 x 96); the tails' not bounded
])
def test_admission_scratch_bytes_match_what_the_admission_graphs_allocate(tiny_checkpoint, graph_len, graph_tokens,
                                                                          thinker_positions, backbone_positions):
    """The row planning counts the scratch caches PrefillGraphs and BackboneTailGraphs allocate:
    the largest rows x length bucket of each (prefill_graph_tokens bounds the thinker's)."""
    pipe = ChromaPipeline.from_pretrained(tiny_checkpoint, options=EngineOptions(
        max_batch=4, thinker_max_len=96, backbone_max_len=80, prefill_graphs=True, max_prefills_per_step=3,
        prefill_graph_max_len=graph_len, prefill_graph_tokens=graph_tokens))
    try:
        eng = pipe.engine
        allocated = eng.prefill_graphs.scratch.nbytes() + eng.backbone_tails.scratch.nbytes()
        dtype_bytes = pipe.parts.frame_model.backbone.codebook0_head.weight.element_size()
        assert allocated == admission_scratch_bytes(pipe.parts.config, thinker_positions, backbone_positions,
                                                    dtype_bytes)
        assert eng.capacity.scratch_bytes == allocated
    finally:
        pipe.close()


def test_rows_are_limited_by_free_memory():
    per_row = 300 << 20
    plan = plan_rows(256, per_row, free_bytes=70 * GIB, fraction=0.9, reserve_bytes=4 * GIB)
    assert plan.rows == int((70 * GIB * 0.9 - 4 * GIB) // per_row) < 256
    assert "limited by memory" in plan.describe()
    roomy = plan_rows(8, per_row, free_bytes=70 * GIB, fraction=0.9, reserve_bytes=4 * GIB)
    assert roomy.rows == 8 and "limited" not in roomy.describe()
    scratch = plan_rows(256, per_row, free_bytes=70 * GIB, fraction=0.9, reserve_bytes=4 * GIB, scratch_bytes=GIB)
    assert scratch.rows == int((70 * GIB * 0.9 - 5 * GIB) // per_row) < plan.rows
    assert "1.00 GiB for admission scratch rows" in scratch.describe()
    prefixes = plan_rows(256, per_row, free_bytes=70 * GIB, fraction=0.9, reserve_bytes=4 * GIB, scratch_bytes=GIB,
                         prefix_cache_bytes=2 * GIB)  # thinker_prefix_cache_mib: its bound, before it fills
    assert prefixes.rows == int((70 * GIB * 0.9 - 7 * GIB) // per_row) < scratch.rows
    assert "2.00 GiB for thinker prefixes" in prefixes.describe()


def test_auto_gives_the_thinker_prefix_cache_a_share_of_what_the_rows_leave():
    """thinker_prefix_cache_mib "auto" (prefix_cache_bytes None): AUTO_PREFIX_SHARE of the budget
    the requested rows leave unused; nothing when memory limits the rows (rows first); the CPU,
    not measured, gets AUTO_PREFIX_CACHE_UNMEASURED. The numbers are run 74's H200 (192 MiB rows,
    128.4 GiB free)."""
    per_row, free = 192 << 20, int(128.4 * GIB)
    budget = int(free * 0.9) - 4 * GIB - GIB
    plan = plan_rows(256, per_row, free_bytes=free, fraction=0.9, reserve_bytes=4 * GIB, scratch_bytes=GIB,
                     prefix_cache_bytes=None)
    left = budget - 256 * per_row
    assert plan.rows == 256 and plan.prefix_cache_bytes == int(left * AUTO_PREFIX_SHARE) > 25 * GIB
    assert plan.budget_bytes == budget - plan.prefix_cache_bytes >= 256 * per_row
    assert "GiB for thinker prefixes (auto: 50% of what the rows left)" in plan.describe()
    tight = plan_rows(256, per_row, free_bytes=40 * GIB, fraction=0.9, reserve_bytes=4 * GIB, prefix_cache_bytes=None)
    assert tight.rows < 256 and tight.prefix_cache_bytes == 0  # an H100 at these lengths: every byte for rows
    assert "(auto: none, memory limits the rows)" in tight.describe() and "limited by memory" in tight.describe()
    cpu = plan_rows(8, per_row, free_bytes=None, fraction=0.9, reserve_bytes=4 * GIB, prefix_cache_bytes=None)
    assert (cpu.rows, cpu.prefix_cache_bytes) == (8, AUTO_PREFIX_CACHE_UNMEASURED)
    assert "4.00 GiB for thinker prefixes (auto, memory not measured)" in cpu.describe()


@pytest.fixture(scope="module")
def tiny_parts(tiny_checkpoint):
    from chroma_triton.model.loading import load_parts

    return load_parts(tiny_checkpoint)


def test_the_engine_makes_the_thinker_prefix_cache_the_plan_sized(tiny_parts):
    """EngineOptions: PREFIX_CACHE_AUTO gives the cache AUTO_PREFIX_CACHE_UNMEASURED on the CPU; a
    bound that holds no prompt of thinker_prefix_min_tokens positions leaves it off (the engine
    loads, and says so) instead of failing; 0 is off."""
    from chroma_triton.engine import ChromaEngine
    from chroma_triton.engine.capacity import PREFIX_CACHE_AUTO

    parts = tiny_parts
    per_position = trunk_kv_bytes(parts.config.thinker.text, 1, 4)  # float32 on the CPU
    tokens = -(-(2 << 20) // per_position)  # more positions than 2 MiB hold
    for mib, min_tokens, bound in ((PREFIX_CACHE_AUTO, 256, AUTO_PREFIX_CACHE_UNMEASURED), (1, tokens, None),
                                   (0, 256, None), (2, 64, 2 << 20)):
        engine = ChromaEngine(parts, EngineOptions(max_batch=2, thinker_max_len=96, backbone_max_len=80,
                                                   thinker_prefix_cache_mib=mib, thinker_prefix_min_tokens=min_tokens))
        cache = engine.thinker_prefixes
        assert (cache.max_bytes if cache is not None else None) == bound, (mib, min_tokens)


def test_the_pool_takes_what_is_free_once_the_graphs_are_captured(tiny_parts, monkeypatch):
    """On a GPU `start` allocates the thinker prefix cache's pool after the step graphs: at the
    planned bound, or at what is free then beyond activation_reserve_gib when that is less (in
    whole pages), or not at all (the cache off, the engine serving) when that holds no prompt of
    thinker_prefix_min_tokens positions. Here on the CPU, with the free memory made up."""
    from chroma_triton.engine import ChromaEngine
    from chroma_triton.engine import engine as engine_module

    parts = tiny_parts
    page = trunk_kv_bytes(parts.config.thinker.text, 64, 4)  # 64 positions in float32
    reserve = GIB // 2
    for free, expected in ((reserve + (64 << 20), 16 << 20),  # plenty: the planned 16 MiB
                           (reserve + 10 * page + page // 3, 10 * page),  # less: what is free, in pages
                           (reserve + page, None)):  # not one prompt of 256 positions (4 pages): off
        engine = ChromaEngine(parts, EngineOptions(max_batch=2, thinker_max_len=96, backbone_max_len=80,
                                                   thinker_prefix_cache_mib=16, activation_reserve_gib=0.5))
        with monkeypatch.context() as patch:  # after the plan
            patch.setattr(engine_module, "free_device_bytes", lambda device, free=free: free)
            engine._reserve_thinker_prefixes()
        cache = engine.thinker_prefixes
        assert (cache.max_bytes if cache is not None else None) == expected, free
        assert cache is None or (cache.reserved and cache._pool.nbytes() == expected)


def test_too_little_memory_for_one_stream_is_a_clear_error():
    with pytest.raises(MemoryError, match="not enough device memory for one stream.*thinker_max_len"):
        plan_rows(4, 2 * GIB, free_bytes=5 * GIB, fraction=0.9, reserve_bytes=4 * GIB)
    with pytest.raises(ValueError, match="kv_memory_fraction"):
        plan_rows(4, 1, free_bytes=5 * GIB, fraction=1.5, reserve_bytes=0)
    with pytest.raises(ValueError, match="max_batch"):
        plan_rows(0, 1, free_bytes=None, fraction=0.9, reserve_bytes=0)


# -- pacing -------------------------------------------------------------------------------------

def test_prefill_cost_fits_overhead_and_per_token_cost():
    cost = PrefillCost()
    assert not cost.known and cost.estimate(100) == 0.0
    cost.observe(100, 0.030)
    assert cost.estimate(200) == pytest.approx(0.060)  # one size seen: proportional
    cost = PrefillCost()
    for tokens in (100, 400, 1600, 100, 800):
        cost.observe(tokens, 0.010 + 0.0001 * tokens)
    assert cost.estimate(1000) == pytest.approx(0.110, rel=1e-6)
    assert cost.estimate(0) == pytest.approx(0.010, rel=1e-6)


def pacer_with(step_s=0.03, per_token=0.001):
    p = AdmissionPacer(margin_s=0.1, max_wait_s=5.0)
    p.observe_step(step_s)
    p.cost.observe(100, 100 * per_token)
    return p


def test_pacer_admits_everything_when_no_listener_is_waiting_for_audio():
    p = pacer_with()
    assert p.how_many([100] * 5, [], 0.0) == 5
    assert p.how_many([100] * 5, [StreamState(None, 2)], 0.0) == 5  # nobody has audio yet
    assert p.how_many([], [StreamState(1.0, 0)], 0.0) == 0


def test_pacer_admits_what_the_tightest_stream_can_wait_for():
    p = pacer_with(step_s=0.03, per_token=0.001)  # 100 tokens = 0.1 s of prefill
    roomy = StreamState(slack_s=2.0, frames_missing=0)
    # tight: 0.5 s of audio left, 2 frames (0.06 s) still to generate, 0.1 s margin -> 0.34 s allowance
    tight = StreamState(slack_s=0.5, frames_missing=2)
    assert p.allowance([roomy, tight]) == pytest.approx(0.34)
    assert p.how_many([100] * 10, [roomy, tight], 0.0) == 3
    assert p.how_many([100] * 10, [roomy], 0.0) == 10
    starving = StreamState(slack_s=0.05, frames_missing=1)
    assert p.how_many([100] * 10, [roomy, starving], 0.0) == 0
    # ...unless the head of the queue has waited too long: then the batch goes in regardless
    assert p.how_many([100] * 10, [roomy, starving], 5.0) == 10
    assert p.forced == 10  # the engine counts these (chroma_lm_forced_admissions_total)
    p.forced_max = 2  # starving, but at most 2 regardless of the pacer...
    assert p.how_many([100] * 10, [roomy, starving], 5.0) == 2
    assert p.forced == 2
    assert p.how_many([100] * 10, [roomy], 5.0) == 10  # ...and never fewer than it would admit
    assert p.forced == 0
    assert p.how_many([100], [roomy, starving], 5.0) == 1


def test_sigmas_plan_with_the_recent_spread_of_prefills_and_steps():
    cost = PrefillCost()
    cost.observe(100, 0.1)
    assert cost.relative_error == 0.0 and cost.upper(100, 2.0) == pytest.approx(0.1)
    cost.observe(100, 0.15)  # 50 % over the estimate of 0.1 s
    assert cost.relative_error == pytest.approx(0.5)
    est = cost.estimate(100)
    assert cost.upper(100, 2.0) == pytest.approx(est * 2.0)  # 1 + 2 x 0.5
    assert cost.upper(100, 0.0) == pytest.approx(est)

    p = AdmissionPacer(margin_s=0.1, max_wait_s=5.0, sigmas=2.0)
    assert p.step_high is None and p.prefill_estimate(100) == 0.0
    for s in (0.03, 0.05, 0.03, 0.05):
        p.observe_step(s)
    assert 0.03 < p.step_s < 0.05 and p.step_var > 0
    assert p.step_high == pytest.approx(p.step_s + 2.0 * math.sqrt(p.step_var))
    p.cost = cost
    # the allowance counts the pessimistic step, the admission the pessimistic prefill
    tight = StreamState(slack_s=0.6, frames_missing=2)
    assert p.allowance([tight]) == pytest.approx(0.6 - 2 * p.step_high - 0.1)
    averages = AdmissionPacer(margin_s=0.1, max_wait_s=5.0)
    averages.cost, averages.step_s = cost, p.step_s
    assert p.how_many([100] * 5, [tight], 0.0) < averages.how_many([100] * 5, [tight], 0.0)
    p.reset_steps()
    assert p.step_s is None and p.step_var == 0.0

    # one stall of seconds counts as at most three times the estimate
    cost = PrefillCost()
    cost.observe(100, 0.1)
    cost.observe(100, 3.0)
    assert cost.relative_error == pytest.approx(PrefillCost.MAX_ERROR)


def test_pacer_without_a_cost_estimate_admits_the_batch():
    p = AdmissionPacer()
    assert math.isfinite(p.allowance([StreamState(0.2, 1)]))
    assert p.how_many([50, 50], [StreamState(0.2, 1)], 0.0) == 2


def test_paced_engine_admits_a_burst_and_finishes_every_request(tiny_checkpoint, question_wav, ref_voice, tmp_path):
    """Requests arriving while others play are all admitted (paced or forced by max_admission_wait_s)
    and produce what they produce alone; the engine's trace records each admission."""
    trace = tmp_path / "trace.jsonl"
    pipe = ChromaPipeline.from_pretrained(tiny_checkpoint, options=EngineOptions(
        max_batch=4, admission_pacing=True, admission_margin_s=0.0, max_admission_wait_s=0.5,
        trace_path=str(trace)))
    try:
        content = [{"type": "audio", "audio": question_wav}, {"type": "text", "text": "Hello."}]
        base = pipe.prepare([{"role": "user", "content": content}], ref_voice[0], ref_voice[1],
                            SamplingParams(seed=3, max_tokens=24))
        alone = _codes(pipe.engine.submit(copy.deepcopy(base)))
        streams = []
        for i in range(6):
            req = copy.deepcopy(base)
            streams.append(pipe.engine.submit(req))
        results = [_codes(s) for s in streams]
        assert all(r == alone for r in results)
        stats = pipe.engine.stats()
        assert stats["active"] == 0 and stats["queued"] == 0 and stats["admitted"] == 7
        # from the second admission on, the pacer's estimate is counted beside the actual time
        assert stats["prefills"] >= 2 and stats["prefill_estimate_s"] > 0
        assert 0 <= stats["prefill_overrun_s"] <= stats["prefill_s"]
    finally:
        pipe.close()
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    admits = [e for e in events if e["ev"] == "admit"]
    assert len(admits) == stats["prefills"] and sum(e["n"] for e in admits) == 7
    assert all(e["took_s"] > 0 and len(e["requests"]) == e["n"] for e in admits)
    assert admits[0]["est_s"] is None and all(e["est_s"] is not None for e in admits[1:])  # learnt from the first
    spec = importlib.util.spec_from_file_location("trace_summary", ROOT / "scripts" / "engine_trace_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    lines = summary.summarize(events)
    assert lines[0].startswith(f"{len(admits)} admissions of 7 requests")
    # every step, and each stream's start-up chunks with the audio its listener had left
    assert sum(1 for e in events if e["ev"] == "step") == stats["steps"]
    firsts = [e for e in events if e["ev"] == "chunk" and e["index"] == 0]
    assert len(firsts) == 7 and all(e["left_s"] is None for e in firsts)
    later = [e for e in events if e["ev"] == "chunk" and e["index"] > 0]
    assert later and all(isinstance(e["left_s"], float) for e in later)
    assert any(line.startswith("chunk 1: audio left") for line in lines)
    # chroma_lm's relay notes its slow passes in the same file (serving/relay_hub.py)
    relay = {"t": 1.0, "ev": "relay_pass", "waited_s": 0.2, "took_s": 0.06, "jobs": 3, "sends": 5, "longest_send_s": 0.05}
    assert not any(line.startswith("relay passes") for line in lines)
    assert any(line.startswith("relay passes of 50 ms or more: 1; began after their first wake ")
               for line in summary.summarize(events + [relay]))


def _held_engine(tiny_checkpoint, question_wav, ref_voice, tmp_path, **options):
    """Two rows; a pacer that never allows an admission while A plays (a huge margin); a trace."""
    pipe = ChromaPipeline.from_pretrained(tiny_checkpoint, options=EngineOptions(
        max_batch=2, admission_pacing=True, admission_margin_s=1000.0, trace_path=str(tmp_path / "trace.jsonl"),
        **options))
    content = [{"type": "audio", "audio": question_wav}, {"type": "text", "text": "Hello."}]
    base = pipe.prepare([{"role": "user", "content": content}], ref_voice[0], ref_voice[1],
                        SamplingParams(seed=3, max_tokens=8, temperature=0.0))

    def submit(rid, max_tokens):
        req = copy.deepcopy(base)
        req.request_id, req.sampling.max_tokens = rid, max_tokens
        return pipe.engine.submit(req)
    return pipe, submit


@pytest.mark.parametrize("clock", ["free_row", "arrival"])
def test_max_admission_wait_counts_from_a_free_row(tiny_checkpoint, question_wav, ref_voice, tmp_path, clock):
    """Under overload a request waits for a row first; with admission_wait_clock free_row that
    wait does not count towards max_admission_wait_s, so once a row frees the pacer still decides
    (here it never allows one: a huge margin) and admits the request regardless only after holding
    it that long with the row free. With "arrival" (the behaviour before) a request that waited for
    a row is forced in at once. Rows: 2; A plays throughout, B and C arrive together."""
    import threading

    wait_s = 1.0
    trace = tmp_path / "trace.jsonl"
    pipe, submit = _held_engine(tiny_checkpoint, question_wav, ref_voice, tmp_path, max_admission_wait_s=wait_s,
                                admission_wait_clock=clock)
    try:
        a = submit("A", 4000)
        next(ev for ev in a if hasattr(ev, "codes"))  # A plays: its listener has audio (the pacer's slack)
        b, c = submit("B", 8), submit("C", 8)
        drained = [threading.Thread(target=lambda s=s: list(s)) for s in (b, c)]
        for t in drained:
            t.start()
        for t in drained:
            t.join(120)
        a.cancel()
        list(a)
        stats = pipe.engine.stats()
    finally:
        pipe.close()
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    admit = {r: e for e in events if e["ev"] == "admit" for r in e["requests"]}
    assert admit["B"]["forced"] == 1 and admit["C"]["forced"] == 1 and stats["forced_admissions"] == 2
    b_ended = max(e["t"] for e in events if e["ev"] == "chunk" and e["request"] == "B")
    # B was forced in after being held wait_s from its arrival (a row was free), and C arrived with
    # it: when B ended C had waited longer than the limit, all of it for a row; then, B's row free:
    assert b_ended > admit["B"]["t"]
    gap = admit["C"]["t"] - b_ended
    if clock == "free_row":
        assert gap >= wait_s * 0.9, gap  # held as long as the limit (the trace rounds to 10 µs)
    else:
        assert gap < wait_s * 0.9, gap  # let in at the next admission round


def test_a_new_queue_head_does_not_restart_the_admission_clock(tiny_checkpoint, question_wav, ref_voice, tmp_path):
    """The free-row clock belongs to the free row, not to the request at the head: when the held
    head is cancelled, the next one is let in when the row has been held empty for
    max_admission_wait_s in all (a clock per head would hold the row that much longer again)."""
    import threading
    import time

    wait_s = 1.0
    pipe, submit = _held_engine(tiny_checkpoint, question_wav, ref_voice, tmp_path, max_admission_wait_s=wait_s)
    try:
        a = submit("A", 4000)
        next(ev for ev in a if hasattr(ev, "codes"))
        t0 = time.monotonic() - pipe.engine.trace._t0  # on the trace's clock
        b, c = submit("B", 8), submit("C", 8)
        time.sleep(wait_s / 2)
        b.cancel()
        drained = threading.Thread(target=lambda: list(c))
        drained.start()
        drained.join(120)
        a.cancel()
        list(a)
    finally:
        pipe.close()
    events = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    admit = {r: e for e in events if e["ev"] == "admit" for r in e["requests"]}
    assert "B" not in admit and admit["C"]["forced"] == 1
    assert wait_s * 0.9 <= admit["C"]["t"] - t0 < wait_s * 1.4, admit["C"]["t"] - t0


def test_a_request_a_row_is_free_for_is_not_refused_by_max_queue_wait_s(tiny_checkpoint, question_wav, ref_voice,
                                                                        tmp_path):
    """max_queue_wait_s bounds the wait for a row: a request whose row is free and which the pacer
    holds (here longer than max_queue_wait_s) is let in by max_admission_wait_s, not refused."""
    pipe, submit = _held_engine(tiny_checkpoint, question_wav, ref_voice, tmp_path, max_admission_wait_s=0.8,
                                max_queue_wait_s=0.3)
    try:
        a = submit("A", 4000)
        next(ev for ev in a if hasattr(ev, "codes"))
        b = submit("B", 8)
        assert isinstance(_codes(b), list)  # served, not refused
        a.cancel()
        list(a)
        stats = pipe.engine.stats()
    finally:
        pipe.close()
    assert stats["queue_timeouts"] == 0 and stats["forced_admissions"] == 1


def test_a_request_waiting_longer_than_max_queue_wait_s_is_refused(tiny_checkpoint, question_wav, ref_voice):
    """One row, taken by a long reply: the request behind it is refused as "server busy" once it
    has waited max_queue_wait_s (CapacityError: HTTP 429 at the frontend), counted, and the reply
    in the row goes on."""
    import time

    from chroma_triton.engine import RequestFailed
    from chroma_triton.errors import CapacityError

    pipe = ChromaPipeline.from_pretrained(tiny_checkpoint, options=EngineOptions(max_batch=1, max_queue_wait_s=0.3))
    try:
        content = [{"type": "audio", "audio": question_wav}, {"type": "text", "text": "Hello."}]
        base = pipe.prepare([{"role": "user", "content": content}], ref_voice[0], ref_voice[1],
                            SamplingParams(seed=3, max_tokens=4000, temperature=0.0))
        a = pipe.engine.submit(copy.deepcopy(base))
        next(ev for ev in a if hasattr(ev, "codes"))  # A holds the row
        t0 = time.monotonic()
        events = list(pipe.engine.submit(copy.deepcopy(base)))
        waited = time.monotonic() - t0
        assert len(events) == 1 and isinstance(events[0], RequestFailed) and events[0].busy, events
        error = events[0].exception()
        assert isinstance(error, CapacityError) and "server busy" in str(error) and "max_queue_wait_s" in str(error)
        assert 0.3 <= waited < 10, waited
        assert next(ev for ev in a if hasattr(ev, "codes")) is not None  # A still streams
        stats = pipe.engine.stats()
        assert stats["queue_timeouts"] == 1 and stats["failed"] == 0 and stats["active"] == 1
        a.cancel()
        list(a)
    finally:
        pipe.close()


def test_trace_summary_splits_a_late_chunks_window_into_stalls_and_steps():
    spec = importlib.util.spec_from_file_location("trace_summary", ROOT / "scripts" / "engine_trace_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    events = [
        {"t": 0.00, "ev": "step", "took_s": 0.04, "prefill_s": 0.0, "step_s": 0.04, "plan_s": 0.045},
        {"t": 0.01, "ev": "chunk", "request": "r", "index": 0, "frames": 4, "left_s": None},
        {"t": 0.05, "ev": "step", "took_s": 0.05, "prefill_s": 0.0, "step_s": 0.04},
        {"t": 0.12, "ev": "gc", "gen": 2, "s": 0.06, "thread": "chroma-engine"},
        {"t": 0.20, "ev": "admit", "n": 3, "tokens": 300, "est_s": 0.1, "took_s": 0.21, "stall_s": 0.15,
         "allowance_s": 0.12, "forced": 0, "requests": ["x", "y", "z"]},
        {"t": 0.25, "ev": "step", "took_s": 0.2, "prefill_s": 0.15, "step_s": 0.04},
        {"t": 0.30, "ev": "step", "took_s": 0.06, "prefill_s": 0.0, "step_s": 0.04},
        {"t": 0.31, "ev": "late", "request": "r", "start_frame": 4, "frames": 4, "late_s": 0.01,
         "since_first_chunk_s": 0.3, "step_s": 0.04},
        {"t": 0.31, "ev": "chunk", "request": "r", "index": 1, "frames": 4, "left_s": -0.01},
    ]
    lines = summary.summarize(events)
    assert "chunk 1: audio left at the listener when it went out: median -10 ms" in "\n".join(lines)
    assert lines[-1] == ("garbage collections of 5 ms or more: 1 (1 full), median 60 ms, p90 60, max 60 (n=1); "
                         "prefills over twice their estimate: 1, 1 of them with a collection inside")
    window = lines[-2]
    # 3 steps after the first chunk: 50 + 50 + 60 ms of stepping against 3 x 45 planned (plan_s,
    # not the 40 ms average)
    assert window.startswith("late chunks' windows (first chunk to the late one, n=1): median 300 ms")
    assert "admissions in them 1, stalling 150 ms (estimated 100 ms)" in window
    assert "steps 3, 160 ms, +25 ms against the step time planned with" in window


def _codes(stream):
    frames, finished = [], None
    for ev in stream:
        if isinstance(ev, Finished):
            finished = ev
        elif hasattr(ev, "codes"):
            frames += [tuple(f) for f in ev.codes[ev.context_frames:].tolist()]
    assert finished is not None and finished.reason in ("stop", "length")
    return frames
