"""Admission pacing: start new requests only when the running streams can afford the pause.

A prefill (thinker + backbone prompts of the requests being admitted) runs between two steps, so
every running stream waits for it. A stream's listener has `slack` seconds of audio left to play:
the audio sent so far, counted from its first chunk, minus the time since. Before its next chunk
goes out, the stream still needs `frames_missing` steps. The running streams can therefore absorb

    min over streams (slack - frames_missing * step_seconds) - margin

seconds of prefill without any listener running dry. The pacer admits as many waiting requests as
their estimated prefill time allows (at least none), learning the prefill cost (seconds = a + b x
tokens, a least-squares fit with forgetting) and the step time (moving average) as it goes. So a
burst of arrivals is spread over several steps instead of stalling everyone at once, and a waiting
request is never kept out longer than `max_wait_s` (then up to `forced_max` requests are admitted
even if a stream may stutter: capacity that is never used helps nobody; by default a whole batch,
one stall rather than many, but under sustained overload, when every waiting request is that old,
this admits a batch at every talking step that frees rows: docs/benchmarks.md run 24).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class PrefillCost:
    """seconds ~ a + b * tokens, fitted online with exponential forgetting."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self._s = self._sx = self._sy = self._sxx = self._sxy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self._s = self._s * d + 1
        self._sx = self._sx * d + tokens
        self._sy = self._sy * d + seconds
        self._sxx = self._sxx * d + tokens * tokens
        self._sxy = self._sxy * d + tokens * seconds

    @property
    def known(self) -> bool:
        return self._s > 0

    def estimate(self, tokens: int) -> float:
        if not self.known:
            return 0.0
        n, mx, my = self._s, self._sx / self._s, self._sy / self._s
        var = self._sxx / n - mx * mx
        if var <= 1e-9 * max(mx * mx, 1.0):  # one size seen so far: proportional
            return my * tokens / mx if mx > 0 else my
        b = max((self._sxy / n - mx * my) / var, 0.0)
        a = max(my - b * mx, 0.0)
        return a + b * tokens


@dataclass
class StreamState:
    """What the pacer needs to know of one running stream."""
    slack_s: float | None  # audio left to play at the listener (None: no audio sent yet)
    frames_missing: int  # steps until its next chunk is sent


@dataclass
class AdmissionPacer:
    margin_s: float = 0.1  # kept in hand for delivery jitter (codec, network)
    max_wait_s: float = 5.0  # a request waiting longer is admitted regardless...
    forced_max: int | None = None  # ...at most this many per step then (None: all that fit)
    step_decay: float = 0.9

    def __post_init__(self):
        self.cost = PrefillCost()
        self.step_s: float | None = None
        self.forced = 0  # of the last how_many(): requests admitted beyond the allowance (starving)

    def observe_step(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s is None else self.step_decay * self.step_s + (1 - self.step_decay) * seconds

    def allowance(self, streams: list[StreamState]) -> float:
        """Seconds of prefill the running streams can absorb now (inf when none has audio out)."""
        step = self.step_s or 0.0
        worst = math.inf
        for s in streams:
            if s.slack_s is not None:
                worst = min(worst, s.slack_s - s.frames_missing * step)
        return worst - self.margin_s

    def how_many(self, waiting_tokens: list[int], streams: list[StreamState], oldest_wait_s: float) -> int:
        """How many of the waiting requests (prompt tokens each, in queue order) to prefill now."""
        self.forced = 0
        if not waiting_tokens:
            return 0
        allowance = self.allowance(streams)
        if math.isinf(allowance) or not self.cost.known:
            return len(waiting_tokens)
        n, tokens = 0, 0
        for t in waiting_tokens:
            if self.cost.estimate(tokens + t) > allowance:
                break
            n, tokens = n + 1, tokens + t
        if oldest_wait_s >= self.max_wait_s:  # starving: admit regardless (a full batch by default)
            forced = max(n, min(len(waiting_tokens), self.forced_max or len(waiting_tokens)))
            self.forced = forced - n
            return forced
        return n
