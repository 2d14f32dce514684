"""codec_decoder's stream states shared between its instances (``--dp-size`` > 1).

With one ``codec_decoder`` instance per GPU, Triton hands each batch of chunks to whichever
instance is free, so a stream's next chunk reaches the other instance about half the time; there
it finds no SEANet state and decodes its context frames again (a restart: 22 frames through the
SEANet decoder instead of 10). Here each instance also writes the states it keeps to a table of its
own in host memory, a file in the tritonserver's board folder (``/dev/shm``), and an instance that
has no state for a chunk looks in its peers' tables before it restarts the chunk.

A table has one writer (its instance) and any number of readers. The writer keeps its streams in
least-recently-used order, as :class:`~.codec_streams.StreamStates` does; a reader finds a stream
by scanning the table's key digests (a vector compare over the slots). Each slot has a sequence
number the writer makes odd while it rewrites the slot and even again after; a reader that sees it
odd, or changed across its copy, treats the state as missing. That relies on stores reaching other
processes in program order (x86's TSO: the H100/H200 hosts), so on other machines (Arm: Grace)
the instances keep their states to themselves; a state read torn would at worst make one chunk's
audio wrong, never crash anything. A missing state costs a restart, as before.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..shm_slots import PeerFiles, create_file, open_shared, pid_in_name, process_alive

log = logging.getLogger(__name__)

FOLDER = "codec-states"  # under the board folder of one tritonserver (cancel_board.default_dir())
_MAGIC = 0x43484D5354415445  # "CHMSTATE"
_HEADER = 4  # int64s: magic, slots, state_size, ready
REFRESH_S = 1.0  # how often a reader lists the folder for instances that started after it


def digest(key: str) -> int:
    """A stream key as a non-zero 63-bit number (0 marks an empty slot)."""
    value = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return (value >> 1) or 1


class StateTable:
    """One instance's table, mapped from its file: ``slots`` rows of ``state_size`` float32s."""

    def __init__(self, path: Path, writable: bool):
        self.path = path
        with open(path, "r+b" if writable else "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        header = np.frombuffer(self._map, np.int64, _HEADER)
        if header[0] != _MAGIC:
            raise ValueError(f"{path} is not a codec state table")
        self.slots, self.state_size = int(header[1]), int(header[2])
        offset = _HEADER * 8
        self.seq = np.frombuffer(self._map, np.int64, self.slots, offset)
        self.keys = np.frombuffer(self._map, np.int64, self.slots, offset + 8 * self.slots)
        self.frames = np.frombuffer(self._map, np.int64, self.slots, offset + 16 * self.slots)
        self.rows = np.frombuffer(self._map, np.float32, self.slots * self.state_size,
                                  offset + 24 * self.slots).reshape(self.slots, self.state_size)

    @staticmethod
    def nbytes(slots: int, state_size: int) -> int:
        return 8 * _HEADER + 24 * slots + 4 * slots * state_size

    @classmethod
    def create(cls, path: Path, slots: int, state_size: int) -> "StateTable":
        """Write an empty table to ``path`` (shm_slots.create_file: its space reserved now, seen
        whole or not at all) and map it for writing."""
        create_file(path, cls.nbytes(slots, state_size), np.array([_MAGIC, slots, state_size, 1], np.int64))
        return cls(path, writable=True)

    def find(self, key: int, frame: int) -> np.ndarray | None:
        """A copy of the state stored for digest ``key`` if it ends right before ``frame``."""
        hits = np.flatnonzero(self.keys == key)
        for slot in hits:
            before = int(self.seq[slot])
            if before & 1 or int(self.keys[slot]) != key or int(self.frames[slot]) != frame:
                continue
            row = self.rows[slot].copy()
            if int(self.seq[slot]) == before:
                return row
        return None

    def close(self) -> None:
        self.seq = self.keys = self.frames = self.rows = None
        self._map.close()


class PeerStates:
    """What one codec instance shares: its own table (written after each batch it decodes) and
    its peers' tables (read for the chunks whose state it lacks)."""

    def __init__(self, folder: Path, instance: str, slots: int, state_size: int):
        if slots <= 0:
            raise ValueError(f"shared stream state slots must be > 0, got {slots}")
        self.folder = Path(folder) / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = f"{instance}.{os.getpid()}.table"  # Triton names the instances of every GPU alike
        self.own = StateTable.create(self.folder / self.name, slots, state_size)
        self.state_size = state_size
        self._slots: OrderedDict[int, int] = OrderedDict()  # digest -> slot, least recently written first
        self._free = list(range(slots - 1, -1, -1))
        self._peers = PeerFiles(self.folder, ".table", self.name, self._open_peer, "codec stream states", REFRESH_S,
                                alive=lambda table: process_alive(pid_in_name(table.path.name)))

    @classmethod
    def open(cls, folder: Path, instance: str, slots: int, state_size: int) -> "PeerStates | None":
        """Like the constructor, but where the table cannot be made or trusted it is logged and the
        instance goes without sharing (None): on a host whose stores may reach other processes out
        of order, or when /dev/shm would keep less free than the table takes (the Python backend's
        own shared memory grows there too)."""
        peers, why = open_shared(Path(folder), StateTable.nbytes(slots, state_size),
                                 lambda: cls(folder, instance, slots, state_size), "table")
        if peers is not None:
            return peers
        log.warning("codec stream states are not shared between instances: %s; chunks that reach another "
                    "instance decode their context again", why)
        return None

    def publish(self, keys: list[str], next_frames: list[int], states: np.ndarray) -> None:
        """Write ``states[i]`` as ``keys[i]``'s state, valid for a chunk starting at ``next_frames[i]``
        (the keys distinct; ``states`` float32 ``[len(keys), state_size]``)."""
        table = self.own
        for key, frame, row in zip(keys, next_frames, states):
            d = digest(key)
            slot = self._slots.pop(d, None)
            if slot is None:
                slot = self._free.pop() if self._free else self._slots.popitem(last=False)[1]
            self._slots[d] = slot
            table.seq[slot] += 1  # odd: being rewritten
            table.keys[slot] = d
            table.frames[slot] = frame
            table.rows[slot] = row
            table.seq[slot] += 1

    def find(self, key: str, frame: int) -> np.ndarray | None:
        """The state a peer left for ``key`` that ends right before ``frame``, or None."""
        d = digest(key)
        for table in self._peers.current():
            row = table.find(d, frame)
            if row is not None:
                return row
        return None

    def _open_peer(self, name: str) -> StateTable:
        table = StateTable(self.folder / name, writable=False)
        if table.state_size != self.state_size:
            table.close()
            raise ValueError(f"its states are {table.state_size} floats, this instance's {self.state_size}")
        return table

    def close(self) -> None:
        self._peers.close()
        self.own.close()
        (self.folder / self.name).unlink(missing_ok=True)
