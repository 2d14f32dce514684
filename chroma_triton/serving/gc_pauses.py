"""Python's garbage collector in the model processes: freeze what loading made, time the rest.

A full (generation 2) collection walks every container object of the process, and every thread of
it waits, the engine's too. Loading torch, transformers and the model leaves some 350,000 such
objects (a full collection of those alone took 190 ms on the 2-core CI machine), and `compile`
adds dynamo's and inductor's graphs and guards on top. None of them will ever be garbage. At 256
streams the engine's thread sat in single prefills of 0.2-1.1 s with no step between (session 9's
traces, runs 37-38), several times what such a prefill takes; a full collection is one thing that
stops a thread that long. `gc.freeze()` once the model is loaded moves everything that exists then
into a permanent generation that collections skip; what requests allocate is still collected.

`GcMonitor` times every collection (``gc.callbacks``), so the metrics and the engine's trace show
how long the process stood still, and when.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Callable


def freeze_after_load() -> int:
    """Collect once, then exempt every object alive now from later collections; returns how many
    objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcMonitor:
    """Counts and times the process's collections, per generation. `on_pause(generation, seconds)`
    (optional) hears of each one that took at least `report_s`; it runs in whichever thread the
    collection ran in, right after it, so it must be quick and thread-safe."""

    def __init__(self, on_pause: Callable[[int, float], None] | None = None, report_s: float = 0.005):
        self.on_pause = on_pause
        self.report_s = report_s
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest_s = 0.0
        self._started = threading.local()
        self._installed = False

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started.t = time.perf_counter()
            return
        t0 = getattr(self._started, "t", None)
        if t0 is None:  # installed during a collection
            return
        self._started.t = None
        took = time.perf_counter() - t0
        gen = min(int(info.get("generation", 2)), 2)
        self.collections[gen] += 1
        self.seconds[gen] += took
        self.longest_s = max(self.longest_s, took)
        if self.on_pause is not None and took >= self.report_s:
            try:
                self.on_pause(gen, took)
            except Exception:  # noqa: BLE001 - a report must never break a collection
                pass

    def install(self) -> "GcMonitor":
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def stats(self) -> dict[str, float]:
        """Counters as chroma_lm's metrics name them: full collections and their seconds, and the
        seconds of every collection."""
        return {"gc_full": self.collections[2], "gc_full_s": self.seconds[2], "gc_s": sum(self.seconds)}


def freeze_if_asked(args) -> int | None:
    """A model's `gc_freeze` parameter (default true): freeze after loading; returns the count of
    objects frozen, or None when off."""
    return freeze_after_load() if args.bool("gc_freeze", True) else None
