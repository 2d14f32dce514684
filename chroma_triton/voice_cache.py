"""Reference-voice cache: Mimi codes of a prompt clip, keyed by a hash of its content (bounded LRU),
so a voice that comes back is not re-encoded."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Callable

import numpy as np


def bytes_key(data: bytes) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


class VoiceCache:
    def __init__(self, capacity: int = 256):
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_encode(self, key: str, encode: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            codes = self._items.get(key)
            if codes is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return codes
            self.misses += 1
        codes = encode()  # outside the lock: encoding is slow, a duplicate encode is harmless
        codes.setflags(write=False)
        with self._lock:
            if self.capacity:
                self._items[key] = codes
                self._items.move_to_end(key)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        return codes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
