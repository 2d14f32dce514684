"""One thread that relays the engine's events of every request of a ``chroma_lm`` instance to
Triton (chroma_lm's ``relays: shared``), instead of a thread per request.

Why: at 256 streams the per-request threads held Python's GIL more than the engine's own thread
did (py-spy, docs/benchmarks.md run 28), and every wake-up of one of them is a GIL hand-over the
engine thread may wait behind (waking them more often made 256 streams 3-5x slower). Here the
engine's ``RequestStream.put`` calls :meth:`RelayHub.wake` for audio and for the end (not for
text), and one thread serves every woken request in one pass: drain its events, turn them into
responses (:class:`~.triton_lm._Relay`: text rides on the next chunk), send them. Besides, the
thread looks at every request every ``poll_s`` (held text falling due, cancellation asked of
Triton) and wakes when a held text is due.

A request ends when its relay has the ``Finished`` event, or with an exception (a failed
request, a failed send): its ``done(finished, error)`` callback runs on this thread, once.

With a ``note`` callback (the engine trace's ``note``), a pass that was slow to start or to finish
is written down (``relay_pass``): how long after the first wake it began (the thread busy, or
waiting for the GIL), how long it took, its sends and the longest one (a send that blocks is
Triton holding the response). In run 70 (docs/benchmarks.md) chunks the engine had sent in time
reached ``codec_decoder`` up to a second late, in bursts; this tells the relay's share apart.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..engine import Finished, RequestStream
from ..errors import EngineError
from .protocol import LMResponse

if TYPE_CHECKING:
    from .triton_lm import _Relay

log = logging.getLogger(__name__)


@dataclass(eq=False)
class RelayJob:
    """One request being relayed."""
    stream: RequestStream
    relay: "_Relay"  # forward(events, send), finished, text_due_at()
    send: Callable[[LMResponse], None]
    cancelled: Callable[[], bool]  # asked at each pass; True once: the stream is cancelled
    done: Callable[[Finished | None, BaseException | None], None]
    cancel_sent: bool = False
    due_at: float | None = None  # the held text's deadline already queued in the hub's heap


SLOW_PASS_S = 0.05  # a pass that began or took this long after its first wake is noted


class RelayHub:
    def __init__(self, poll_s: float, clock: Callable[[], float] = time.monotonic, name: str = "chroma-lm-relay",
                 note: Callable[..., None] | None = None):
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self.poll_s, self.clock = poll_s, clock
        self._cond = threading.Condition()
        self._ready: list[RelayJob] = []  # woken since the last pass
        self._jobs: set[RelayJob] = set()
        self._due: list[tuple[float, int, RelayJob]] = []  # held texts' deadlines (a heap)
        self._seq = itertools.count()
        self._stopping = False
        self._woken_at: float | None = None  # when _ready last went from empty to not (perf_counter)
        self._note = note
        self._sends = 0  # this pass's sends, and its longest (seconds)
        self._longest_send = 0.0
        self.busy_s = 0.0  # wall time spent serving requests (sends included), for a metric
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: RelayJob) -> None:
        """Relay `job` from now on (its stream may hold events already)."""
        # the waker first: an event put after the first pass below must wake the thread (a wake
        # before the job is known is skipped harmlessly)
        job.stream.set_waker(lambda: self.wake(job))
        with self._cond:
            if self._stopping or not self._thread.is_alive():
                job.stream.set_waker(None)
                raise EngineError("the relay has stopped")
            self._jobs.add(job)
            self._push_ready(job)

    def wake(self, job: RelayJob) -> None:
        with self._cond:
            self._push_ready(job)

    def _push_ready(self, job: RelayJob) -> None:  # holding self._cond
        if not self._ready:
            self._woken_at = time.perf_counter()
        self._ready.append(job)
        self._cond.notify()

    def close(self, grace_s: float = 1.0, timeout: float = 5.0) -> None:
        """Stop: requests whose ends are queued (the engine ends every stream when it shuts down)
        get `grace_s` to be relayed; those still relayed then end with an EngineError (their
        streams cancelled). Once stopping, the thread sends nothing more."""
        deadline = self.clock() + grace_s
        while self._jobs and self._thread.is_alive() and self.clock() < deadline:
            time.sleep(0.01)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():  # stuck in a send: it ends the rest itself when that returns
            log.warning("the relay thread did not stop within %.0f s", timeout)
            return
        self._end_all()

    def _end_all(self) -> None:
        for job in list(self._jobs):
            job.stream.cancel()
            self._finish(job, None, EngineError("the server is shutting down"))

    # -- the thread ------------------------------------------------------------------------------
    def _next_batch(self, next_poll: float) -> tuple[list[RelayJob], bool, float | None]:
        """Wait until a request is woken, a held text falls due or the poll is due; the requests to
        serve (every one when the poll is due), whether it was the poll, and when the first of
        them was woken (None: no wake, only the poll or a held text)."""
        with self._cond:
            while not self._ready and not self._stopping:
                deadline = min(next_poll, self._due[0][0] if self._due else math.inf)
                wait = deadline - self.clock()
                if wait <= 0:
                    break
                self._cond.wait(wait)
            if self._stopping:
                return [], False, None
            batch, self._ready = self._ready, []
            woken_at, self._woken_at = (self._woken_at if batch else None), None
            now = self.clock()
            while self._due and self._due[0][0] <= now:
                batch.append(heapq.heappop(self._due)[2])
            polled = now >= next_poll
            if polled:
                batch.extend(self._jobs)
            return batch, polled, woken_at

    def _loop(self) -> None:
        next_poll = self.clock() + self.poll_s
        while not self._stopping:
            try:
                batch, polled, woken_at = self._next_batch(next_poll)
                started = time.perf_counter()
                self._sends, self._longest_send = 0, 0.0
                if polled:
                    next_poll = self.clock() + self.poll_s
                seen: set[RelayJob] = set()
                for job in batch:
                    if job in seen or job not in self._jobs:
                        continue
                    seen.add(job)
                    self._serve(job)
                took = time.perf_counter() - started
                self.busy_s += took
                waited = 0.0 if woken_at is None else started - woken_at
                if self._note is not None and max(waited, took) >= SLOW_PASS_S:
                    self._note("relay_pass", waited_s=waited, took_s=took, jobs=len(seen), sends=self._sends,
                               longest_send_s=self._longest_send)
            except Exception:  # noqa: BLE001 - the thread relays every request: it must not die
                log.exception("relay pass failed")
                time.sleep(0.01)
        self._end_all()

    def _serve(self, job: RelayJob) -> None:
        try:
            if not job.cancel_sent and job.cancelled():
                job.stream.cancel()  # the engine drops the row at its next step; its end comes here
                job.cancel_sent = True
            if job.relay.forward(job.stream.drain(), lambda response: self._send(job, response)):
                self._finish(job, job.relay.finished, None)
                return
        except Exception as exc:  # noqa: BLE001 - a failed request or send ends only this job
            job.stream.cancel()  # frees the row if generation still runs (send failed)
            self._finish(job, None, exc)
            return
        due = job.relay.text_due_at()
        if due is not None and due != job.due_at:  # one heap entry per held text
            job.due_at = due
            with self._cond:
                heapq.heappush(self._due, (due, next(self._seq), job))

    def _send(self, job: RelayJob, response: LMResponse) -> None:
        if self._stopping:  # close() ends the rest; nothing may follow the error it sends
            raise EngineError("the server is shutting down")
        t0 = time.perf_counter()
        try:
            job.send(response)
        finally:
            took = time.perf_counter() - t0
            self._sends += 1
            self._longest_send = max(self._longest_send, took)

    def _finish(self, job: RelayJob, finished: Finished | None, error: BaseException | None) -> None:
        with self._cond:
            if job not in self._jobs:
                return
            self._jobs.discard(job)
        job.stream.set_waker(None)
        try:
            job.done(finished, error)
        except Exception:  # noqa: BLE001
            log.exception("relay done callback failed")
