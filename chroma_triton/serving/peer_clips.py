"""audio_encoder's clip embeddings shared between its instances (``--dp-size`` > 1).

A client resends every earlier clip of its conversation with each turn, and each instance keeps
the embeddings of the clips it saw (``clip_cache_mib``). With one instance per GPU, Triton hands a
turn to either instance, so about half the clips a turn resends reach the instance that has not
seen them, and go through the audio tower again: at dp 2 (run 79, 512 conversations) the encoders
embedded 6,500-6,900 clips per level where dp 1 embedded 3,840 for as many requests, and each
request cost them 14-15 ms against 10 at dp 1.

Here each instance also writes the embeddings it computes to a ring of its own in host memory (a
file in the tritonserver's board folder in ``/dev/shm``, ``shared_clip_mib``), indexed by the
clip's content hash (chroma_triton/shm_slots.py), and an instance whose cache lacks a clip copies
it from a peer's ring before it decodes and embeds the clip. A ring overwrites its oldest
embeddings first, unpublishing each before its bytes are written again; a reader checks after
its copy that the slot has not changed (else it embeds the clip itself). x86 hosts only (the
tables rely on its store ordering); elsewhere, or without the room in ``/dev/shm``, a warning and
each instance keeps its clips to itself.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from pathlib import Path

import torch

from ..shm_slots import PeerFiles, SlotAllocator, SlotTable, key_words, open_shared, pid_in_name, process_alive

log = logging.getLogger(__name__)

FOLDER = "clip-embeddings"
_MAGIC = 0x43484D434C495053  # "CHMCLIPS"
COLUMNS = {"offset": 1, "rows": 1}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REFRESH_S = 1.0  # how often a reader lists the folder for instances that started after it
SLOT_BYTES = 64 << 10  # one index slot per this many bytes of ring (a clip of 3 s is ~300 KiB in bf16)


class PeerClips:
    """What one audio_encoder instance shares: its own ring (the embeddings it computes) and its
    peers' rings (looked up for the clips it lacks)."""

    def __init__(self, folder: Path, instance: str, ring_bytes: int, hidden: int, dtype: torch.dtype):
        if dtype not in DTYPES:
            raise ValueError(f"clip embeddings of {dtype} cannot be shared")
        self.folder = Path(folder) / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = f"{instance}.{os.getpid()}.ring"  # Triton names the instances of every GPU alike
        self.hidden, self.dtype = hidden, dtype
        slots = max(64, ring_bytes // SLOT_BYTES)
        self.own = SlotTable.create(self.folder / self.name, _MAGIC, slots, COLUMNS,
                                    [hidden, DTYPES.index(dtype)], data_bytes=ring_bytes)
        self._alloc = SlotAllocator(self.own)
        self._order: deque[tuple[int, int, int]] = deque()  # (offset, bytes, slot), oldest first
        self._head = 0
        self._peers = PeerFiles(self.folder, ".ring", self.name, self._open_peer, "clip embeddings", REFRESH_S,
                                alive=lambda table: process_alive(pid_in_name(table.path.name)))
        self._lock = threading.Lock()  # lookups come from the preparing threads
        self.unpublished = 0

    @classmethod
    def open(cls, folder: Path, instance: str, ring_bytes: int, hidden: int, dtype: torch.dtype) -> "PeerClips | None":
        """Like the constructor, but where the ring cannot be made or trusted it is logged and the
        instance keeps its clips to itself (None)."""
        if dtype not in DTYPES:
            peers, why = None, f"clip embeddings of {dtype} cannot be shared"
        else:
            peers, why = open_shared(Path(folder), ring_bytes, lambda: cls(folder, instance, ring_bytes, hidden, dtype),
                                     "ring")
        if peers is not None:
            return peers
        log.warning("clip embeddings are not shared between audio_encoder instances: %s; a clip that reaches "
                    "another instance than the one that embedded it is embedded again", why)
        return None

    # -- the writer ---------------------------------------------------------------------------
    def publish(self, key: str, embeds: torch.Tensor) -> None:
        """Write a clip's embeddings ([tokens, hidden] in this ring's dtype, on the host) under its
        content hash ``key``, overwriting the oldest embeddings as needed."""
        flat = embeds.detach().contiguous().view(-1).view(torch.uint8).numpy()
        n = flat.nbytes
        ring = self.own.data
        if n == 0 or n > len(ring) or embeds.dtype != self.dtype or embeds.shape[-1] != self.hidden:
            self.unpublished += 1
            return
        word = key_words([bytes.fromhex(key)])[0]
        with self._lock:
            slot = self._alloc.take(word)
            if slot is None:  # its bucket is full: nothing older is given up for it
                self.unpublished += 1
                return
            at = self._head
            if at + n > len(ring):  # wrap: what lies past the head is the oldest, and goes
                while self._order and self._order[0][0] >= at:
                    self._alloc.free(self._order.popleft()[2])
                at = 0
            while self._order and self._order[0][0] < at + n and self._order[0][0] + self._order[0][1] > at:
                self._alloc.free(self._order.popleft()[2])  # unpublished before its bytes are written again
            ring[at:at + n] = flat
            self.own.write(slot, word, offset=at, rows=embeds.shape[0])
            self._order.append((at, n, slot))
            self._head = at + n

    # -- the readers ----------------------------------------------------------------------------
    def find(self, key: str) -> torch.Tensor | None:
        """A copy of the embeddings a peer published for ``key``, or None."""
        word = key_words([bytes.fromhex(key)])
        row_bytes = self.hidden * self.dtype.itemsize
        with self._lock:  # held while reading: a peer found gone is closed under it
            for table in self._peers.current():
                for _, slot in table.lookup(word):
                    seq = int(table.seq[slot])
                    at, rows = int(table.columns["offset"][slot]), int(table.columns["rows"][slot])
                    if seq & 1 or at < 0 or rows <= 0 or at + rows * row_bytes > len(table.data):
                        continue
                    copy = table.data[at:at + rows * row_bytes].copy()
                    if int(table.seq[slot]) != seq or table.key0[slot] != word[0, 0] or table.key1[slot] != word[0, 1]:
                        continue  # rewritten during the copy
                    return torch.from_numpy(copy).view(self.dtype).view(rows, self.hidden)
        return None

    def _open_peer(self, name: str) -> SlotTable:
        table = SlotTable(self.folder / name, _MAGIC, COLUMNS)
        if table.params[:2] != [self.hidden, DTYPES.index(self.dtype)]:
            table.close()
            raise ValueError(f"it holds other embeddings (hidden size, dtype {table.params[:2]})")
        return table

    def peer_count(self) -> int:
        return len(self._peers.opened)

    def close(self) -> None:
        with self._lock:
            self._peers.close()
            self.own.close()
            (self.folder / self.name).unlink(missing_ok=True)
