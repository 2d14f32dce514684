"""Frontend settings: one frozen object built from the command line, passed to the app factory.

With ``--workers N`` uvicorn imports the app in N processes, so the settings travel to the
workers as JSON in an environment variable (:data:`SETTINGS_ENV`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from chroma_triton.serving.affinity import idle_problem

SETTINGS_ENV = "CHROMA_FRONTEND_SETTINGS"
API_KEY_ENV = "CHROMA_API_KEY"

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VOICES_DIR = PROJECT_ROOT / "assets" / "voices"


@dataclass(frozen=True)
class Settings:
    """Everything the frontend needs to know; defaults are the production defaults.

    Limits (why these numbers):

    * ``max_body_bytes`` 32 MiB: a 300 s, 16 kHz mono WAV is 9.6 MB, 12.8 MB as base64; the
      limit leaves room for a reference clip and a few clips more.
    * ``max_audio_seconds`` 300 s of user audio per request and ``max_prompt_audio_seconds``
      60 s of reference voice: what the engine accepts (``chroma_triton.pipeline``).
    * ``max_tokens_limit`` 4000 frames = 320 s of speech, the engine's ``max_frames`` default: a
      bound on one reply, so a typo cannot keep a decoding slot busy for hours.
    * ``cors_allow_origins`` none: browsers may not call the API from other origins unless an
      origin (or ``*``) is listed; server-to-server clients are not affected by CORS.
    * ``triton_cancel_model`` ``chroma_cancel``: the control model told the id of every request the
      frontend abandons, so that ``chroma_lm`` frees its row at once (docs/reliability.md).
    * ``request_timeout`` 600 s: the gRPC deadline of one request's whole stream; a stuck
      server costs a client at most this long, then a 504.
    * ``slow_client_timeout`` 30 s: a streamed reply is abandoned (its Triton request cancelled,
      its connection closed) when one event cannot be handed to the client's connection for this
      long: by then both sockets' buffers (megabytes each on Linux; a second of audio is 64 kB of
      base64 PCM) are full of audio the client has not read, and a client that stopped reading
      would keep the reply's events in this process and in Triton until ``request_timeout``.
      0 = never.
    * ``start_timeout`` 60 s: a request whose reply has not started (no text, no audio) within
      this long gets 429 ``server_busy`` and its Triton request is cancelled. A reply starts
      within a second once it has a generation row, so such a request is waiting for one: in the
      engine's queue (whose own bound, ``max_queue_wait_s`` 30 s, answers first) or, with more
      than one ``chroma_lm`` instance, in Triton's, which nothing else bounds. 0 = never.
    """

    triton_grpc_url: str = "localhost:8001"
    triton_model: str = "chroma"
    triton_cancel_model: str = "chroma_cancel"  # "" = no control call (gRPC cancel only)
    model_name: str = "chroma"
    allowed_local_media_paths: tuple[str, ...] = ()
    voices_dir: str | None = str(DEFAULT_VOICES_DIR) if DEFAULT_VOICES_DIR.is_dir() else None
    api_key: str | None = None
    cors_allow_origins: tuple[str, ...] = ()
    max_body_bytes: int = 32 * 1024 * 1024
    max_audio_seconds: float = 300.0
    max_prompt_audio_seconds: float = 60.0
    max_tokens_limit: int = 4000
    default_max_tokens: int = 1000
    request_timeout: float = 600.0
    slow_client_timeout: float = 30.0
    start_timeout: float = 60.0
    health_timeout: float = 2.0
    audio_retention_seconds: int = 3600
    log_level: str = "info"
    transcript_db: str | None = None  # SQLite file shared by worker processes; None: in this process's memory
    # conversation affinity (Triton's chroma_lm with a sequence batcher): how long Triton keeps a
    # conversation on its instance (the launcher's --conversation-idle-s); requests then name their
    # conversations, and one this frontend has not named for that long starts again; 0: off
    conversation_idle_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_tokens_limit", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_audio_seconds", "max_prompt_audio_seconds", "request_timeout", "health_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        problem = self.conversation_idle_s and idle_problem(self.conversation_idle_s)
        if problem:
            raise ValueError(f"conversation_idle_s (0: off) {problem}")
        if self.start_timeout < 0:
            raise ValueError(f"start_timeout must be >= 0, got {self.start_timeout}")
        if self.slow_client_timeout < 0:
            raise ValueError(f"slow_client_timeout must be >= 0, got {self.slow_client_timeout}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> "Settings":
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            return cls()
        values = json.loads(raw)
        for name in ("allowed_local_media_paths", "cors_allow_origins"):
            values[name] = tuple(values.get(name) or ())
        return cls(**values)
