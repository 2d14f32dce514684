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

That path is only as prompt as the stream's next response (and before the codec batched, it
waited in ``codec_decoder``'s queue, long under load: docs/reliability.md), so there is a direct
one too: the **control model** ``chroma_cancel`` (a tiny Python model called
straight, not through the ensemble) posts a marker named after the *Triton request id*
(:func:`request_key`): ``chroma_lm`` registers each running request's id (a ``live-`` marker,
so the control call can say whether it was running) and a :class:`CancelWatch` thread in
``chroma_lm`` lists the folder every few milliseconds and cancels the engine stream of each id
posted after that request arrived (older markers, e.g. for a reused id, are ignored). The
OpenAI frontend calls it whenever it abandons a stream; direct gRPC users can call it too.

Once ``chroma_lm`` has seen a stream's cancel it also marks the stream *gone* (``gone/<stream
key>``): the chunks it had already sent may still wait in ``codec_decoder``'s queue, and the
ensemble flags only the step requests it creates after the cancel, so ``codec_decoder`` looks the
stream key up there and answers those chunks with no audio instead of decoding them for nobody.
Gone marks live in a folder of their own (the cancel watch lists only the board's top level) and
are swept like unclaimed markers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

ENV_DIR = "CHROMA_CANCEL_DIR"
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
PREFIX = "chroma-triton-cancel-"
#: A control marker cancels a request that arrived in chroma_lm at most this long after it was
#: posted (the control call may come while the request still waits in audio_encoder).
CONTROL_GRACE_S = 120.0
WATCH_PERIOD_S = 0.01
GONE = "gone"  # the board's folder of cancelled streams' keys (codec_decoder skips their chunks)


def _base() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())


def server_dir(server_pid: int) -> Path:
    """The board of the tritonserver whose pid is ``server_pid`` (unless $CHROMA_CANCEL_DIR is set)."""
    return _base() / f"{PREFIX}{server_pid}"


def default_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    return server_dir(os.getppid())


def remove_server_dir(server_pid: int) -> None:
    """Remove the board of a tritonserver that has stopped (called by whoever started it)."""
    shutil.rmtree(server_dir(server_pid), ignore_errors=True)


def _id_digest(request_id: str) -> str:
    """A Triton request id (any string) as a valid file-name part."""
    return hashlib.sha1(request_id.encode("utf-8", "surrogatepass")).hexdigest()


def request_key(request_id: str) -> str:
    """The control marker's name for a Triton request id."""
    return "rid-" + _id_digest(request_id)


def live_key(request_id: str) -> str:
    """The marker of a request id running in chroma_lm now."""
    return "live-" + _id_digest(request_id)


class CancelBoard:
    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder else default_dir()
        (self.folder / GONE).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str, under: str = "") -> Path | None:
        return self.folder / under / key if _KEY.match(key or "") else None

    def post(self, key: str, under: str = "") -> None:
        """Post marker ``key`` (in the board's folder ``under``, e.g. :data:`GONE`); a key that
        is not a file name is ignored."""
        path = self._path(key, under)
        if path is not None:
            path.touch()

    def is_posted(self, key: str, under: str = "") -> bool:
        path = self._path(key, under)
        return path is not None and path.exists()

    def posted_at(self, key: str) -> float | None:
        """When the marker was (last) posted (wall clock), or None."""
        path = self._path(key)
        try:
            return path.stat().st_mtime if path is not None else None
        except OSError:
            return None

    def cancel_request(self, request_id: str) -> bool:
        """The control call: post the cancel marker of ``request_id``; True when that request is
        running in chroma_lm now (False: not arrived yet, finished, or unknown; the marker stays
        for :data:`CONTROL_GRACE_S` in case it is still on its way)."""
        self.post(request_key(request_id))
        return self.is_posted(live_key(request_id))

    def mark_gone(self, stream_key: str) -> None:
        """The stream of ``stream_key`` was cancelled: its chunks still queued need no decoding."""
        self.post(stream_key, GONE)

    def is_gone(self, stream_key: str) -> bool:
        return self.is_posted(stream_key, GONE)

    def names(self) -> set[str]:
        try:
            return set(os.listdir(self.folder))
        except OSError:
            return set()

    def clear(self, key: str) -> None:
        path = self._path(key)
        if path is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def sweep(self, older_than_s: float = 3600.0) -> int:
        """Remove markers nobody collected (e.g. posted after the stream had ended) and gone marks
        (by then no chunk of their streams is queued); ``live-`` markers belong to running requests
        and are left alone."""
        now, removed = time.time(), 0
        gone = self.folder / GONE
        for path in [*self.folder.iterdir(), *(gone.iterdir() if gone.is_dir() else ())]:
            if path.name.startswith("live-") or path == gone:
                continue
            try:
                if now - path.stat().st_mtime > older_than_s:
                    path.unlink()
                    removed += 1
            except OSError:
                pass
        return removed


class CancelWatch:
    """One thread per ``chroma_lm`` process: lists the board every ``period_s`` and calls the
    callback of each registered request whose marker appeared (once per request).

    ``register(keys, since, callback)``: ``keys`` are marker names (the control key of the Triton
    request id and the codec path's stream key); a control marker counts only when posted at or
    after ``since`` - :data:`CONTROL_GRACE_S`; ``callback(source, posted_at)`` runs on the watch
    thread and must be quick (e.g. ``stream.cancel()``)."""

    SWEEP_EVERY_S = 60.0

    def __init__(self, board: CancelBoard, period_s: float = WATCH_PERIOD_S):
        if not period_s > 0:
            raise ValueError(f"the cancel watch period must be > 0 s, got {period_s}")
        self.board = board
        self.period_s = period_s
        self._swept = time.monotonic()
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[tuple[str, ...], float, Callable[[str, float | None], None]]] = {}
        self._by_key: dict[str, set[int]] = {}  # marker name -> registrations waiting for it
        self._next = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chroma-cancel-watch", daemon=True)
        self._thread.start()

    def register(self, keys, since: float, callback: Callable[[str, float | None], None]) -> int:
        with self._lock:
            self._next += 1
            keys = tuple(k for k in keys if k)
            self._entries[self._next] = (keys, since, callback)
            for key in keys:
                self._by_key.setdefault(key, set()).add(self._next)
            return self._next

    def unregister(self, token: int) -> None:
        with self._lock:
            self._drop(token)

    def _drop(self, token: int):
        """Forget a registration (the lock held); its entry, or None."""
        entry = self._entries.pop(token, None)
        for key in entry[0] if entry else ():
            tokens = self._by_key.get(key)
            if tokens is not None:
                tokens.discard(token)
                if not tokens:
                    del self._by_key[key]
        return entry

    def close(self) -> None:
        self._stop.set()

    def check(self) -> int:
        """One pass (the thread's loop body); returns how many callbacks fired."""
        with self._lock:
            if not self._entries:
                return 0
        names = self.board.names()
        with self._lock:  # only registrations whose marker is on the board (a set intersection,
            #               not a loop over every running request: this runs 100 times a second)
            hits = [(token, key, self._entries[token]) for key in names.intersection(self._by_key)
                    for token in self._by_key[key]]  # (_by_key only names registered tokens)
        fired = 0
        for token, key, (keys, since, callback) in sorted(hits, key=lambda h: (h[0], h[2][0].index(h[1]))):
            posted = self.board.posted_at(key)
            if key.startswith("rid-") and (posted is None or posted < since - CONTROL_GRACE_S):
                continue  # a stale marker of an earlier request with the same id
            with self._lock:
                if self._drop(token) is None:
                    continue  # fired already (its other key) or unregistered meanwhile
            try:
                callback("control" if key.startswith("rid-") else "watch", posted)
            except Exception:  # noqa: BLE001 - one bad callback must not stop the watch
                log.exception("cancel callback failed")
            fired += 1
        return fired

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.check()
                if time.monotonic() - self._swept > self.SWEEP_EVERY_S:
                    self._swept = time.monotonic()
                    self.board.sweep(older_than_s=2 * CONTROL_GRACE_S)  # markers nobody collected
            except Exception:  # noqa: BLE001
                log.exception("cancel watch pass failed")
