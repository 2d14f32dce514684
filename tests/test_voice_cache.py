import numpy as np

import pytest

from chroma_triton.voice_cache import ContentCache, VoiceCache, bytes_key


def test_lru_and_hits():
    cache = VoiceCache(capacity=2)
    calls = []

    def enc(v):
        def f():
            calls.append(v)
            return np.full((2, 8), v)
        return f

    a1 = cache.get_or_encode("a", enc(1))
    assert cache.get_or_encode("a", enc(99)) is a1 and calls == [1]
    cache.get_or_encode("b", enc(2))
    cache.get_or_encode("a", enc(1))  # a is now most recent
    cache.get_or_encode("c", enc(3))  # evicts b
    assert len(cache) == 2
    cache.get_or_encode("b", enc(2))
    assert calls == [1, 2, 3, 2]
    assert cache.hits == 2 and cache.misses == 4
    assert not a1.flags.writeable
    assert bytes_key(b"x") != bytes_key(b"y")


def test_content_cache_bounded_by_bytes():
    cache = ContentCache(max_bytes=3000)
    for key in "abc":
        cache.put(key, np.zeros(1000, np.uint8))
    assert len(cache) == 3 and cache.nbytes == 3000
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", np.zeros(1500, np.uint8))  # b and c go
    assert cache.get("b") is None and cache.get("c") is None and cache.get("a") is not None
    assert cache.nbytes == 2500 and len(cache) == 2
    cache.put("a", np.zeros(100, np.uint8))  # replacing a value counts its new size only
    assert cache.nbytes == 1600
    cache.put("huge", np.zeros(4000, np.uint8))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2
    off = ContentCache(max_bytes=0)
    off.put("x", np.zeros(1, np.uint8))
    assert len(off) == 0 and off.get("x") is None
    assert off.get_or_encode("x", lambda: np.ones(2)).sum() == 2 and len(off) == 0
    with pytest.raises(ValueError):
        ContentCache(max_bytes=-1)
