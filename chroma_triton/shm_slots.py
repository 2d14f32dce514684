"""A table in a shared file that one process writes and others read without locks: what the
engines' thinker prefix caches (engine/peer_prefixes.py) and the audio encoders' clip embeddings
(serving/peer_clips.py) publish to the other instances of one tritonserver.

Slots are found by a 16-byte key: the table is a hash table of buckets of ``ways`` slots, so a
reader looks up many keys at once (a gather of their buckets and a vector compare). Each slot has
a sequence number its writer makes odd while it rewrites the slot and even again after, and
int64 columns of the caller's choosing; a file may also carry a data region after the columns.
A reader that sees a slot's number odd, or changed across its copy of what the slot points to,
treats the slot as missing. That relies on stores reaching other processes in program order
(x86's TSO), so callers share only on x86 hosts (:data:`ORDERED_STORES`).
"""

from __future__ import annotations

import mmap
import os
import platform
from pathlib import Path

import numpy as np

ORDERED_STORES = ("x86_64", "AMD64", "i686", "i386")  # platform.machine() of hosts the tables are safe on
_HEADER = 8  # int64s: magic, slots, ways, data bytes, then up to 4 parameters of the caller's
WAYS = 8


def ordered_stores() -> bool:
    """Whether this host's stores reach other processes in program order (x86)."""
    return platform.machine() in ORDERED_STORES


def key_words(keys: list[bytes]) -> np.ndarray:
    """Each key's first 16 bytes as two int64 words [n, 2], the first made odd (0 marks an empty slot)."""
    words = np.frombuffer(b"".join(bytes(k[:16]).ljust(16, b"\0") for k in keys), np.int64).reshape(-1, 2).copy()
    words[:, 0] |= 1
    return words


class SlotTable:
    """One writer's table, mapped from its file: ``seq``, ``key0``, ``key1`` and the ``columns``
    (name -> int64s per slot) as arrays over the slots, ``params`` (up to 4 int64s) and ``data``
    (bytes)."""

    def __init__(self, path: Path, magic: int, columns: dict[str, int], writable: bool = False):
        self.path = path
        with open(path, "r+b" if writable else "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        header = np.frombuffer(self._map, np.int64, _HEADER)
        if header[0] != magic:
            raise ValueError(f"{path} is not a table of this kind")
        self.slots, self.ways, data_bytes = int(header[1]), int(header[2]), int(header[3])
        self.params = [int(p) for p in header[4:]]
        self.buckets = self.slots // self.ways
        at = _HEADER * 8

        def column(width: int) -> np.ndarray:
            nonlocal at
            out = np.frombuffer(self._map, np.int64, self.slots * width, at)
            at += 8 * self.slots * width
            return out if width == 1 else out.reshape(self.slots, width)

        self.seq, self.key0, self.key1 = column(1), column(1), column(1)
        self.columns = {name: column(width) for name, width in columns.items()}
        self.data = np.frombuffer(self._map, np.uint8, data_bytes, at)

    @staticmethod
    def nbytes(slots: int, columns: dict[str, int], data_bytes: int = 0) -> int:
        return 8 * (_HEADER + slots * (3 + sum(columns.values()))) + data_bytes

    @classmethod
    def create(cls, path: Path, magic: int, slots: int, columns: dict[str, int], params: list[int] = (),
               data_bytes: int = 0, ways: int = WAYS) -> "SlotTable":
        """Write an empty table (``slots`` rounded down to whole buckets) to ``path`` and map it for
        writing: its space reserved now, so a full /dev/shm fails here with an OSError instead of
        killing the process later; readers see a whole table or none."""
        if len(params) > _HEADER - 4:
            raise ValueError(f"at most {_HEADER - 4} parameters")
        slots = max(ways, slots // ways * ways)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, cls.nbytes(slots, columns, data_bytes))
            header = [magic, slots, ways, data_bytes, *params] + [0] * (_HEADER - 4 - len(params))
            os.pwrite(fd, np.array(header, np.int64).tobytes(), 0)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, path)
        return cls(path, magic, columns, writable=True)

    def candidates(self, words: np.ndarray) -> np.ndarray:
        """The slots each key (``key_words``' rows) may be in: [keys, ways]."""
        bucket = (words[:, 0].view(np.uint64) % np.uint64(self.buckets)).astype(np.int64)
        return bucket[:, None] * self.ways + np.arange(self.ways)

    def lookup(self, words: np.ndarray) -> list[tuple[int, int]]:
        """(key index, slot) of every slot that holds one of the keys (read its seq before using it)."""
        ways = self.candidates(words)
        same = (self.key0[ways] == words[:, :1]) & (self.key1[ways] == words[:, 1:])
        return [(int(i), int(ways[i, w])) for i, w in zip(*np.nonzero(same))]

    def write(self, slot: int, word: np.ndarray, **values) -> None:
        self.seq[slot] += 1  # odd: being rewritten
        self.key0[slot], self.key1[slot] = word
        for name, value in values.items():
            column = self.columns[name]
            if column.ndim == 1:
                column[slot] = value
            else:
                column[slot, :len(value)] = value
        self.seq[slot] += 1

    def clear(self, slot: int) -> None:
        self.seq[slot] += 1
        self.key0[slot] = 0
        self.seq[slot] += 1

    def close(self) -> None:
        self.seq = self.key0 = self.key1 = self.data = None
        self.columns = {}
        try:
            self._map.close()
        except BufferError:  # a view of it is still held somewhere: unmapped once that goes
            pass


class SlotAllocator:
    """The writer's view of which slots of its table are in use."""

    def __init__(self, table: SlotTable):
        self.table = table
        self._used = np.zeros(table.slots, bool)

    def take(self, word: np.ndarray) -> int | None:
        """A free slot of the key's bucket, or None if the bucket is full."""
        ways = self.table.candidates(word[None, :])[0]
        free = np.flatnonzero(~self._used[ways])
        if not len(free):
            return None
        slot = int(ways[free[0]])
        self._used[slot] = True
        return slot

    def free(self, slot: int) -> None:
        self.table.clear(slot)
        self._used[slot] = False

    def used(self) -> int:
        return int(self._used.sum())
