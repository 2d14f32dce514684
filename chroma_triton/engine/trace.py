"""A flight recorder of the engine's scheduling decisions (`EngineOptions.trace_path`): one JSON
line per admission, per step, per start-up chunk and per chunk put out late, written by the engine's thread
(one engine per file: two processes appending to one file would interleave their lines).

The served stack's late start-up chunks come partly from admissions the pacer judged safe
(docs/benchmarks.md, runs 33-35); counters show how many, not which. This file shows each
admission's estimate against its actual time, the allowance it was judged by, and which streams
then ran late, so the next GPU run can tell a cost model that guesses low from step times that
grow or from stalls outside the prefill. `scripts/engine_trace_summary.py` reads it.
"""

from __future__ import annotations

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
        self._lock = threading.Lock()  # the engine's thread writes; so may another (a GC pause report)

    def event(self, kind: str, **fields) -> None:
        now = time.monotonic()
        fields = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in fields.items()}
        line = json.dumps({"t": round(now - self._t0, 5), "ev": kind, **fields}) + "\n"
        with self._lock:
            if self._file.closed:
                return
            self._file.write(line)
            if now - self._last_flush > 1.0:  # readable while the server runs, without a write per event
                self._file.flush()
                self._last_flush = now

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
            self._last_flush = time.monotonic()

    def step(self, **fields) -> None:
        self._steps += 1
        if self._steps % self.STEP_EVERY == 0:
            self.event("step", **fields)

    def close(self) -> None:
        with self._lock:
            try:
                self._file.close()
            except OSError:
                pass
