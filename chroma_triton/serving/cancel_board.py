"""Cancellation of ``chroma_lm`` streams that run inside the ``chroma`` ensemble.

Measured with Triton 2.51: when a client cancels an ensemble request (gRPC
``stop_stream(cancel_requests=True)`` or a dropped connection), the ensemble scheduler marks the
*next* composing requests it creates as cancelled, but the request already running in a
decoupled step (``chroma_lm``) never sees ``is_cancelled()`` turn true, so it would keep its
engine row until ``max_tokens``. Each response of ``chroma_lm`` does create a ``stream_watch``
request (a trivial model beside ``codec_decoder`` in the ensemble), and that one *is* flagged
cancelled. So ``stream_watch`` posts the stream's key (``stream_key``, a per-request id
``chroma_lm`` sends with every response) on this board, and ``chroma_lm`` checks the board
between engine events. (``codec_decoder`` cannot do it: its dynamic batcher drops cancelled
requests before they reach the model.) Direct ``chroma_lm`` calls are cancelled
through ``response_sender.is_cancelled()`` as usual.

The board is a folder of empty marker files shared by the stub processes of one tritonserver
(they are all its children, so ``os.getppid()`` names the server); a stat per check is cheap.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

ENV_DIR = "CHROMA_CANCEL_DIR"
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def default_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    return base / f"chroma-triton-cancel-{os.getppid()}"


class CancelBoard:
    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder else default_dir()
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path | None:
        return self.folder / key if _KEY.match(key or "") else None

    def post(self, key: str) -> None:
        path = self._path(key)
        if path is not None:
            path.touch()

    def is_posted(self, key: str) -> bool:
        path = self._path(key)
        return path is not None and path.exists()

    def clear(self, key: str) -> None:
        path = self._path(key)
        if path is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def sweep(self, older_than_s: float = 3600.0) -> int:
        """Remove markers nobody collected (e.g. posted after the stream had ended)."""
        now, removed = time.time(), 0
        for path in self.folder.iterdir():
            try:
                if now - path.stat().st_mtime > older_than_s:
                    path.unlink()
                    removed += 1
            except OSError:
                pass
        return removed
