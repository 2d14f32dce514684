"""audio_encoder instances sharing their clips' embeddings (serving/peer_clips.py): the rings, and
two encoder services on the tiny checkpoint (CPU) where the second copies what the first embedded.
The same on a real tritonserver with two instances: tests/test_triton_shared_caches.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from chroma_triton.serving import peer_clips
from chroma_triton import shm_slots
from chroma_triton.serving.peer_clips import FOLDER, PeerClips
from chroma_triton.voice_cache import bytes_key

H = 8


@pytest.fixture(autouse=True)
def _list_at_once(monkeypatch):
    monkeypatch.setattr(peer_clips, "REFRESH_S", 0.0)


def _clip(i: int, rows: int, dtype=torch.bfloat16) -> tuple[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return bytes_key(f"clip {i}".encode()), torch.randn(rows, H, generator=g).to(dtype)


def test_a_peer_finds_what_another_published_bit_for_bit(tmp_path):
    a = PeerClips(tmp_path, "enc_a", 1 << 20, H, torch.bfloat16)
    b = PeerClips(tmp_path, "enc_b", 1 << 20, H, torch.bfloat16)
    key, e = _clip(1, 97)
    assert b.find(key) is None
    a.publish(key, e)
    got = b.find(key)
    assert got.dtype == torch.bfloat16 and torch.equal(got, e) and b.peer_count() == 1
    got[0, 0] = 5.0  # the reader's own copy
    assert torch.equal(b.find(key), e)
    assert a.find(key) is None  # its own ring is not a peer
    a.close()
    assert b.find(key) is None and b.peer_count() == 0  # gone with its instance
    b.close()
    assert list((tmp_path / FOLDER).iterdir()) == []


def test_the_ring_overwrites_its_oldest_clips_and_unpublishes_them_first(tmp_path):
    row_bytes = H * 2
    a = PeerClips(tmp_path, "enc_a", 1000 * row_bytes, H, torch.bfloat16)
    b = PeerClips(tmp_path, "enc_b", 1 << 20, H, torch.bfloat16)
    clips = [_clip(i, 300) for i in range(7)]  # 300 rows each: three fit in the ring
    for key, e in clips[:3]:
        a.publish(key, e)
    assert all(torch.equal(b.find(k), e) for k, e in clips[:3])
    a.publish(*clips[3])  # past the end: wraps to 0 over clip 0
    assert b.find(clips[0][0]) is None
    assert all(torch.equal(b.find(k), e) for k, e in clips[1:4])
    a.publish(*clips[4])  # over clip 1
    a.publish(*clips[5])  # over clip 2 (the 100 rows past clip 2's end were never used)
    assert [b.find(k) is not None for k, _ in clips[:6]] == [False, False, False, True, True, True]
    a.publish(*clips[6])  # wraps again: over clip 3, the oldest
    assert [b.find(k) is not None for k, _ in clips] == [False, False, False, False, True, True, True]
    assert all(torch.equal(b.find(k), e) for k, e in clips[4:])
    table = a.own
    assert not (table.seq & 1).any() and a._alloc.used() == 3
    too_big = _clip(9, 1001)
    a.publish(*too_big)  # larger than the ring: not kept, nothing dropped
    assert b.find(too_big[0]) is None and a.unpublished == 1 and a._alloc.used() == 3
    a.close()
    b.close()


def test_a_copy_raced_by_a_rewrite_is_not_taken(tmp_path, monkeypatch):
    a = PeerClips(tmp_path, "enc_a", 1 << 20, H, torch.bfloat16)
    b = PeerClips(tmp_path, "enc_b", 1 << 20, H, torch.bfloat16)
    key, e = _clip(2, 50)
    a.publish(key, e)
    b.find(key)  # b maps a's ring
    ring = b._peers.opened[a.name]
    real = ring.data

    class Racing:  # the reader's copy of the bytes happens while the writer rewrites the slot
        def __getitem__(self, index):
            slot = int(np.flatnonzero(a.own.key0)[0])
            a.own.seq[slot] += 1  # the writer is rewriting it (odd) ...
            out = real[index]
            a.own.seq[slot] += 1  # ... and has (even, but another number)
            return out

        def __len__(self):
            return len(real)

    monkeypatch.setattr(ring, "data", Racing())
    assert b.find(key) is None
    monkeypatch.setattr(ring, "data", real)
    assert torch.equal(b.find(key), e)
    a.close()
    b.close()


def test_sharing_is_off_where_it_cannot_be_trusted_or_fit(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, "chroma_triton.serving.peer_clips"):
        monkeypatch.setattr(shm_slots.platform, "machine", lambda: "aarch64")
        assert PeerClips.open(tmp_path, "enc", 1 << 20, H, torch.bfloat16) is None
        monkeypatch.undo()
        assert PeerClips.open(tmp_path, "enc", 1 << 60, H, torch.bfloat16) is None  # more than /dev/shm holds
    assert "x86's store ordering" in caplog.text and "at least" in caplog.text
    assert not (tmp_path / FOLDER).exists() or list((tmp_path / FOLDER).iterdir()) == []
    # another model's embeddings (hidden size) are not read, with a warning, once
    odd = PeerClips(tmp_path, "odd", 1 << 20, H * 2, torch.bfloat16)
    a = PeerClips(tmp_path, "enc_a", 1 << 20, H, torch.bfloat16)
    key, e = _clip(3, 10)
    odd.publish(key, torch.zeros(10, H * 2, dtype=torch.bfloat16))
    caplog.clear()
    with caplog.at_level(logging.WARNING, "chroma_triton.serving.peer_clips"):
        assert a.find(key) is None and a.find(key) is None
    assert caplog.text.count("holds other embeddings") == 1
    a.publish(key, e.float())  # not this ring's dtype: kept to itself
    assert a.unpublished == 1
    for p in (odd, a):
        p.close()


def test_an_encoder_copies_the_clips_another_embedded(tmp_path, question_wav, ref_voice, encoder_parts):
    """Two encoder services (as one per GPU) sharing a folder: a conversation's turns alternate
    between them; each clip goes through the tower once, and every request gets the embeddings one
    service alone gives."""
    from chroma_triton.serving.triton_audio_encoder import AudioEncoderService, EncoderInput
    from test_triton_units import DEFAULT_VOICE

    dtype, hidden = encoder_parts.audio_tower.dtype, int(encoder_parts.config.thinker.text.hidden_size)
    pair = [AudioEncoderService(encoder_parts, DEFAULT_VOICE, clip_cache_mib=64,
                                peers=PeerClips(tmp_path, f"enc_{i}", 8 << 20, hidden, dtype)) for i in range(2)]
    alone = AudioEncoderService(encoder_parts, DEFAULT_VOICE, clip_cache_mib=64)
    second = ref_voice[0]
    turns = [[question_wav], [question_wav, second], [question_wav, second, question_wav]]
    for t, clips in enumerate(turns):
        got = pair[t % 2].encode_batch([EncoderInput(clips, b"", "")])[0]
        want = alone.encode_batch([EncoderInput(clips, b"", "")])[0]
        np.testing.assert_array_equal(got.audio_token_counts, want.audio_token_counts)
        np.testing.assert_array_equal(got.audio_embeds, want.audio_embeds)
    counts = [s.clip_counts() for s in pair]
    # turn 0 on the first: the question embedded; turn 1 on the second: the question shared, the
    # other clip embedded; turn 2 on the first: that clip shared, the question twice from its cache
    assert counts == [{"embedded": 1, "reused": 2, "shared": 1}, {"embedded": 1, "reused": 0, "shared": 1}], counts
    for s in pair:
        s.close()
    assert list((tmp_path / FOLDER).iterdir()) == []


@pytest.fixture(scope="module")
def encoder_parts(tiny_checkpoint):
    from chroma_triton.model.loading import load_parts

    return load_parts(tiny_checkpoint, parts={"audio_tower", "codec"})
