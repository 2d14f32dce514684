"""A flight recorder of the engine's scheduling decisions (`EngineOptions.trace_path`): one JSON
line per admission, per step, per start-up chunk and per chunk put out late, written by the
engine's thread, and notes from elsewhere in the process (its garbage collections), queued and
written with the engine's next line (one engine per file: two processes appending to one file
would interleave their lines).

The served stack's late start-up chunks come partly from admissions the pacer judged safe
(docs/benchmarks.md, runs 33-35); counters show how many, not which. This file shows each
admission's estimate against its actual time, the allowance it was judged by, and which streams
then ran late, so a GPU run can tell a cost model that guesses low from step times that grow or
from stalls outside the prefill. `scripts/engine_trace_summary.py` reads it.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path


class EngineTrace:
    STEP_EVERY = 1  # every step: a late chunk's window is read step by step (~25 lines/s at 256 streams)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1 << 16, encoding="utf-8")
        self._t0 = time.monotonic()
        self._steps = 0
        self._last_flush = self._t0
        self._lock = threading.Lock()
        # notes wait here, not for the lock: one may come from a garbage collection that started
        # inside a write holding it, on the same thread
        self._notes: collections.deque = collections.deque()

    def _line(self, t: float, kind: str, fields: dict) -> str:
        fields = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in fields.items()}
        return json.dumps({"t": round(t - self._t0, 5), "ev": kind, **fields}) + "\n"

    def note(self, kind: str, **fields) -> None:
        """An event from any thread, even from inside a garbage collection: queued (no lock, no
        write) and written before the engine's next event."""
        self._notes.append((time.monotonic(), kind, fields))

    def _drain_locked(self) -> None:
        # the notes queued so far only: writing them may make collections, whose notes wait for
        # the next event (draining until empty could go on for ever)
        for _ in range(len(self._notes)):
            t, kind, fields = self._notes.popleft()
            self._file.write(self._line(t, kind, fields))

    def event(self, kind: str, **fields) -> None:
        now = time.monotonic()
        line = self._line(now, kind, fields)
        with self._lock:
            if self._file.closed:
                return
            self._drain_locked()
            self._file.write(line)
            if now - self._last_flush > 1.0:  # readable while the server runs, without a write per event
                self._file.flush()
                self._last_flush = now

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._drain_locked()
                self._file.flush()
            self._last_flush = time.monotonic()

    def step(self, **fields) -> None:
        self._steps += 1
        if self._steps % self.STEP_EVERY == 0:
            self.event("step", **fields)

    def close(self) -> None:
        with self._lock:
            try:
                if not self._file.closed:
                    self._drain_locked()
                self._file.close()
            except OSError:
                pass
