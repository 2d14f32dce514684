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

import logging
import mmap
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

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


def create_file(path: Path, nbytes: int, header: np.ndarray) -> None:
    """Make ``path``: ``nbytes`` (reserved now, so a full /dev/shm fails here with an OSError
    instead of killing the process later) starting with ``header``; readers see a whole file or
    none (written beside it, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        os.pwrite(fd, header.tobytes(), 0)
    except OSError:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a peer killed without closing leaves its files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_in_name(name: str) -> int:
    """The process id in a peer file's name, ``{instance}.{pid}.{kind}``."""
    return int(name.rsplit(".", 2)[-2])


def room_for(folder: Path, nbytes: int) -> str | None:
    """Why a file of ``nbytes`` should not be made in ``folder`` (/dev/shm, where the Python
    backend's own shared memory grows too): less than twice that free; None if there is room."""
    disk = os.statvfs(folder)
    free = disk.f_bavail * disk.f_frsize
    if free < 2 * nbytes:
        return f"{free / 2**20:.0f} MiB free in {folder}, at least {2 * nbytes / 2**20:.0f} wanted (the file and as much again)"
    return None


def open_shared(folder: Path, nbytes: int, make: Callable[[], object], what: str) -> tuple[object | None, str | None]:
    """``(make(), None)`` where a file of ``nbytes`` shared through ``folder`` can be trusted and
    fits: an x86 host (:func:`ordered_stores`) and twice the bytes free (:func:`room_for`); else
    ``(None, why)``, ``what`` naming the files in the reason."""
    if not ordered_stores():
        return None, f"the {what}s rely on x86's store ordering, this host is {platform.machine()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        why = room_for(Path(folder), nbytes)
        return (make(), None) if why is None else (None, why)
    except OSError as exc:
        return None, f"cannot make a {nbytes / 2**20:.1f} MiB {what} in {folder} ({exc})"


class PeerFiles:
    """The files other instances share in one folder (names ending in ``suffix``, this instance's
    ``own`` left out), listed again at most every ``refresh_s`` so that instances started later are
    found: ``opened`` maps each name to what ``open_peer(name)`` made of it. A file that cannot be
    opened (``open_peer`` raises: unreadable, another model's, memory that cannot be mapped) is
    logged and tried once; one whose file went, or whose ``alive(peer)`` says no, is closed."""

    def __init__(self, folder: Path, suffix: str, own: str, open_peer: Callable[[str], object], what: str,
                 refresh_s: float, alive: Callable[[object], bool] | None = None):
        self.folder, self.suffix, self.own, self.what = Path(folder), suffix, own, what
        self._open, self._alive, self.refresh_s = open_peer, alive, refresh_s
        self.opened: dict[str, object] = {}
        self._ignored: set[str] = set()
        self._listed = float("-inf")

    def current(self) -> list:
        """The peers opened now (the folder listed again when it is time)."""
        now = time.monotonic()
        if now - self._listed >= self.refresh_s:
            self._listed = now
            self._refresh()
        return list(self.opened.values())

    def _refresh(self) -> None:
        try:
            names = {n for n in os.listdir(self.folder) if n.endswith(self.suffix) and n != self.own}
        except OSError:
            return
        for name in names - self.opened.keys() - self._ignored:
            try:
                self.opened[name] = self._open(name)
            except Exception as exc:  # noqa: BLE001 - whatever a peer's file holds, this instance goes on without it
                log.warning("%s: cannot read peer %s: %s", self.what, name, exc)
                self._ignored.add(name)
        for name in list(self.opened):
            if name not in names or not self._is_alive(self.opened[name]):
                self.opened.pop(name).close()
                self._ignored.add(name)

    def _is_alive(self, peer) -> bool:
        try:
            return self._alive is None or bool(self._alive(peer))
        except Exception:  # noqa: BLE001 - a name without a process id: not one of ours
            return False

    def close(self) -> None:
        for peer in self.opened.values():
            peer.close()
        self.opened.clear()


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
        header = [magic, slots, ways, data_bytes, *params] + [0] * (_HEADER - 4 - len(params))
        create_file(path, cls.nbytes(slots, columns, data_bytes), np.array(header, np.int64))
        return cls(path, magic, columns, writable=True)

    def candidates(self, words: np.ndarray) -> np.ndarray:
        """The slots each key (``key_words``' rows) may be in: [keys, ways]. The bucket comes from
        the second word (the first is always odd: from it, an even count of buckets would use half)."""
        bucket = (np.ascontiguousarray(words[:, 1]).view(np.uint64) % np.uint64(self.buckets)).astype(np.int64)
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
