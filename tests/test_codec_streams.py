"""codec_decoder's carried streams: the SEANet decoder continued from each stream's state gives
the one-shot decoder's samples, chunks of many streams batch together (padded, ragged), and a
missing or stale state falls back to the stateless decode instead of a wrong one."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from chroma_triton.model.codec import seanet_groups
from chroma_triton.model.loading import load_parts
from chroma_triton.model.mimi_decode import MimiDecode
from chroma_triton.serving import peer_states
from chroma_triton import shm_slots
from chroma_triton.serving.codec_streams import StreamStates
from chroma_triton.serving.peer_states import PeerStates
from chroma_triton.serving.triton_codec import HOW, MAX_DECODE_BATCH, CodecChunk, CodecService, chunk_plan


@pytest.fixture(scope="module")
def codec(tiny_checkpoint):
    return load_parts(tiny_checkpoint, parts={"codec"}).codec


def _codes(codec, frames, seed):
    return np.random.default_rng(seed).integers(0, codec.codebook_size, size=(frames, codec.num_codebooks))


def _stream_chunks(codec, codes, key, context=12):
    return [CodecChunk(codes[a:e], s - a, key, s) for a, s, e in chunk_plan(len(codes), 2, 10, context)]


@torch.inference_mode()
def test_streaming_seanet_continues_to_the_one_shot_samples(codec):
    """Rows split at different places, padded on the right to a common length, each continuing
    from the state its previous piece left, give the one-shot SEANet output."""
    seanet, hop = codec._seanet, codec._seanet.upsampling
    x = torch.randn(3, codec.mimi.config.hidden_size, 37)
    whole = MimiDecode(codec.mimi).seanet(x)
    cuts = [[0, 3, 20, 37], [0, 11, 12, 37], [0, 1, 30, 37]]  # per row: piece boundaries
    state = torch.zeros(3, seanet.state_size)
    got = [[] for _ in range(3)]
    for piece in range(3):
        lengths = torch.tensor([c[piece + 1] - c[piece] for c in cuts])
        width = int(lengths.max())
        batch = torch.stack([torch.nn.functional.pad(x[i, :, c[piece]:c[piece + 1]], (0, width - int(lengths[i])),
                                                     value=7.0) for i, c in enumerate(cuts)])  # junk padding
        audio, state = seanet(batch, lengths, state)
        for i in range(3):
            got[i].append(audio[i, :, : int(lengths[i]) * hop])
    for i in range(3):
        torch.testing.assert_close(torch.cat(got[i], -1), whole[i], rtol=0, atol=1e-4)


def test_carried_streams_interleaved_in_batches_match_their_own_decode(codec):
    """Three streams whose chunks arrive mixed in batches decode to what each stream gives alone,
    and every chunk after a stream's first is carried."""
    streams = {f"s{i}": _stream_chunks(codec, _codes(codec, n, i), f"s{i}") for i, n in enumerate((57, 33, 80))}
    alone = {}
    for key, chunks in streams.items():
        service = CodecService(codec, stream_states=MAX_DECODE_BATCH)
        alone[key] = np.concatenate([service.decode_many([c])[0] for c in chunks])
        assert service.counts() == {"carried": len(chunks) - 1, "adopted": 0, "restarted": 0, "stateless": 1}

    service = CodecService(codec, stream_states=MAX_DECODE_BATCH)
    steps = [[(key, chunks[step]) for key, chunks in streams.items() if step < len(chunks)] for step in range(10)]
    batches = [steps[0][:1], steps[0][1:] + steps[1][:1], *([b] for b in steps[1][1:])] + steps[2:]
    got = {key: [] for key in streams}
    for batch in batches:  # each stream at most once per batch, in its own order
        for (key, _), audio in zip(batch, service.decode_many([c for _, c in batch])):
            got[key].append(audio)
    for key in streams:
        np.testing.assert_allclose(np.concatenate(got[key]), alone[key], rtol=0, atol=1e-4)
    total = sum(len(c) for c in streams.values())
    assert service.counts() == {"carried": total - 3, "adopted": 0, "restarted": 0, "stateless": 3}


@pytest.mark.parametrize("gpu_rows", [False, True])
def test_chunks_of_one_stream_queued_together_decode_in_one_call(codec, monkeypatch, gpu_rows):
    """A codec that fell behind gets several chunks of a stream in one batch: the first continues
    the stream's state, the next follows it in its SEANet row (the samples of the stream decoded
    one chunk at a time), a third that would make the row longer than the graphs decodes
    statelessly in the same call, and the stream carries on from the furthest one."""
    if gpu_rows:
        monkeypatch.setattr(codec, "_rows", lambda n: 1 << (n - 1).bit_length())
    chunks = _stream_chunks(codec, _codes(codec, 60, 5), "s")
    other = _stream_chunks(codec, _codes(codec, 30, 6), "o")
    service = CodecService(codec, stream_states=MAX_DECODE_BATCH)
    alone = CodecService(codec, stream_states=MAX_DECODE_BATCH)
    one_by_one = [alone.decode_many([c])[0] for c in chunks[:6]]
    for chunk in chunks[:2]:
        service.decode_many([chunk])
    service.decode_many(other[:1])
    calls = []
    decode_carried = codec.decode_carried
    monkeypatch.setattr(codec, "decode_carried", lambda *a, **k: calls.append(k) or decode_carried(*a, **k))
    # out of order, with another stream's chunk between: the codec orders a stream's chunks itself
    together = service.decode_many([chunks[3], other[1], chunks[4], chunks[2]])
    assert len(calls) == 1 and calls[0]["follows"] == [3, -1, -1, -1]  # chunk 3 after chunk 2; 4 on its own
    assert service.counts() == {"carried": 4, "adopted": 0, "restarted": 1, "stateless": 2}
    np.testing.assert_allclose(together[3], one_by_one[2], rtol=0, atol=1e-4)
    np.testing.assert_allclose(together[0], one_by_one[3], rtol=0, atol=1e-4)
    np.testing.assert_allclose(together[2], codec.decode_chunk(chunks[4].codes, chunks[4].context), rtol=0, atol=1e-4)
    # chunk 5 continues the state of chunk 4 (the furthest), decoded statelessly: the samples of the
    # stream decoded one chunk at a time, up to the transformer's context rounding
    last = service.decode_many([chunks[5]])[0]
    assert service.counts()["carried"] == 5
    np.testing.assert_allclose(last, one_by_one[5], rtol=0, atol=1e-3)
    # with rows long enough, all three queued chunks share one row: every one as decoded alone
    service = CodecService(codec, stream_states=MAX_DECODE_BATCH)
    service.max_row_frames = 40
    for chunk in chunks[:2]:
        service.decode_many([chunk])
    for got, want in zip(service.decode_many(chunks[2:5]), one_by_one[2:5]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert service.counts() == {"carried": 4, "adopted": 0, "restarted": 0, "stateless": 1}


def test_a_chunk_follows_only_the_chunk_it_continues(codec):
    """Chunks of a stream with a gap between them, or whose context is not the chunk before's
    frames, do not share a row; decode_carried refuses orders that are not chains."""
    chunks = _stream_chunks(codec, _codes(codec, 60, 8), "s")
    service = CodecService(codec, stream_states=MAX_DECODE_BATCH)
    service.decode_many(chunks[:2])
    wrong = CodecChunk(chunks[3].codes.copy(), chunks[3].context, "s", chunks[3].start_frame)
    wrong.codes[0] = (wrong.codes[0] + 1) % codec.codebook_size  # its context differs from chunk 2's frames
    assert service._plan_rows([chunks[2], wrong], [True, True])[1] == [-1, -1]
    assert service._plan_rows([chunks[2], chunks[4]], [True, True])[1] == [-1, -1]  # chunk 3 missing
    assert service._plan_rows([chunks[2], chunks[3]], [True, True])[1] == [-1, 0]
    # chunk 1 sent again beside chunk 2: chunk 2 continues the stored state (the exact one), not chunk 1
    slots, follows = service._plan_rows([chunks[1], chunks[2]], [True, True])
    assert follows == [-1, -1] and slots[0] is None and slots[1] is not None
    batch = [(c.codes, c.context, False) for c in chunks[2:5]]
    for follows in ([1, 0, -1], [-1, 0, 0], [-1, 1, -1]):
        with pytest.raises(ValueError, match="follows"):
            codec.decode_carried(batch, follows=follows)


def test_seanet_groups_split_long_rows_from_short_ones_when_it_saves_work():
    pow2 = lambda n: 1 << (n - 1).bit_length()  # noqa: E731 (a GPU's row buckets)
    carried, restart = 10 * 8, 22 * 8  # SEANet steps of a carried chunk and of one decoded with its context
    # 63 carried rows and one restart: 64 x 22 frames in one call against 64 x 10 + 1 x 22 in two
    groups = seanet_groups(np.array([carried] * 30 + [restart] + [carried] * 33), pow2, 16)
    assert [(sorted(rows), steps) for rows, steps in groups] == [(sorted(set(range(64)) - {30}), carried), ([30], restart)]
    # rows of one length, or a split that saves little, stay one call in the batch's order
    assert seanet_groups(np.array([carried] * 5), pow2, 16) == [([0, 1, 2, 3, 4], carried)]
    assert seanet_groups(np.array([carried, carried, carried, 16]), pow2, 16) == [([0, 1, 2, 3], carried)]
    # lengths round up to the bucket before they are compared
    assert seanet_groups(np.array([17, 30, 32]), pow2, 16) == [([0, 1, 2], 32)]
    assert seanet_groups(np.array([], np.int64), pow2, 16) == []


@pytest.mark.parametrize("gpu_rows", [False, True])
def test_a_batch_of_carried_and_restarted_chunks_decodes_as_each_alone(codec, monkeypatch, gpu_rows):
    """Carried chunks (their new frames only) beside restarted ones (context and new frames) go
    through the SEANet decoder in two calls, each chunk giving what it gives alone; with a GPU's
    row padding too (rows up to a power of two, padding rows picking row 0's input)."""
    if gpu_rows:
        monkeypatch.setattr(codec, "_rows", lambda n: 1 << (n - 1).bit_length())
    streams = {f"s{i}": _stream_chunks(codec, _codes(codec, 50, 20 + i), f"s{i}") for i in range(5)}
    service = CodecService(codec, stream_states=MAX_DECODE_BATCH)
    for step in range(3):
        service.decode_many([chunks[step] for chunks in streams.values()])
    for key in ("s1", "s3"):  # lost (evicted, or decoded elsewhere): their next chunks restart
        service.forget(key)
    batch = [chunks[3] for chunks in streams.values()]
    calls = []
    run_seanet = codec._run_seanet
    monkeypatch.setattr(codec, "_run_seanet", lambda *a: calls.append(a[0].shape) or run_seanet(*a))
    together = service.decode_many(batch)
    spf = codec._steps_per_frame
    assert sorted((shape[0], shape[-1] // spf) for shape in calls) == sorted(
        [(4 if gpu_rows else 3, 10), (2, 22)])  # 3 carried rows of 10 new frames, 2 restarted of 12 + 10
    assert service.counts()["restarted"] == 2
    for key, audio in zip(streams, together):
        alone = CodecService(codec, stream_states=MAX_DECODE_BATCH)
        for chunk in streams[key][:3]:
            alone.decode_many([chunk])
        if key in ("s1", "s3"):
            alone.forget(key)
        np.testing.assert_allclose(audio, alone.decode_many([streams[key][3]])[0], rtol=0, atol=1e-4)
    # every stream carries on from the state its chunk of that batch left
    after = service.decode_many([chunks[4] for chunks in streams.values()])
    assert service.counts()["carried"] == 10 + 3 + 5
    for key, audio in zip(streams, after):
        one_by_one = CodecService(codec, stream_states=MAX_DECODE_BATCH)
        expected = [one_by_one.decode_many([c])[0] for c in streams[key][:5]][-1]
        np.testing.assert_allclose(audio, expected, rtol=0, atol=1e-3)


def test_a_chunk_without_its_streams_state_decodes_statelessly(codec):
    """A chunk whose start does not follow the stream's last chunk here (one decoded elsewhere, or
    evicted) decodes like a stateless chunk, and the stream carries on from it."""
    chunks = _stream_chunks(codec, _codes(codec, 60, 7), "s")
    service = CodecService(codec, stream_states=MAX_DECODE_BATCH)
    for chunk in chunks[:3]:
        service.decode_many([chunk])
    skipped = chunks[4]  # chunk 3 went to another instance
    out = service.decode_many([skipped])
    np.testing.assert_allclose(out[0], codec.decode_chunk(skipped.codes, skipped.context), rtol=0, atol=1e-4)
    service.decode_many([chunks[5]])
    assert service.counts() == {"carried": 3, "adopted": 0, "restarted": 1, "stateless": 1}
    # without a start frame or a key, nothing is kept or looked up
    plain = service.decode_many([CodecChunk(chunks[6].codes, chunks[6].context, "s"),
                                 CodecChunk(chunks[6].codes, chunks[6].context, "", chunks[6].start_frame)])
    for audio in plain:
        np.testing.assert_allclose(audio, codec.decode_chunk(chunks[6].codes, chunks[6].context), rtol=0, atol=1e-4)
    assert service.counts()["stateless"] == 3
    with pytest.raises(ValueError, match="stream_states"):
        CodecService(codec, stream_states=8)


@pytest.mark.parametrize("gpu_rows", [False, True])
def test_chunks_without_seanet_steps_decode_beside_others(codec, monkeypatch, gpu_rows):
    """A chunk whose SEANet row has no steps (no frames at all, or a carried chunk with no new
    frames) beside a long one: as each decodes alone (a split must not give a call of 0 steps)."""
    if gpu_rows:
        monkeypatch.setattr(codec, "_rows", lambda n: 1 << (n - 1).bit_length())
    codes = _codes(codec, 20, 11)
    empty = np.zeros((0, codec.num_codebooks), np.int64)
    got = codec.decode_batch([(empty, 0), (codes, 4)])
    assert len(got[0]) == 0
    np.testing.assert_allclose(got[1], codec.decode_chunk(codes, 4), rtol=0, atol=1e-4)
    state = torch.zeros(2, codec.state_size)
    got, _ = codec.decode_carried([(codes[:6], 6, True), (codes, 4, False)], state)
    assert len(got[0]) == 0
    np.testing.assert_allclose(got[1], codec.decode_chunk(codes, 4), rtol=0, atol=1e-4)


def test_the_least_recently_used_stream_gives_its_slot_up(codec):
    slots = MAX_DECODE_BATCH
    service = CodecService(codec, stream_states=slots)
    codes = _codes(codec, 4, 3)
    first = [CodecChunk(codes[:2], 0, f"k{i}", 0) for i in range(slots + 1)]
    service.decode_many(first[:slots])
    service.decode_many([CodecChunk(codes, 2, "k0", 2)])  # k0 is used again: k1 is now the oldest
    service.decode_many(first[slots:])  # a new stream takes k1's slot
    assert len(service.streams) == slots
    out = service.decode_many([CodecChunk(codes, 2, "k1", 2), CodecChunk(codes, 2, "k2", 2)])
    assert service.counts()["restarted"] == 1 and service.counts()["carried"] == 2
    np.testing.assert_allclose(out[0], out[1], rtol=0, atol=1e-4)  # the same samples either way
    service.forget("k2")
    assert len(service.streams) == slots - 1


def test_stream_states_keep_rows_where_they_are_stored():
    states = StreamStates(3, 2, torch.device("cpu"), torch.float32)
    states.store(["a", "b"], [5, 9], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert states.slot_for("a", 5) is not None and states.slot_for("a", 4) is None and states.slot_for("c", 0) is None
    assert states.pool[states.slot_for("b", 9)].tolist() == [3.0, 4.0]
    states.store(["c", "d"], [1, 1], torch.zeros(2, 2))  # d takes a's slot: a is the oldest
    assert states.slot_for("a", 5) is None and len(states) == 3
    with pytest.raises(RuntimeError, match="slots"):
        states.store(["e", "f", "g", "h"], [1] * 4, torch.zeros(4, 2))
    assert len(states) == 3 and states.slot_for("e", 1) is None and states.slot_for("c", 1) is not None  # unchanged


def test_peer_tables_hand_a_streams_state_to_another_instance(tmp_path, monkeypatch):
    """What one instance writes, another finds, only for the frame the state ends at; a slot
    being rewritten (odd sequence number) reads as missing; the least recently written stream gives
    its slot up; a table whose instance is gone leaves the peers."""
    monkeypatch.setattr(peer_states, "REFRESH_S", 0.0)
    a = PeerStates(tmp_path, "codec_0", 2, 3)
    b = PeerStates(tmp_path, "codec_1", 2, 3)
    a.publish(["s1", "s2"], [10, 20], np.array([[1, 2, 3], [4, 5, 6]], np.float32))
    assert b.find("s1", 10).tolist() == [1, 2, 3] and b.find("s2", 20).tolist() == [4, 5, 6]
    assert b.find("s1", 11) is None and b.find("s3", 10) is None
    assert a.find("s1", 10) is None  # an instance does not read its own table
    a.publish(["s1"], [12], np.array([[7, 8, 9]], np.float32))  # the stream moved on: same slot
    assert b.find("s1", 10) is None and b.find("s1", 12).tolist() == [7, 8, 9]
    slot = int(np.flatnonzero(a.own.keys == peer_states.digest("s1"))[0])
    a.own.seq[slot] += 1  # a writer in the middle of rewriting it
    assert b.find("s1", 12) is None
    a.own.seq[slot] += 1
    a.publish(["s3"], [5], np.zeros((1, 3), np.float32))  # s2 is the least recently written
    assert b.find("s2", 20) is None and b.find("s1", 12) is not None and b.find("s3", 5) is not None
    a.close()
    assert b.find("s1", 12) is None and [p.name for p in (tmp_path / peer_states.FOLDER).iterdir()] == [b.name]
    b.close()


def test_a_table_that_does_not_fit_leaves_the_instance_unshared(tmp_path, monkeypatch):
    """No table where /dev/shm would keep less free than the table takes, nor where reserving its
    space fails; nothing half made either way."""
    real_statvfs = os.statvfs
    monkeypatch.setattr(peer_states.os, "statvfs", lambda path: os.statvfs_result(
        (*real_statvfs(path)[:4], 10, *real_statvfs(path)[5:])))  # 10 blocks available
    assert PeerStates.open(tmp_path, "codec_0", 1024, 7168) is None
    monkeypatch.setattr(peer_states.os, "statvfs", real_statvfs)

    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(peer_states.os, "posix_fallocate", no_space)
    assert PeerStates.open(tmp_path, "codec_0", 1024, 7168) is None
    assert not list((tmp_path / peer_states.FOLDER).iterdir())  # nothing half made
    monkeypatch.undo()
    table = PeerStates.open(tmp_path, "codec_0", 4, 16)
    assert table is not None
    table.close()


def test_a_stream_alternating_between_instances_continues_from_the_peers_state(codec, tmp_path):
    """Two codec instances sharing their states (two GPUs' codec_decoder), a stream's chunks
    handed to them in turn: each chunk continues from the state the other left, and the audio is
    what one instance gives alone; unshared, every chunk after the second restarts."""
    codes = _codes(codec, 75, 7)
    chunks = _stream_chunks(codec, codes, "s0")
    alone = CodecService(codec, stream_states=MAX_DECODE_BATCH)
    expected = np.concatenate([alone.decode_many([c])[0] for c in chunks])
    instances = [CodecService(codec, stream_states=MAX_DECODE_BATCH,
                              peers=PeerStates(tmp_path, f"codec_{i}", MAX_DECODE_BATCH, codec.state_size))
                 for i in range(2)]
    got = np.concatenate([instances[i % 2].decode_many([c])[0] for i, c in enumerate(chunks)])
    np.testing.assert_array_equal(got, expected)
    total = {how: sum(s.counts()[how] for s in instances) for how in HOW}
    assert total == {"carried": 0, "adopted": len(chunks) - 1, "restarted": 0, "stateless": 1}
    unshared = [CodecService(codec, stream_states=MAX_DECODE_BATCH) for _ in range(2)]
    for i, c in enumerate(chunks):
        unshared[i % 2].decode_many([c])
    assert sum(s.counts()["restarted"] for s in unshared) == len(chunks) - 1
    for s in instances:
        s.streams.peers.close()


def test_a_peers_state_that_ends_elsewhere_is_not_taken(codec, tmp_path):
    """A chunk sent again (its start before where the peer's state ends) restarts: only a state
    ending exactly at a chunk's start continues it."""
    codes = _codes(codec, 32, 8)
    chunks = _stream_chunks(codec, codes, "s0")
    a, b = (CodecService(codec, stream_states=MAX_DECODE_BATCH,
                         peers=PeerStates(tmp_path, f"codec_{i}", MAX_DECODE_BATCH, codec.state_size)) for i in range(2))
    a.decode_many(chunks[:3])
    b.decode_many([chunks[1]])
    assert b.counts() == {"carried": 0, "adopted": 0, "restarted": 1, "stateless": 0}
    b.decode_many([chunks[3]])  # a's state ends where chunk 3 starts; b's own ends at chunk 2's start
    assert b.counts()["adopted"] == 1
    for s in (a, b):
        s.streams.peers.close()


def test_adopting_a_state_gives_up_no_slot_of_the_batchs_streams(tmp_path):
    """All slots taken: a state adopted for one stream of a batch takes the slot of a stream
    outside the batch, even when a batch member's is the least recently used."""
    peer = PeerStates(tmp_path, "codec_1", 4, 2)
    peer.publish(["new"], [7], np.array([[5.0, 6.0]], np.float32))
    states = StreamStates(2, 2, torch.device("cpu"), torch.float32,
                          peers=PeerStates(tmp_path, "codec_0", 4, 2))
    states.store(["member", "other"], [3, 3], torch.zeros(2, 2))  # member: the least recently used
    assert states.adopt([("new", 7)], keep=frozenset({"member", "new"})) == 1
    assert states.slot_for("member", 3) is not None and states.slot_for("other", 3) is None
    assert states.pool[states.slot_for("new", 7)].tolist() == [5.0, 6.0]
    assert states.adopt([("absent", 1)]) == 0


def test_no_shared_table_where_stores_may_reach_other_processes_out_of_order(tmp_path, monkeypatch):
    monkeypatch.setattr(shm_slots.platform, "machine", lambda: "aarch64")
    assert PeerStates.open(tmp_path, "codec_0", 64, 16) is None
