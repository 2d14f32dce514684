import numpy as np

from chroma_triton.voice_cache import VoiceCache, bytes_key


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
