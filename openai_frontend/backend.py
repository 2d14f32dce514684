"""The engine protocol between the HTTP layer and whatever generates the reply.

The routers only know :class:`ChatBackend`: ``stream(request)`` yields :class:`Delta` objects
(text, audio samples, and at the end the finish reason and usage) and ``ready()`` says whether
requests can be served.  :class:`openai_frontend.triton_backend.TritonBackend` is the real one;
tests plug in fakes.

Contract of ``stream``:

* it raises :class:`~openai_frontend.errors.APIError` subclasses only, already classified
  (client error / server error / unavailable / timeout), before or between deltas;
* the last delta carries ``finish_reason`` and ``usage``; nothing follows it;
* the caller may stop early: closing the iterator (``aclose()``) or cancelling the task that
  iterates it cancels the request in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 1920  # one Mimi frame: 80 ms at 24 kHz


@dataclass(frozen=True)
class ChatRequest:
    """A validated request in the engine's terms.

    ``messages`` are chat messages whose audio parts are ``{"type": "audio", "audio_index": i}``,
    ``user_audio[i]`` holding the i-th clip's encoded bytes; ``prompt_audio`` empty means the
    engine's default voice.  ``top_k``/``seed`` None mean the engine's default / a random seed.
    """

    request_id: str
    messages: list[dict]
    user_audio: list[bytes] = field(default_factory=list)
    prompt_audio: bytes = b""
    prompt_text: str = ""
    max_tokens: int = 1000
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    text_tokens: int
    audio_frames: int


@dataclass
class Delta:
    """New output since the previous delta: text, and float32 mono PCM at 24 kHz."""

    text: str = ""
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    finish_reason: str | None = None  # set on the last delta: "stop" | "length" | "cancelled"
    usage: Usage | None = None  # set on the last delta


@dataclass(frozen=True)
class Readiness:
    ready: bool
    detail: str = ""


@runtime_checkable
class ChatBackend(Protocol):
    def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        """Generate the reply as deltas (an async generator)."""
        ...

    async def ready(self) -> Readiness:
        """Whether the engine can serve requests now, and why not."""
        ...

    async def close(self) -> None:
        ...
