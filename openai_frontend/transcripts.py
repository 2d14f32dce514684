"""Transcripts of audio replies by ``message.audio.id``, so that a later turn can refer to an
earlier reply as ``{"role": "assistant", "audio": {"id": ...}}`` (OpenAI's multi-turn audio).

Both stores are bounded (the oldest entries go first) and expiring (``expires_at``, epoch seconds).

* :class:`MemoryTranscripts`: a dict in this process; for one worker.
* :class:`SharedTranscripts`: an SQLite file that every worker process of one frontend opens, so
  a follow-up turn finds the reply whichever worker streamed it (uvicorn hands each connection
  to any of its workers).  ``python -m openai_frontend --workers N`` (N > 1) creates one in a
  private temporary folder and removes it at exit.

The frontend also keeps the conversations it named to Triton (conversation affinity) in stores of
the same kinds, of their own (in the shared file, the table ``conversations``).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from typing import Protocol

log = logging.getLogger("openai_frontend")

#: Entries kept at most in one process (about 0.4 KiB each for replies of ~100 frames).
DEFAULT_CAPACITY = 10_000
#: Entries kept at most in the shared file: an hour of replies at 256 streams of 8 s replies
#: (256 / 8 s x 3600 s = 115,200), about 50 MB, so that ``expires_at`` (one hour) holds at that load.
SHARED_CAPACITY = 120_000


class TranscriptStore(Protocol):
    def put(self, audio_id: str, transcript: str, expires_at: float) -> None: ...

    def get(self, audio_id: str) -> str | None:
        """The transcript, or None when unknown or expired."""


class MemoryTranscripts:
    """One process's transcripts."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, audio_id: str, transcript: str, expires_at: float) -> None:
        with self._lock:
            self._items[audio_id] = (transcript, expires_at)
            self._items.move_to_end(audio_id)  # a renewed entry is the newest
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, audio_id: str) -> str | None:
        with self._lock:
            item = self._items.get(audio_id)
        if item is None or item[1] < time.time():
            return None
        return item[0]


class SharedTranscripts:
    """Transcripts in an SQLite file shared by the frontend's worker processes.

    Each process opens its own connection (WAL mode: readers do not wait for the writer).
    Writes are not synced to disk: the file lives in a temporary folder and holds nothing that
    must survive a crash.  Every ``prune_every`` writes, expired entries and those beyond
    ``capacity`` (oldest first) are deleted.  A failing write is logged and dropped (the reply
    itself has gone out; a later turn can still send the transcript as text); a failing read
    raises :class:`sqlite3.Error` for the caller to answer.
    """

    def __init__(self, path: str, capacity: int = SHARED_CAPACITY, prune_every: int = 256, table: str = "transcripts",
                 kind: str = "transcript", lost: str = "a later turn cannot refer to it by id"):
        if not table.isidentifier():
            raise ValueError(f"table name {table!r} is not an identifier")
        self.path, self.capacity, self.prune_every, self.table = path, capacity, prune_every, table
        self.kind, self.lost = kind, lost  # what an entry is and what a failed write costs, for its log line
        self._lock = threading.Lock()  # one connection, used from the event loop and from worker threads
        self._db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} "
                         "(id TEXT PRIMARY KEY, transcript TEXT NOT NULL, expires_at REAL NOT NULL)")
        self._writes = 0

    def put(self, audio_id: str, transcript: str, expires_at: float) -> None:
        try:
            with self._lock:
                # REPLACE gives the row a new rowid: rowids follow the order of the last writes
                self._db.execute(f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?, ?)",
                                 (audio_id, transcript, expires_at))
                self._writes += 1
                if self._writes % self.prune_every == 0:
                    self._prune()
        except sqlite3.Error as exc:
            log.error("%s of %s not stored (%s): %s", self.kind, audio_id, exc, self.lost)

    def _prune(self) -> None:
        self._db.execute(f"DELETE FROM {self.table} WHERE expires_at < ?", (time.time(),))
        # below the capacity-th newest row (NULL, so nothing, while there are fewer)
        self._db.execute(f"DELETE FROM {self.table} WHERE rowid < "
                         f"(SELECT rowid FROM {self.table} ORDER BY rowid DESC LIMIT 1 OFFSET ?)", (self.capacity - 1,))

    def get(self, audio_id: str) -> str | None:
        with self._lock:
            row = self._db.execute(f"SELECT transcript, expires_at FROM {self.table} WHERE id = ?",
                                   (audio_id,)).fetchone()
        if row is None or row[1] < time.time():
            return None
        return row[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
