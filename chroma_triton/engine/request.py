"""What goes into the engine (a prepared request) and what comes out (a stream of events)."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import CapacityError, ChromaError, EngineError, InvalidRequestError

MAX_SEED = 2**63 - 1


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int | None = None  # None: the checkpoint's generation_config (or 50)
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed
    max_tokens: int = 1000  # audio frames (80 ms each)

    def validated(self, default_top_k: int, max_frames: int) -> "SamplingParams":
        def bad(msg, param):
            raise InvalidRequestError(msg, param=param)

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1 (audio frames of 80 ms), got {self.max_tokens!r}", "max_tokens")
        if self.max_tokens > max_frames:
            bad(f"max_tokens {self.max_tokens} exceeds this server's limit of {max_frames} frames", "max_tokens")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100) or self.temperature != self.temperature:
            bad(f"temperature must be a number in [0, 100], got {self.temperature!r}", "temperature")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        top_k = default_top_k if self.top_k is None else self.top_k
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}", "top_k")
        seed = self.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") & MAX_SEED
        elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            bad(f"seed must be an integer in [0, 2**63-1], got {seed!r}", "seed")
        return SamplingParams(float(self.temperature), top_k, float(self.top_p), seed, self.max_tokens)


@dataclass
class GenerationRequest:
    """A conversation already turned into model inputs (see `processor.ChromaProcessor`)."""

    thinker_ids: list[int]  # chat-templated prompt with <|AUDIO|> runs expanded
    prompt_text_ids: list[int]  # reference transcript tokens
    prompt_codes: np.ndarray  # reference voice codes [frames, K]
    audio_embeds: torch.Tensor | None = None  # [num <|AUDIO|> tokens, hidden]; the engine drops it once prefilled
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    # set by the engine on submit when it keeps thinker prefixes (engine/thinker_prefix.py)
    prefix_keys: list[bytes] | None = field(default=None, repr=False)
    peer_prefix_len: int = field(default=0, repr=False)  # ...and what another engine's cache holds of it


# -- events -----------------------------------------------------------------------------------
@dataclass
class TextDelta:
    text: str
    text_tokens: int = 0  # reply tokens so far, this delta's included (for streamed usage)
    at: float | None = field(default=None, compare=False)  # time.monotonic() when the engine made it


@dataclass
class AudioChunk:
    codes: np.ndarray  # [context + new frames, K]
    context_frames: int  # leading frames already sent earlier (decode context only)
    start_frame: int  # index of the first new frame


@dataclass
class Finished:
    reason: str  # "stop" (EOS frame), "length" (max_tokens or context full) or "cancelled"
    prompt_tokens: int
    text_tokens: int
    audio_frames: int
    text: str


@dataclass
class RequestFailed:
    message: str
    client_error: bool = False
    busy: bool = False  # refused for capacity (no row in time): the client may retry

    def exception(self) -> ChromaError:
        """The error to raise for it: the caller's fault, capacity, or the engine's."""
        kind = InvalidRequestError if self.client_error else CapacityError if self.busy else EngineError
        return kind(self.message)


Event = TextDelta | AudioChunk | Finished | RequestFailed


class RequestStream:
    """The caller's handle: iterate events (blocking), or cancel. Thread-safe."""

    _END = object()

    def __init__(self, request_id: str, on_end: Callable[[], None] | None = None):
        """`on_end`: called once, on the engine's thread, when the stream's last event (finish or
        failure) is put."""
        self.request_id = request_id
        self.submitted_at = time.monotonic()
        self._items: deque = deque()
        self._ready = threading.Condition()
        self._text_wakes = True  # whether a text delta wakes a waiting get (its caller says)
        self._cancelled = threading.Event()
        self._waker: Callable[[], None] | None = None
        self._on_end = on_end

    # engine side
    def put(self, event: Event) -> None:
        on_end = None
        with self._ready:
            self._items.append(event)
            if isinstance(event, (Finished, RequestFailed)):
                self._items.append(self._END)
                self._ready.notify_all()  # the end: every waiting reader
                on_end, self._on_end = self._on_end, None
            elif self._text_wakes or not isinstance(event, TextDelta):
                self._ready.notify()
            waker = None if isinstance(event, TextDelta) else self._waker
        if waker is not None:
            waker()
        if on_end is not None:
            on_end()

    # caller side
    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """Call `waker()` (on the engine's thread: it must be quick) after each event other than
        text is queued, for a reader that does not block in :meth:`get` (serving/relay_hub.py)."""
        with self._ready:
            self._waker = waker

    def drain(self) -> list[Event | None]:
        """Every event queued now, without waiting; None last once the stream has ended."""
        with self._ready:
            items = list(self._items)
            self._items.clear()
            if items and items[-1] is self._END:
                self._items.append(self._END)  # stay ended for later calls
                items[-1] = None
            return items

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def get(self, timeout: float | None = None, text_wakes: bool = True) -> Event | None:
        """Next event, or None once the stream has ended; queue.Empty after `timeout` seconds
        without one. With `text_wakes` false, text deltas queued while waiting do not end the
        wait (a caller that only forwards text along with audio is not woken once per token);
        they come first once something else does, or the timeout passes. (`text_wakes` is meant
        for a stream's single reader: the last caller's choice holds.)"""
        with self._ready:
            self._text_wakes = text_wakes
            if not self._ready.wait_for(lambda: self._items, timeout):
                raise queue.Empty
            item = self._items.popleft()
            if item is self._END:
                self._items.appendleft(self._END)  # stay ended for later calls
                return None
            return item

    def __iter__(self):
        while (event := self.get()) is not None:
            yield event
