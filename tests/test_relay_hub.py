"""serving/relay_hub.py: one thread relays many requests' engine streams (no Triton, no engine:
real RequestStreams fed by the test as the engine would, the real _Relay)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from chroma_triton.engine import AudioChunk, Finished, RequestFailed, RequestStream, TextDelta
from chroma_triton.errors import EngineError, InvalidRequestError
from chroma_triton.serving.relay_hub import RelayHub, RelayJob
from chroma_triton.serving.triton_lm import _Relay

K = 8


class Sink:
    """What one request's relay produced, and how it ended."""

    def __init__(self, fail_send_after: int | None = None):
        self.responses, self.ended = [], threading.Event()
        self.finished = self.error = None
        self.threads = set()
        self.fail_send_after = fail_send_after

    def send(self, response):
        self.threads.add(threading.current_thread().name)
        if self.fail_send_after is not None and len(self.responses) >= self.fail_send_after:
            raise RuntimeError("Unable to send response. Response sender has been closed.")
        self.responses.append(response)

    def done(self, finished, error):
        self.finished, self.error = finished, error
        self.ended.set()


def job_for(stream, sink, cancelled=lambda: False, hold_s=0.4):
    return RelayJob(stream, _Relay(prompt_tokens=3, hold_s=hold_s), sink.send, cancelled, sink.done)


def chunk(n, ctx=0):
    return AudioChunk(np.ones((n, K), np.int64), ctx, 0)


@pytest.fixture
def hub():
    h = RelayHub(poll_s=0.05)
    yield h
    h.close()


def test_many_requests_relayed_by_one_thread(hub):
    streams = [RequestStream(f"r{i}") for i in range(20)]
    sinks = [Sink() for _ in streams]
    for s, sink in zip(streams, sinks):
        hub.add(job_for(s, sink))
    for i, s in enumerate(streams):  # as the engine would: text, then audio carries it
        s.put(TextDelta("hi", 1, time.monotonic()))
        s.put(chunk(2))
        s.put(chunk(4, ctx=2))
        s.put(Finished("stop", 3, 1, 4, "hi"))
    for sink in sinks:
        assert sink.ended.wait(5)
    assert len(hub) == 0 and hub.busy_s > 0
    for sink in sinks:
        assert sink.error is None and sink.finished.reason == "stop"
        assert sink.threads == {"chroma-lm-relay"}  # every send on the hub's one thread
        assert "".join(r.text for r in sink.responses) == "hi"
        assert sum(r.new_frames for r in sink.responses) == 4
        assert [r.final for r in sink.responses][-1] is True and sum(r.final for r in sink.responses) == 1


def test_held_text_goes_out_when_due_without_audio(hub):
    stream, sink = RequestStream("t"), Sink()
    hub.add(job_for(stream, sink, hold_s=0.2))
    made = time.monotonic()
    stream.put(TextDelta("alone", 1, made))  # text does not wake the hub; its poll or deadline does
    deadline = time.monotonic() + 3
    while not sink.responses and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r.text for r in sink.responses] == ["alone"] and sink.responses[0].codes is None
    assert time.monotonic() - made >= 0.2  # held for hold_s first
    stream.put(Finished("stop", 3, 1, 0, "alone"))
    assert sink.ended.wait(5) and sink.responses[-1].final


def test_failed_request_and_failed_send_end_only_their_job(hub):
    bad, broken, good = RequestStream("bad"), RequestStream("broken"), RequestStream("good")
    bad_sink, broken_sink, good_sink = Sink(), Sink(fail_send_after=1), Sink()
    for s, sink in ((bad, bad_sink), (broken, broken_sink), (good, good_sink)):
        hub.add(job_for(s, sink))
    bad.put(RequestFailed("prompt too long", client_error=True))
    broken.put(chunk(2))
    broken.put(chunk(2, ctx=2))  # wakes it again: the second send fails
    time.sleep(0.05)
    broken.put(chunk(2, ctx=4))
    good.put(chunk(2))
    good.put(Finished("length", 3, 0, 2, ""))
    for sink in (bad_sink, broken_sink, good_sink):
        assert sink.ended.wait(5)
    assert isinstance(bad_sink.error, InvalidRequestError) and bad_sink.finished is None
    assert isinstance(broken_sink.error, RuntimeError) and broken.cancelled  # the row is freed
    assert good_sink.error is None and good_sink.finished.reason == "length"


def test_cancellation_is_polled_and_the_end_still_relayed(hub):
    stream, sink, asked = RequestStream("c"), Sink(), []
    flag = threading.Event()

    def cancelled():
        asked.append(time.monotonic())
        return flag.is_set()

    hub.add(job_for(stream, sink, cancelled=cancelled))
    stream.put(chunk(2))
    deadline = time.monotonic() + 3
    while not sink.responses and time.monotonic() < deadline:  # the chunk relayed (asked once then)
        time.sleep(0.01)
    flag.set()  # e.g. the client went away: no event wakes the hub, its poll (poll_s 0.05) sees it
    while not stream.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.cancelled and len(asked) >= 2
    stream.put(Finished("cancelled", 3, 0, 2, ""))  # what the engine puts for a cancelled row
    assert sink.ended.wait(5) and sink.finished.reason == "cancelled"


def test_a_stream_ended_without_a_result_is_an_engine_error(hub):
    stream, sink = RequestStream("x"), Sink()
    hub.add(job_for(stream, sink))
    stream.put(chunk(2))
    with stream._ready:  # the end marker alone, as if the engine lost the Finished event
        stream._items.append(RequestStream._END)
    hub.wake(hub_job := next(iter(hub._jobs)))
    assert hub_job.stream is stream
    assert sink.ended.wait(5) and isinstance(sink.error, EngineError)


def test_events_wake_the_thread_without_waiting_for_the_poll():
    hub = RelayHub(poll_s=30.0)  # the poll never comes during this test
    try:
        for i in range(50):
            stream, sink = RequestStream(f"f{i}"), Sink()
            hub.add(job_for(stream, sink))
            stream.put(chunk(2))  # right after add: the waker is in place before the job is known
            stream.put(Finished("stop", 3, 0, 2, ""))
            assert sink.ended.wait(2), f"request {i} waited for the poll"
            assert sink.finished.reason == "stop" and sum(r.new_frames for r in sink.responses) == 2
    finally:
        hub.close(grace_s=0)


def test_the_thread_survives_a_failing_pass():
    hub = RelayHub(poll_s=0.05)
    real, failures = hub._next_batch, []

    def flaky(next_poll):
        if not failures:
            failures.append(1)
            raise RuntimeError("boom")
        return real(next_poll)

    hub._next_batch = flaky
    try:
        time.sleep(0.1)
        stream, sink = RequestStream("s"), Sink()
        hub.add(job_for(stream, sink))
        stream.put(Finished("stop", 3, 0, 0, ""))
        assert failures and sink.ended.wait(5) and sink.finished.reason == "stop"
    finally:
        hub.close(grace_s=0)


def test_close_relays_ends_already_queued_then_ends_what_is_left():
    hub = RelayHub(poll_s=0.05)
    stream, sink = RequestStream("left"), Sink()
    ending, ending_sink = RequestStream("ending"), Sink()
    hub.add(job_for(stream, sink))
    hub.add(job_for(ending, ending_sink))
    ending.put(Finished("length", 3, 0, 0, ""))  # as the engine does for every stream at shutdown
    hub.close(grace_s=0.2)
    assert ending_sink.finished is not None and ending_sink.finished.reason == "length"
    assert sink.ended.is_set() and isinstance(sink.error, EngineError) and stream.cancelled
    with pytest.raises(EngineError):
        hub.add(job_for(RequestStream("late"), Sink()))
    with pytest.raises(ValueError):
        RelayHub(poll_s=0)


def test_stream_waker_and_drain():
    stream, woken = RequestStream("w"), []
    stream.set_waker(lambda: woken.append(1))
    stream.put(TextDelta("a", 1))  # text does not wake
    stream.put(chunk(2))
    assert len(woken) == 1
    stream.put(Finished("stop", 1, 1, 2, "a"))
    assert len(woken) == 2
    items = stream.drain()
    assert [type(e).__name__ for e in items] == ["TextDelta", "AudioChunk", "Finished", "NoneType"]
    assert stream.drain() == [None] and stream.get(timeout=0) is None  # stays ended
    stream.set_waker(None)
    assert RequestStream("empty").drain() == []


def test_slow_passes_are_noted_with_their_longest_send():
    """With a note callback (the engine trace's), a pass that takes SLOW_PASS_S or more is written
    down with its sends and the longest one (here a send that blocks 80 ms, as Triton holding a
    response would); quick passes are not."""
    from chroma_triton.serving.relay_hub import SLOW_PASS_S

    notes = []
    hub = RelayHub(poll_s=30.0, note=lambda kind, **fields: notes.append((kind, fields)))
    slow, quick = Sink(), Sink()
    blocking = slow.send

    def send_slowly(response):
        time.sleep(0.08)
        blocking(response)

    slow.send = send_slowly
    try:
        fast_stream = RequestStream("quick")
        hub.add(job_for(fast_stream, quick))
        fast_stream.put(chunk(2))
        fast_stream.put(Finished("stop", 3, 0, 2, ""))
        assert quick.ended.wait(5)
        assert notes == []  # quick passes: nothing noted
        stream = RequestStream("slow")
        hub.add(job_for(stream, slow))
        stream.put(chunk(2))
        stream.put(Finished("stop", 3, 0, 2, ""))
        assert slow.ended.wait(5)
    finally:
        hub.close(grace_s=0)
    assert notes and all(kind == "relay_pass" for kind, _ in notes)
    longest = max(fields["longest_send_s"] for _, fields in notes)
    assert longest >= 0.08 > SLOW_PASS_S
    assert all(fields["took_s"] >= SLOW_PASS_S and fields["sends"] >= 1 and fields["waited_s"] >= 0 for _, fields in notes)
