"""The backbone's keys and values for a reference voice, kept across requests.

A request's backbone prompt starts with its voice: ``<|text_start|>``, the reference transcript,
``<|text_end|>``, one embedding per reference frame and a zero vector. That prefix depends on the
voice alone, so its keys and values are the same for every request that uses the voice; a voice
agent sends the same voice with every conversation. The engine computes them once, keeps them
here (bounded LRU, on the device: ≈ 3 MB for a 100-position prefix at the real sizes) and copies
them into a new request's cache row, so its prefill computes only the request's own two positions.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch


def voice_key(prompt_text_ids: list[int], prompt_codes) -> str:
    """What identifies a backbone prefix: the transcript's token ids and the reference codes."""
    h = hashlib.sha256()
    h.update(np.asarray(prompt_text_ids, dtype=np.int64).tobytes())
    codes = np.ascontiguousarray(np.asarray(prompt_codes, dtype=np.int64))
    h.update(str(codes.shape).encode())
    h.update(codes.tobytes())
    return h.hexdigest()


class VoicePrefixCache:
    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys, values) [layers, kv_heads, positions, head_dim], or None."""
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.capacity:
            return
        self._items[key] = (k, v)
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


def copy_prefixes(cache, first_row: int, prefixes: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy `prefixes[i]` (keys and values [layers, kv_heads, P, head_dim]) into rows first_row + i
    of `cache` (a KVCache), one copy per run of consecutive rows that share a voice (a burst of
    one voice is two copies, not two per row)."""
    i = 0
    while i < len(prefixes):
        pk, pv = prefixes[i]
        j = i + 1
        while j < len(prefixes) and prefixes[j][0] is pk:
            j += 1
        n = pk.shape[2]
        cache.k[:, first_row + i:first_row + j, :, :n].copy_(pk[:, None])
        cache.v[:, first_row + i:first_row + j, :, :n].copy_(pv[:, None])
        i = j
