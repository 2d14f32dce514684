"""Thinker prefix caches of several engines read each other's stored prompts
(`EngineOptions.thinker_prefix_peers`: one engine per GPU at ``--dp-size`` > 1).

Triton hands a conversation's next turn to whichever ``chroma_lm`` instance is free, so at dp 2
about half the turns reach the GPU that did not prefill the turn before, and prefill the whole
conversation again (runs 76-78: dp 2 1.61-1.75 times dp 1, against 1.9-2 with independent
streams). Here each engine publishes what its cache holds, and an engine that lacks a prompt's
prefix copies it from a peer's pool into its own before the admission: GPU to GPU over NVLink
(391 GB/s measured on an H200 pair, 0.3 ms for a 1,000-position prompt of the real thinker),
against a prefill of every position.

Each engine writes a table of its own (one writer) in a folder the engines share (the
tritonserver's board folder in ``/dev/shm``): a slot per stored prompt with its blocks, the pages
that hold them and its last block key (which covers every position before it: the keys are
chained), beside the pool's export (engine/peer_memory.py: CUDA IPC on GPUs, a file on the CPU).
A slot's place is set by its last key: the table is a hash table of buckets of `WAYS` slots, so a
reader looks up every one of its prompt's keys at once (a gather of their buckets and a vector
compare, tens of microseconds) and copies the longest match's pages.

Ordering. A slot's sequence number is odd while its writer rewrites it. The writer publishes a
prompt only once its pages are written on the device (a CUDA event it polls), and unpublishes it
(the sequence number moves) *before* giving its pages back, so before anything can overwrite
them. A reader copies, waits for its copy to finish, then checks that the sequence number has not
moved: if it has, the pages may have been overwritten during the copy and the copy is thrown away
(counted; the prompt is prefilled as without a peer). That relies on stores reaching other
processes in program order (x86), as serving/peer_states.py does; elsewhere sharing is off.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import peer_memory

log = logging.getLogger(__name__)

FOLDER = "thinker-prefixes"
_MAGIC = 0x43484D5052454658  # "CHMPREFX"
_HEADER = 5  # int64s: magic, slots, max_runs, block, ways
MAX_RUNS = 8  # page runs a published prompt may span (a prompt in more runs is kept to its engine)
WAYS = 8  # slots per bucket (a prompt whose bucket is full is kept to its engine)
MAX_SLOTS = 1 << 16
REFRESH_S = 1.0  # how often a reader lists the folder for engines that started after it
ORDERED_STORES = ("x86_64", "AMD64", "i686", "i386")


def key_words(keys: list[bytes]) -> np.ndarray:
    """Each block key's first 16 bytes as two int64 words [n, 2], the first made odd (0 marks an
    empty slot)."""
    words = np.frombuffer(b"".join(k[:16] for k in keys), np.int64).reshape(-1, 2).copy()
    words[:, 0] |= 1
    return words


class PrefixTable:
    """One engine's published prompts, mapped from its file."""

    def __init__(self, path: Path, writable: bool):
        self.path = path
        with open(path, "r+b" if writable else "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        header = np.frombuffer(self._map, np.int64, _HEADER)
        if header[0] != _MAGIC:
            raise ValueError(f"{path} is not a thinker prefix table")
        self.slots, self.max_runs, self.block, self.ways = (int(h) for h in header[1:5])
        self.buckets = self.slots // self.ways
        at = _HEADER * 8

        def column(count: int):
            nonlocal at
            out = np.frombuffer(self._map, np.int64, count, at)
            at += 8 * count
            return out

        self.seq, self.key0, self.key1 = column(self.slots), column(self.slots), column(self.slots)
        self.blocks, self.nruns = column(self.slots), column(self.slots)
        self.runs = column(self.slots * self.max_runs * 2).reshape(self.slots, self.max_runs, 2)

    @staticmethod
    def nbytes(slots: int, max_runs: int) -> int:
        return 8 * (_HEADER + 5 * slots + 2 * slots * max_runs)

    def bucket(self, word0: np.ndarray) -> np.ndarray:
        """The buckets of last keys whose first words are `word0`."""
        return (word0.view(np.uint64) % np.uint64(self.buckets)).astype(np.int64)

    @classmethod
    def create(cls, path: Path, slots: int, max_runs: int, block: int, ways: int = WAYS) -> "PrefixTable":
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, cls.nbytes(slots, max_runs))
            os.pwrite(fd, np.array([_MAGIC, slots, max_runs, block, ways], np.int64).tobytes(), 0)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, path)  # readers see a whole table or none
        return cls(path, writable=True)

    def write(self, slot: int, last_key: np.ndarray, blocks: int, runs: list[tuple[int, int]]) -> None:
        self.seq[slot] += 1  # odd: being rewritten
        self.key0[slot], self.key1[slot] = last_key
        self.blocks[slot] = blocks
        self.nruns[slot] = len(runs)
        self.runs[slot, :len(runs)] = runs
        self.seq[slot] += 1

    def clear(self, slot: int) -> None:
        self.seq[slot] += 1
        self.key0[slot] = 0
        self.seq[slot] += 1

    def close(self) -> None:
        self.seq = self.key0 = self.key1 = self.blocks = self.nruns = self.runs = None
        self._map.close()


@dataclass
class PeerHit:
    """A peer's stored prompt whose `blocks` whole blocks begin the prompt looked up."""

    peer: "_Peer"
    slot: int
    seq: int
    blocks: int
    runs: list[tuple[int, int]]

    def still_valid(self) -> bool:
        """Whether the peer has kept the prompt in these pages since it was found (read after the
        copy out of them has finished)."""
        table = self.peer.table
        return table.seq is not None and int(table.seq[self.slot]) == self.seq

    def read(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's first `positions` keys and values, views of (or one concatenation from) the
        peer's pool: read them before `still_valid`."""
        from .prefix_pages import read_runs

        return read_runs(self.peer.k, self.peer.v, self.peer.page, self.runs, positions)


class _Peer:
    __slots__ = ("name", "pid", "table", "k", "v", "page")

    def __init__(self, name: str, pid: int, table: PrefixTable, k: torch.Tensor, v: torch.Tensor, page: int):
        self.name, self.pid, self.table, self.k, self.v, self.page = name, pid, table, k, v, page


class PeerPrefixes:
    """What one engine's thinker prefix cache shares: its own table (the prompts it stores, by
    the cache's prompt ids) and its peers' (looked up for prompts it lacks)."""

    def __init__(self, folder: Path, name: str, k: torch.Tensor, v: torch.Tensor, page: int, block: int,
                 files: dict[str, Path] | None = None, slots: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = f"{name}.{os.getpid()}"
        self.device = k.device
        self.k, self.v, self.page, self.block = k, v, page, block
        slots = min(MAX_SLOTS, k.shape[2] // page) if slots is None else slots
        slots = max(WAYS, slots // WAYS * WAYS)
        files = files or {}
        pool = {"k": peer_memory.export(k, files.get("k")), "v": peer_memory.export(v, files.get("v")),
                "page": page, "pid": os.getpid()}
        meta = self.folder / f"{self.name}.pool.json"
        tmp = meta.with_name(meta.name + ".tmp")
        tmp.write_text(json.dumps(pool))
        os.replace(tmp, meta)
        self._files = [meta, *files.values()]
        self.own = PrefixTable.create(self.folder / f"{self.name}.table", slots, MAX_RUNS, block)
        self._files.append(self.own.path)
        self._slots: dict[int, int] = {}  # cache prompt id -> slot
        self._used = np.zeros(slots, bool)
        self._pending: list[tuple[int, np.ndarray, int, list, object]] = []  # (id, last key, blocks, runs, event)
        self._peers: dict[str, _Peer] = {}
        self._ignored: set[str] = set()
        self._listed = float("-inf")
        self._lock = threading.Lock()  # lookups come from request threads, publishing from the engine's
        self.unpublished = 0  # prompts kept to this engine: their bucket full, or in more than MAX_RUNS runs

    @classmethod
    def open(cls, folder: Path, name: str, k: torch.Tensor, v: torch.Tensor, page: int, block: int,
             files: dict[str, Path] | None = None) -> "PeerPrefixes | None":
        """Like the constructor, but where sharing cannot work it is logged and the engine keeps
        its prompts to itself (None)."""
        why = None
        if platform.machine() not in ORDERED_STORES:
            why = f"the tables rely on x86's store ordering, this host is {platform.machine()}"
        else:
            try:
                return cls(folder, name, k, v, page, block, files)
            except (OSError, peer_memory.PeerMemoryError) as exc:
                why = str(exc)
        log.warning("thinker prefixes are not shared with other engines: %s; a turn that reaches another GPU "
                    "than its conversation's last prefills it whole", why)
        return None

    # -- the writer ---------------------------------------------------------------------------
    def stored(self, pid: int, keys: list[bytes], runs: list[tuple[int, int]]) -> None:
        """The cache wrote prompt `pid` (block keys `keys`) into `runs`: published once the
        device has written them (`flush`)."""
        if len(runs) > MAX_RUNS:
            self.unpublished += 1
            return
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        with self._lock:
            self._pending.append((pid, key_words(keys[-1:])[0], len(keys), list(runs), event))
        self.flush()

    def dropped(self, pid: int) -> None:
        """The cache is about to give prompt `pid`'s pages back: unpublish it first."""
        with self._lock:
            self._pending = [p for p in self._pending if p[0] != pid]
            slot = self._slots.pop(pid, None)
            if slot is not None:
                self.own.clear(slot)
                self._used[slot] = False

    def flush(self) -> None:
        """Publish the stored prompts whose pages the device has finished writing."""
        with self._lock:
            waiting = []
            for pid, last, blocks, runs, event in self._pending:
                if event is not None and not event.query():
                    waiting.append((pid, last, blocks, runs, event))
                    continue
                first = int(self.own.bucket(last[:1])[0]) * self.own.ways
                free = np.flatnonzero(~self._used[first:first + self.own.ways])
                if not len(free):
                    self.unpublished += 1
                    continue
                slot = first + int(free[0])
                self._used[slot] = True
                self.own.write(slot, last, blocks, runs)
                self._slots[pid] = slot
            self._pending = waiting

    def waiting(self) -> bool:
        """Whether stored prompts wait for the device before they are published."""
        return bool(self._pending)

    def peer_count(self) -> int:
        return len(self._peers)

    # -- the readers ----------------------------------------------------------------------------
    def find(self, keys: list[bytes], limit: int, at_least: int) -> PeerHit | None:
        """The peers' longest stored prompt that is the first b blocks of a prompt with block
        keys `keys`, for at_least <= b <= limit; None if none has one."""
        limit = min(limit, len(keys))
        at_least = max(at_least, 1)
        if limit < at_least:
            return None
        words = key_words(keys[at_least - 1:limit])  # the last keys of b = at_least .. limit blocks
        blocks = np.arange(at_least, limit + 1)
        best = None
        with self._lock:
            self._refresh()
            for peer in self._peers.values():
                t = peer.table
                ways = t.bucket(words[:, 0])[:, None] * t.ways + np.arange(t.ways)  # [candidates, ways]
                same = (t.key0[ways] == words[:, :1]) & (t.key1[ways] == words[:, 1:]) & (t.blocks[ways] == blocks[:, None])
                for i, way in zip(*np.nonzero(same)):
                    b, slot = int(blocks[i]), int(ways[i, way])
                    if best is not None and b <= best.blocks:
                        continue
                    seq = int(t.seq[slot])
                    runs = [(int(a), int(n)) for a, n in t.runs[slot, :int(t.nruns[slot])]]
                    if (seq & 1 or int(t.seq[slot]) != seq or t.key0[slot] != words[i, 0]
                            or sum(n for _, n in runs) * peer.page < b * self.block):
                        continue  # being rewritten: read as missing
                    best = PeerHit(peer, slot, seq, b, runs)
        return best

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._listed < REFRESH_S:
            return
        self._listed = now
        try:
            names = {n.removesuffix(".table") for n in os.listdir(self.folder) if n.endswith(".table")}
        except OSError:
            return
        names.discard(self.name)
        for name in names - self._peers.keys() - self._ignored:
            try:
                self._peers[name] = self._open_peer(name)
            except (OSError, ValueError, KeyError, peer_memory.PeerMemoryError) as exc:
                log.warning("thinker prefixes: cannot read peer %s: %s", name, exc)
                self._ignored.add(name)
        for name in list(self._peers):
            peer = self._peers[name]
            if name not in names or not _alive(peer.pid):  # its engine stopped (or was killed)
                self._peers.pop(name).table.close()
                self._ignored.add(name)

    def _open_peer(self, name: str) -> _Peer:
        pool = json.loads((self.folder / f"{name}.pool.json").read_text())
        k = peer_memory.open_exported(pool["k"], self.device)
        v = peer_memory.open_exported(pool["v"], self.device)
        if (k.dtype, k.shape[0], k.shape[1], k.shape[3]) != (self.k.dtype, self.k.shape[0], self.k.shape[1],
                                                             self.k.shape[3]) or v.shape != k.shape:
            raise ValueError(f"its pool {tuple(k.shape)} {k.dtype} is not shaped like this one's {tuple(self.k.shape)}")
        table = PrefixTable(self.folder / f"{name}.table", writable=False)
        if table.block != self.block:
            table.close()
            raise ValueError(f"its blocks are {table.block} positions, this one's {self.block}")
        return _Peer(name, int(pool["pid"]), table, k, v, int(pool["page"]))

    def close(self) -> None:
        with self._lock:
            for peer in self._peers.values():
                peer.table.close()
            self._peers.clear()
            self.own.close()
            for path in self._files:
                Path(path).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
