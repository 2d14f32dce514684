"""What one streamed reply looked like to its client, and the numbers a level of streams yields.

A stream is timed from the moment its request is sent. Each chunk that carries audio is noted
with its arrival time and sample count. From that:

* TTFA: request sent -> first non-empty audio chunk received.
* ms per frame: wall time from the first audio chunk to the last, divided by the 80 ms frames
  received after the first chunk (RTF = that / 80; real-time margin = 80 / that).
* underrun: a chunk that arrives after the audio received before it would have finished
  playing, with playback starting when the first chunk arrives (no re-buffering assumed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 24000
FRAME_SAMPLES = 1920  # one 80 ms Mimi frame at 24 kHz
FRAME_MS = 1000.0 * FRAME_SAMPLES / SAMPLE_RATE


@dataclass
class StreamRecord:
    """One request's life as its client saw it (times from ``time.perf_counter``)."""

    sent: float
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, samples) of audio chunks
    done: float | None = None
    finish_reason: str | None = None
    usage_frames: int | None = None  # audio frames the server reported (usage), when it did
    text_chars: int = 0
    error: str | None = None
    stream: int = 0  # which of the level's streams sent it...
    round: int = 0  # ...and its how-manieth request (bench_serving --rounds)

    def add_audio(self, now: float, samples: int) -> None:
        if samples > 0:
            self.chunks.append((now, samples))

    @property
    def samples(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def ttfa_s(self) -> float | None:
        return self.chunks[0][0] - self.sent if self.chunks else None

    def ms_per_frame(self) -> float | None:
        """Wall ms per 80 ms of audio received after the first chunk (None: only one chunk)."""
        if len(self.chunks) < 2:
            return None
        later = self.samples - self.chunks[0][1]
        return (self.chunks[-1][0] - self.chunks[0][0]) * 1000.0 / (later / FRAME_SAMPLES)

    def late_chunks(self) -> list[tuple[int, float]]:
        """(index, lateness ms) of each chunk that arrived after the audio before it ran out."""
        if not self.chunks:
            return []
        start, played, late = self.chunks[0][0], 0, []
        for i, (arrival, samples) in enumerate(self.chunks):
            due = start + played / SAMPLE_RATE
            if arrival > due:
                late.append((i, (arrival - due) * 1000.0))
            played += samples
        return late

    def underruns(self) -> tuple[int, float]:
        """(chunks that arrived after the audio before them ran out, worst lateness in ms)."""
        return _count_and_worst(self.late_chunks())


def _count_and_worst(late: list[tuple[int, float]]) -> tuple[int, float]:
    return len(late), max((ms for _, ms in late), default=0.0)


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def pct(values, q: float) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def all_busy_window(records: list[StreamRecord]) -> tuple[float, float] | None:
    """(start, end) of the time every stream of the level was busy: from the moment the last of
    them got its first audio to the moment the first of them saw its last request end. Streams
    that got no audio at all (every request failed) are left out. None when that never happened
    (a stream ended before another one started)."""
    by_stream: dict[int, list[StreamRecord]] = {}
    for r in records:
        by_stream.setdefault(r.stream, []).append(r)
    firsts, ends = [], []
    for recs in by_stream.values():
        arrivals = [r.chunks[0][0] for r in recs if r.chunks]
        done = [r.done for r in recs if r.done is not None]
        if not arrivals or not done:
            continue
        firsts.append(min(arrivals))
        ends.append(max(done))
    if not firsts:
        return None
    start, end = max(firsts), min(ends)
    return (start, end) if end > start else None


def steady_throughput(records: list[StreamRecord], min_window_s: float = 1.0) -> dict:
    """Audio received per second while every stream was busy (:func:`all_busy_window`): the
    throughput of a loaded server without the level's start-up and tail (the level's audio s/s
    counts both). None when that window is shorter than ``min_window_s``."""
    window = all_busy_window(records)
    if window is None or window[1] - window[0] < min_window_s:
        return {"busy_window_s": None if window is None else window[1] - window[0], "audio_s_per_s_all_busy": None}
    start, end = window
    samples = sum(n for r in records for t, n in r.chunks if start < t <= end)
    return {"busy_window_s": end - start, "audio_s_per_s_all_busy": samples / SAMPLE_RATE / (end - start)}


def summarize(records: list[StreamRecord], started: float, finished: float) -> dict:
    """The numbers of one level: its streams started at ``started`` (each sending one request, or
    several one after another), the last done at ``finished``. Per-stream numbers (TTFA, ms per
    frame, underruns) are per request."""
    ok = [r for r in records if r.error is None]
    ttfa = [r.ttfa_s * 1000.0 for r in ok if r.ttfa_s is not None]
    per_frame = [m for r in ok if (m := r.ms_per_frame()) is not None]
    late = [r.late_chunks() for r in ok]
    under = [_count_and_worst(lc) for lc in late]
    wall = finished - started
    audio_s = sum(r.samples for r in records) / SAMPLE_RATE
    worst = max(per_frame) if per_frame else None
    errors = [r.error for r in records if r.error is not None]
    return {
        "streams": len({r.stream for r in records}),
        "requests": len(records),
        "ok_streams": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "wall_s": wall,
        "ttfa_ms_p50": pct(ttfa, 50), "ttfa_ms_p90": pct(ttfa, 90), "ttfa_ms_p99": pct(ttfa, 99),
        "ttfa_ms_max": max(ttfa) if ttfa else None,
        "ms_per_frame_p50": pct(per_frame, 50), "ms_per_frame_p90": pct(per_frame, 90),
        "ms_per_frame_worst": worst,
        "rtf_p50": None if not per_frame else pct(per_frame, 50) / FRAME_MS,
        "rtf_worst": None if worst is None else worst / FRAME_MS,
        "realtime_margin_p50": None if not per_frame else FRAME_MS / pct(per_frame, 50),
        "realtime_margin_min": None if worst is None else FRAME_MS / worst,
        "streams_timed_after_first_chunk": len(per_frame),
        "underrun_streams": sum(1 for n, _ in under if n),
        "underrun_chunks": sum(n for n, _ in under),
        "underrun_worst_ms": max((w for _, w in under), default=0.0),
        # which chunk of its stream each late one was (0 = the first), and when it came (s after the
        # level started): early chunks late means start-up (admission), spread out means steady state
        "underrun_chunk_index_counts": _counts(i for lc in late for i, _ in lc),
        "underrun_at_s": sorted(round(r.chunks[i][0] - started, 3) for r, lc in zip(ok, late) for i, _ in lc)[:256],
        "audio_s_total": audio_s,
        "audio_s_per_s": audio_s / wall if wall > 0 else None,
        **steady_throughput(records),
        "chunks_per_stream_p50": pct([len(r.chunks) for r in ok], 50),
        "frames_received": sum(r.samples for r in records) / FRAME_SAMPLES,
        "frames_reported": sum(r.usage_frames or 0 for r in ok),
        "streams_with_sample_count_mismatch": sum(
            1 for r in ok if r.usage_frames is not None and r.usage_frames * FRAME_SAMPLES != r.samples),
        "finish_reasons": sorted({r.finish_reason for r in ok if r.finish_reason}),
    }
