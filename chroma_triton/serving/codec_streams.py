"""codec_decoder's memory of its streams: the SEANet state each stream's last chunk left.

A chunk whose stream (``stream_key``) was last decoded here up to exactly its ``start_frame``
continues from that state and decodes only its new frames (:meth:`Codec.decode_carried`); so does
a chunk queued in the same batch right after its stream's previous chunk, from the state that one
leaves (``CodecService._plan_rows``). Every other chunk (a stream's first, one after a chunk decoded
by another instance whose state that instance did not share, one whose state was evicted) decodes
statelessly over its context, as before, and leaves a state for the next. So a missing or stale
state costs work, never correctness. With :class:`~.peer_states.PeerStates` the instances of one
server share their states: each writes what it stores to host memory too, and a stream whose
state another instance left is adopted (:meth:`StreamStates.adopt`) instead of restarted.

The states live in one device tensor of ``slots`` rows; streams are never told to end (a reply
simply stops), so the least recently used stream gives its slot up when all are taken.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from ..model.codec import upload
from .peer_states import PeerStates


class StreamStates:
    def __init__(self, slots: int, state_size: int, device: torch.device, dtype: torch.dtype,
                 peers: PeerStates | None = None):
        if slots <= 0:
            raise ValueError(f"stream state slots must be > 0, got {slots}")
        self.pool = torch.zeros(slots, state_size, device=device, dtype=dtype)
        self._streams: OrderedDict[str, tuple[int, int]] = OrderedDict()  # key -> (slot, next frame)
        self._free = list(range(slots - 1, -1, -1))
        self.peers = peers  # None: this instance's states are its own

    def __len__(self) -> int:
        return len(self._streams)

    def slot_for(self, key: str, start_frame: int) -> int | None:
        """The slot holding ``key``'s state if it ends right before ``start_frame``, else None."""
        entry = self._streams.get(key)
        return entry[0] if entry is not None and entry[1] == start_frame else None

    def store(self, keys: list[str], next_frames: list[int], states: torch.Tensor, share: bool = True,
              keep: frozenset[str] = frozenset()) -> None:
        """Keep ``states[i]`` as ``keys[i]``'s state, valid for a chunk starting at ``next_frames[i]``
        (the keys distinct), giving up no slot of a stream in ``keep`` while others are there; with
        peers, also write them to this instance's shared table."""
        if not keys:
            return
        storing = set(keys)
        new = sum(1 for key in storing if key not in self._streams)
        if new > len(self._free) + len(self._streams) - (len(storing) - new):
            raise RuntimeError("more streams in one batch than stream state slots")  # before any change
        slots = []
        for key, frame in zip(keys, next_frames):
            entry = self._streams.pop(key, None)
            slot = entry[0] if entry is not None else self._take_slot(storing, keep)
            self._streams[key] = (slot, frame)  # most recently used last
            slots.append(slot)
        (index,) = upload([np.array(slots)], self.pool.device)
        self.pool.index_copy_(0, index, states.to(self.pool.dtype))
        if self.peers is not None and share:
            self.peers.publish(keys, next_frames, states.float().cpu().numpy())

    def adopt(self, wanted: list[tuple[str, int]], keep: frozenset[str] = frozenset()) -> int:
        """Take over the states peers left for these (stream, start frame) pairs (streams with no
        state here that ends at that frame), giving up no slot of a stream in ``keep`` (the batch's)
        while others are there; return how many were found."""
        if self.peers is None or not wanted:
            return 0
        found = [(key, frame, row) for key, frame in wanted if (row := self.peers.find(key, frame)) is not None]
        if found:
            keys, frames, rows = zip(*found)
            states = torch.from_numpy(np.stack(rows))
            if self.pool.device.type == "cuda":  # asynchronous, from pinned memory (as upload())
                states = states.pin_memory().to(self.pool.device, non_blocking=True)
            self.store(list(keys), list(frames), states, share=False, keep=keep)  # the peer's table has it already
        return len(found)

    def gather(self, slots: list[int | None]) -> torch.Tensor:
        """The states in ``slots`` as ``[len(slots), state_size]`` (a None slot: any row; the
        codec ignores the states of chunks it does not carry)."""
        (index,) = upload([np.array([s or 0 for s in slots])], self.pool.device)
        return self.pool.index_select(0, index)

    def forget(self, key: str) -> None:
        entry = self._streams.pop(key, None)
        if entry is not None:
            self._free.append(entry[0])

    def _take_slot(self, storing: set[str], keep: frozenset[str] = frozenset()) -> int:
        if self._free:
            return self._free.pop()
        fallback = None  # the least recently used stream to keep, if only such are left
        for key in self._streams:  # least recently used first; not one being stored now
            if key in storing:
                continue
            if key not in keep:
                return self._streams.pop(key)[0]
            fallback = fallback or key
        if fallback is None:
            raise RuntimeError("more streams in one batch than stream state slots")
        return self._streams.pop(fallback)[0]
