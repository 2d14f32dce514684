"""Caches of encodings keyed by a hash of their input's content (bounded LRU): a reference voice's
Mimi codes (`VoiceCache`), so a voice that comes back is not re-encoded, and a user clip's audio
tower embeddings (`audio_encoder`'s clip cache), so a conversation's earlier turns, which a client
sends again with every turn, are not embedded again."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Callable


def bytes_key(data: bytes) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


class ContentCache:
    """At most `capacity` values (None: any number) of at most `max_bytes` bytes in all (None: no
    bound; a value's `nbytes`), least recently used out first. Values are kept as given: callers
    must not change them (numpy arrays are made read-only)."""

    def __init__(self, capacity: int | None = None, max_bytes: int | None = None):
        if (capacity is not None and capacity < 0) or (max_bytes is not None and max_bytes < 0):
            raise ValueError("capacity and max_bytes must be >= 0")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str):
        """The value of `key` (now the most recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value) -> None:
        if hasattr(value, "setflags"):
            value.setflags(write=False)
        with self._lock:
            if not self._fits(int(value.nbytes)):
                return
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= int(old.nbytes)
            self._items[key] = value
            self._bytes += int(value.nbytes)
            while (self.capacity is not None and len(self._items) > self.capacity) or (
                    self.max_bytes is not None and self._bytes > self.max_bytes):
                _, dropped = self._items.popitem(last=False)
                self._bytes -= int(dropped.nbytes)

    def get_or_encode(self, key: str, encode: Callable[[], Any]):
        value = self.get(key)
        if value is None:
            value = encode()  # outside the lock: encoding is slow, a duplicate encode is harmless
            self.put(key, value)
        return value

    def _fits(self, nbytes: int) -> bool:
        return self.capacity != 0 and (self.max_bytes is None or nbytes <= self.max_bytes)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class VoiceCache(ContentCache):
    """Reference voices' Mimi codes, at most `capacity` of them."""

    def __init__(self, capacity: int = 256):
        super().__init__(capacity=capacity)
