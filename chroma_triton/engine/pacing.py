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

Both estimates are averages, and an admission judged by averages stalls the streams longer than
planned about half the time; `sigmas` > 0 judges by pessimistic ones instead: a prefill's estimate
times (1 + sigmas x the recent relative error of the estimates), a step's average plus sigmas
standard deviations of recent steps. Under CUDA MPS other models' kernels share the GPU with the
prefill and the steps, so both vary more than on a GPU of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class PrefillCost:
    """seconds ~ a + b * tokens, fitted online with exponential forgetting."""

    MAX_ERROR = 2.0  # relative error counted at most, per observation

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self._s = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._n_err = self._s_err2 = 0.0  # the estimates' relative errors, squared (same forgetting)

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        guess = self.estimate(tokens)
        if guess > 0:  # how far off the model was, before it learns from this one
            # at most 2 (three times the estimate): one stall of seconds (a capture, a collection)
            # would otherwise hold admissions back for dozens of admissions to come
            err = min((seconds - guess) / guess, self.MAX_ERROR)
            self._n_err = self._n_err * d + 1
            self._s_err2 = self._s_err2 * d + err * err
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

    @property
    def relative_error(self) -> float:
        """Root mean square of the recent estimates' relative errors (0 before two observations)."""
        return math.sqrt(self._s_err2 / self._n_err) if self._n_err else 0.0

    def upper(self, tokens: int, sigmas: float) -> float:
        """The estimate, raised by `sigmas` times its recent relative error."""
        return self.estimate(tokens) * (1.0 + sigmas * self.relative_error)


@dataclass
class StreamState:
    """What the pacer needs to know of one running stream."""
    slack_s: float | None  # audio left to play at the listener (None: no audio sent yet)
    frames_missing: int  # steps until its next chunk is sent


@dataclass
class AdmissionPacer:
    margin_s: float = 0.2  # kept in hand for delivery jitter (codec, network)
    max_wait_s: float = 5.0  # a request waiting longer is admitted regardless...
    forced_max: int | None = None  # ...at most this many per step then (None: all that fit)
    step_decay: float = 0.9
    sigmas: float = 0.0  # judge by estimates this many (relative) standard deviations above the average

    def __post_init__(self):
        self.cost = PrefillCost()
        self.step_s: float | None = None  # steps' moving average
        self.step_var = 0.0  # ...and their moving variance
        self.forced = 0  # of the last how_many(): requests admitted beyond the allowance (starving)

    def observe_step(self, seconds: float) -> None:
        if self.step_s is None:
            self.step_s, self.step_var = seconds, 0.0
            return
        d, diff = self.step_decay, seconds - self.step_s
        self.step_s += (1 - d) * diff
        self.step_var = d * (self.step_var + (1 - d) * diff * diff)

    def reset_steps(self) -> None:
        """Nothing runs: the last batch's step times say nothing of the next one's."""
        self.step_s, self.step_var = None, 0.0

    @property
    def step_high(self) -> float | None:
        """The step time to plan with: the average plus `sigmas` standard deviations."""
        if self.step_s is None:
            return None
        return self.step_s + self.sigmas * math.sqrt(self.step_var)

    def prefill_estimate(self, tokens: int) -> float:
        """The prefill time to plan with (0 before any prefill was seen)."""
        return self.cost.upper(tokens, self.sigmas) if self.cost.known else 0.0

    def allowance(self, streams: list[StreamState]) -> float:
        """Seconds of prefill the running streams can absorb now (inf when none has audio out)."""
        step = self.step_high or 0.0
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
            if self.prefill_estimate(tokens + t) > allowance:
                break
            n, tokens = n + 1, tokens + t
        if oldest_wait_s >= self.max_wait_s:  # starving: admit regardless (a full batch by default)
            forced = max(n, min(len(waiting_tokens), self.forced_max or len(waiting_tokens)))
            self.forced = forced - n
            return forced
        return n
