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
A slot's place is set by its last key (chroma_triton/shm_slots.py: a hash table of buckets), so a
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
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..shm_slots import PeerFiles, SlotAllocator, SlotTable, key_words, ordered_stores, process_alive
from . import peer_memory
from .prefix_pages import read_runs

log = logging.getLogger(__name__)

FOLDER = "thinker-prefixes"
_MAGIC = 0x43484D5052454658  # "CHMPREFX"
MAX_RUNS = 8  # page runs a published prompt may span (a prompt in more runs is kept to its engine)
COLUMNS = {"blocks": 1, "nruns": 1, "runs": 2 * MAX_RUNS}
MAX_SLOTS = 1 << 16
REFRESH_S = 1.0  # how often a reader lists the folder for engines that started after it


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
        copy out of them has finished), and still runs: a peer killed without closing leaves its
        table as it was, and its pool is freed with its process."""
        seq = self.peer.table.seq  # None once the peer is closed (its engine stopped): not valid
        return seq is not None and int(seq[self.slot]) == self.seq and process_alive(self.peer.pid)

    def read(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's first `positions` keys and values, views of (or one concatenation from) the
        peer's pool: read them before `still_valid`."""
        return read_runs(self.peer.k, self.peer.v, self.peer.page, self.runs, positions)


class _Peer:
    __slots__ = ("name", "pid", "table", "k", "v", "page", "on_close")

    def __init__(self, name: str, pid: int, table: SlotTable, k: torch.Tensor, v: torch.Tensor, page: int, on_close):
        self.name, self.pid, self.table, self.k, self.v, self.page = name, pid, table, k, v, page
        self.on_close = on_close

    def close(self) -> None:
        """Its table is unmapped now; its pool once no copy from it can be queued
        (`PeerPrefixes.flush`, on the engine's thread)."""
        self.table.close()
        self.on_close(self)


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
        files = files or {}
        pool = {"k": peer_memory.export(k, files.get("k")), "v": peer_memory.export(v, files.get("v")),
                "page": page, "pid": os.getpid()}
        meta = self.folder / f"{self.name}.pool.json"
        tmp = meta.with_name(meta.name + ".tmp")
        tmp.write_text(json.dumps(pool))
        os.replace(tmp, meta)
        self._files = [meta, *files.values()]
        self.own = SlotTable.create(self.folder / f"{self.name}.table", _MAGIC, slots, COLUMNS, [block])
        self._files.append(self.own.path)
        self._slots: dict[int, int] = {}  # cache prompt id -> slot
        self._alloc = SlotAllocator(self.own)
        self._pending: list[tuple[int, np.ndarray, int, list, object]] = []  # (id, last key, blocks, runs, event)
        self._peers = PeerFiles(self.folder, ".table", f"{self.name}.table", self._open_peer, "thinker prefixes",
                                REFRESH_S, alive=lambda peer: process_alive(peer.pid))
        # two locks: the engine's thread publishes under `_lock` every step, and must not wait for a
        # request thread that opens a new peer's pool (CUDA IPC) under `_peers_lock` in `find`
        self._lock = threading.Lock()  # this engine's table
        self._peers_lock = threading.Lock()  # the peers, and those that stopped
        self._closed: list[_Peer] = []  # peers that stopped, their pools still mapped (flush unmaps them)
        self.unpublished = 0  # prompts kept to this engine: their bucket full, or in more than MAX_RUNS runs

    @classmethod
    def open(cls, folder: Path, name: str, k: torch.Tensor, v: torch.Tensor, page: int, block: int,
             files: dict[str, Path] | None = None) -> "PeerPrefixes | None":
        """Like the constructor, but where sharing cannot work it is logged and the engine keeps
        its prompts to itself (None)."""
        why = None
        if not ordered_stores():
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
                self._alloc.free(slot)

    def flush(self) -> None:
        """Publish the stored prompts whose pages the device has finished writing, and unmap the
        pools of peers that stopped (on the engine's thread, between its copies)."""
        if self._closed:
            with self._peers_lock:
                self._unmap_closed()
        with self._lock:
            waiting = []
            for pid, last, blocks, runs, event in self._pending:
                if event is not None and not event.query():
                    waiting.append((pid, last, blocks, runs, event))
                    continue
                slot = self._alloc.take(last)
                if slot is None:  # its bucket is full
                    self.unpublished += 1
                    continue
                self.own.write(slot, last, blocks=blocks, nruns=len(runs), runs=[n for run in runs for n in run])
                self._slots[pid] = slot
            self._pending = waiting

    def waiting(self) -> bool:
        """Whether stored prompts wait for the device before they are published."""
        return bool(self._pending)

    def peer_count(self) -> int:
        return len(self._peers.opened)

    # -- the readers ----------------------------------------------------------------------------
    def find(self, keys: list[bytes], limit: int, at_least: int) -> PeerHit | None:
        """The peers' longest stored prompt that is the first b blocks of a prompt with block
        keys `keys`, for at_least <= b <= limit; None if none has one."""
        limit = min(limit, len(keys))
        at_least = max(at_least, 1)
        if limit < at_least:
            return None
        words = key_words(keys[at_least - 1:limit])  # the last keys of b = at_least .. limit blocks
        best = None
        with self._peers_lock:
            for peer in self._peers.current():
                t = peer.table
                for i, slot in t.lookup(words):
                    b = at_least + i
                    if best is not None and b <= best.blocks:
                        continue
                    seq = int(t.seq[slot])
                    nruns = int(t.columns["nruns"][slot])
                    runs = [(int(a), int(n)) for a, n in t.columns["runs"][slot, :2 * nruns].reshape(-1, 2)]
                    if (seq & 1 or int(t.seq[slot]) != seq or t.key0[slot] != words[i, 0]
                            or int(t.columns["blocks"][slot]) != b or sum(n for _, n in runs) * peer.page < b * self.block):
                        continue  # being rewritten, or another prompt's: read as missing
                    best = PeerHit(peer, slot, seq, b, runs)
        return best

    def _open_peer(self, file: str) -> _Peer:
        name = file.removesuffix(".table")
        pool = json.loads((self.folder / f"{name}.pool.json").read_text())
        table = SlotTable(self.folder / f"{name}.table", _MAGIC, COLUMNS)
        mapped = []
        try:
            if table.params[0] != self.block:
                raise ValueError(f"its blocks are {table.params[0]} positions, this one's {self.block}")
            for part in ("k", "v"):
                mapped.append(peer_memory.open_exported(pool[part], self.device))
            k, v = mapped
            if (k.dtype, k.shape[0], k.shape[1], k.shape[3]) != (self.k.dtype, self.k.shape[0], self.k.shape[1],
                                                                 self.k.shape[3]) or v.shape != k.shape:
                raise ValueError(f"its pool {tuple(k.shape)} {k.dtype} is not shaped like this one's {tuple(self.k.shape)}")
        except BaseException:
            table.close()
            for t in mapped:  # nothing of it was used yet
                peer_memory.close_opened(t)
            raise
        return _Peer(name, int(pool["pid"]), table, k, v, int(pool["page"]), self._closed.append)

    def _unmap_closed(self) -> None:
        """Unmap the pools of the peers that stopped (under `_peers_lock`, on the engine's thread or
        at its end: no copy from them is queued once the device has caught up)."""
        if not self._closed:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for peer in self._closed:
            for t in (peer.k, peer.v):
                try:
                    peer_memory.close_opened(t)
                except peer_memory.PeerMemoryError as exc:  # the mapping stays until this process exits
                    log.warning("thinker prefixes: could not unmap the pool of %s: %s", peer.name, exc)
        self._closed.clear()

    def close(self) -> None:
        """Unpublish every prompt (a reader copying one now throws its copy away: its pages are
        about to be freed with this process), then remove this engine's files."""
        with self._lock:
            for slot in self._slots.values():
                self._alloc.free(slot)
            self._slots.clear()
            self._pending.clear()
            self.own.close()
        with self._peers_lock:
            self._peers.close()
            self._unmap_closed()
        with self._lock:
            for path in self._files:
                Path(path).unlink(missing_ok=True)
