"""Thinker prefix caches of several engines reading each other's stored prompts
(engine/peer_prefixes.py, `EngineOptions.thinker_prefix_peers`), on the CPU: the pools are files,
mapped by every cache (on GPUs they are CUDA IPC exports: tests/test_gpu.py)."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from chroma_triton.engine import EngineOptions, peer_prefixes
from chroma_triton.engine.peer_prefixes import FOLDER, PeerHit, PeerPrefixes
from chroma_triton.engine.thinker_prefix import BLOCK, ThinkerPrefixCache, prompt_block_keys
from chroma_triton.pipeline import ChromaPipeline
from test_engine import collect, make_engine
from test_thinker_prefix import AUDIO, PER_BLOCK, _prompt, conversation_turn


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    """The tiny checkpoint on the CPU; the tests make their own engines over its parts."""
    p = ChromaPipeline.from_pretrained(tiny_checkpoint, options=EngineOptions(max_batch=8))
    yield p
    p.close()


@pytest.fixture(autouse=True)
def _list_at_once(monkeypatch):
    monkeypatch.setattr(peer_prefixes, "REFRESH_S", 0.0)  # caches made after a lookup are seen by the next one


def _cache(folder, name: str, blocks: int = 12) -> ThinkerPrefixCache:
    cache = ThinkerPrefixCache(max_bytes=blocks * PER_BLOCK, min_tokens=2 * BLOCK)
    cache.reserve(2, 1, 4, torch.float32, "cpu", peers_folder=folder, name=name)
    assert cache.peers is not None
    return cache


def _rows(positions: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, positions, 4, generator=g), torch.randn(2, 1, positions, 4, generator=g)


def test_a_cache_copies_the_prompt_another_holds_and_reads_it_as_its_own(tmp_path):
    a, b = _cache(tmp_path, "a"), _cache(tmp_path, "b")
    try:
        ids, audio = _prompt(6 * BLOCK + 5, audio_at=range(10, 20), seed=1)
        turn = prompt_block_keys(ids, audio, AUDIO)  # the conversation's next turn: 6 whole blocks
        k, v = _rows(4 * BLOCK, seed=2)
        a.put(turn[:4], k, v)  # the turn before, 4 blocks, held by a
        assert b.matched_length(turn, len(ids)) == 0
        assert b.peer_length(turn, len(ids)) == 4 * BLOCK  # planning: what b could bring over
        assert a.peer_length(turn, len(ids)) == 0  # a holds it itself
        assert b.import_from_peers([(turn, len(ids))]) == (1, 4 * BLOCK, 0)
        m = b.match(turn, len(ids))
        assert m.length == 4 * BLOCK and torch.equal(m.k, k) and torch.equal(m.v, v)
        assert m.k.data_ptr() == b._pool.k.data_ptr()  # b's own pool: a may drop its copy now
        assert b.returns_held == 1  # taken whole, as a conversation's next turn
        assert b.import_from_peers([(turn, len(ids))]) == (0, 0, 0)  # held now: nothing to copy
        # under min_tokens, or a prompt that shares nothing: not looked for
        short = prompt_block_keys(ids[:BLOCK + 3], audio, AUDIO)
        other_ids, other_audio = _prompt(5 * BLOCK, seed=3)
        assert b.peer_length(short, BLOCK + 3) == 0
        assert b.peer_length(prompt_block_keys(other_ids, other_audio, AUDIO), 5 * BLOCK) == 0
        # what b copied it publishes too: a third cache finds it in either
        c = _cache(tmp_path, "c")
        assert c.peers.peer_count() == 0 and c.peer_length(turn, len(ids)) == 4 * BLOCK and c.peers.peer_count() == 2
        c.close()
    finally:
        a.close()
        b.close()
    assert list((tmp_path).iterdir()) == []  # closed caches leave no files


def test_a_dropped_prompt_is_not_found_and_a_copy_raced_by_its_drop_is_thrown_away(tmp_path, monkeypatch):
    a, b = _cache(tmp_path, "a", blocks=6), _cache(tmp_path, "b")
    try:
        ids, audio = _prompt(5 * BLOCK + 1, seed=4)
        turn = prompt_block_keys(ids, audio, AUDIO)
        a.put(turn, *_rows(5 * BLOCK, seed=5))
        assert b.peer_length(turn, len(ids) + 1) == 5 * BLOCK
        other = prompt_block_keys(*_prompt(4 * BLOCK, seed=6), AUDIO)
        a.put(other, *_rows(4 * BLOCK, seed=7))  # 5 + 4 blocks > 6: the first prompt makes room
        assert not a.covers(turn) and b.peer_length(turn, len(ids) + 1) == 0

        # a copy during which the source is dropped and its pages written again
        a.put(turn, *_rows(5 * BLOCK, seed=5))  # stored again (other makes room)
        read = PeerHit.read

        def read_then_lose_the_source(hit, positions):
            views = read(hit, positions)  # views of a's pool: the copy happens after a writes them
            a.put(other, torch.full((2, 1, 4 * BLOCK, 4), 9.0), torch.full((2, 1, 4 * BLOCK, 4), 9.0))
            return views

        monkeypatch.setattr(PeerHit, "read", read_then_lose_the_source)
        assert b.import_from_peers([(turn, len(ids) + 1)]) == (0, 0, 1)
        assert b.match(turn, len(ids) + 1) is None and len(b) == 0 and b.nbytes == 0
    finally:
        a.close()
        b.close()


def test_copies_not_yet_checked_when_something_fails_are_not_kept(tmp_path, monkeypatch):
    """A failure between a copy and its check (here the check itself) leaves no copy that could
    be matched: it may hold pages the other engine rewrote during the copy."""
    a, b = _cache(tmp_path, "a"), _cache(tmp_path, "b")
    ids, audio = _prompt(5 * BLOCK + 1, seed=12)
    turn = prompt_block_keys(ids, audio, AUDIO)
    a.put(turn, *_rows(5 * BLOCK, seed=13))

    def broken(hit):
        raise RuntimeError("the check failed")

    monkeypatch.setattr(PeerHit, "still_valid", broken)
    with pytest.raises(RuntimeError):
        b.import_from_peers([(turn, len(ids) + 1)])
    assert b.match(turn, len(ids) + 1) is None and len(b) == 0 and b.nbytes == 0
    a.close()
    b.close()


def test_a_closing_engine_unpublishes_before_its_pages_go(tmp_path):
    """A reader that found a prompt of an engine that then stops (its pool freed with its
    process) finds its copy invalid; the next lookup does not find the engine at all."""
    a, b = _cache(tmp_path, "a"), _cache(tmp_path, "b")
    ids, audio = _prompt(4 * BLOCK + 1, seed=14)
    turn = prompt_block_keys(ids, audio, AUDIO)
    a.put(turn, *_rows(4 * BLOCK, seed=15))
    hit = b.peers.find(turn, 4, 1)
    assert hit is not None and hit.still_valid()
    a.close()
    assert not hit.still_valid()
    assert b.peers.find(turn, 4, 1) is None and b.peers.peer_count() == 0
    # killed, not closed: its table stays as it was, but its process is gone
    a = _cache(tmp_path, "a2")
    a.put(turn, *_rows(4 * BLOCK, seed=15))
    hit = b.peers.find(turn, 4, 1)
    assert hit is not None and hit.still_valid()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    hit.peer.pid = int(dead.stdout)
    assert not hit.still_valid()
    a.close()
    b.close()


def test_keys_spread_over_every_bucket(tmp_path):
    """The bucket of a key comes from its second word (its first is always odd)."""
    import hashlib

    from chroma_triton.shm_slots import SlotAllocator, SlotTable, key_words

    table = SlotTable.create(tmp_path / "t", 7, 1024, {"x": 1})
    alloc = SlotAllocator(table)
    taken = sum(alloc.take(key_words([hashlib.sha256(str(i).encode()).digest()])[0]) is not None for i in range(1024))
    assert taken > 0.8 * 1024  # with the first word's bucket: at most half
    used = {slot // table.ways for slot in range(table.slots) if alloc._used[slot]}
    assert len(used) == table.buckets
    table.close()


def test_peers_that_stop_or_do_not_match_are_left_alone(tmp_path, caplog):
    a, b = _cache(tmp_path, "a"), _cache(tmp_path, "b")
    ids, audio = _prompt(4 * BLOCK + 1, seed=8)
    turn = prompt_block_keys(ids, audio, AUDIO)
    a.put(turn, *_rows(4 * BLOCK, seed=9))
    assert b.peer_length(turn, len(ids)) == 4 * BLOCK
    a.close()  # its engine stopped: its files go, b forgets it
    assert b.peer_length(turn, len(ids)) == 0 and b.peers.peer_count() == 0
    # a killed engine leaves its files: its process is gone, so b does not read them
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    a = _cache(tmp_path, "a")
    a.put(turn, *_rows(4 * BLOCK, seed=9))
    meta = tmp_path / f"{a.peers.name}.pool.json"
    pool = json.loads(meta.read_text())
    meta.write_text(json.dumps({**pool, "pid": int(dead.stdout)}))
    fresh = _cache(tmp_path, "fresh")
    assert fresh.peer_length(turn, len(ids)) == 0 and fresh.peers.peer_count() == 1  # b only
    # another model's pool (another head size) is not read, with a warning, once
    odd = ThinkerPrefixCache(max_bytes=8 * PER_BLOCK)
    odd.reserve(2, 1, 8, torch.float32, "cpu", peers_folder=tmp_path, name="odd")
    with caplog.at_level(logging.WARNING, "chroma_triton.engine.peer_prefixes"):
        assert odd.peer_length(turn, len(ids)) == 0
        assert odd.peer_length(turn, len(ids)) == 0
    assert sum("not shaped like" in r.getMessage() for r in caplog.records) == 3  # a, b, fresh: each once
    for cache in (a, b, fresh, odd):
        cache.close()


def test_sharing_is_off_where_it_cannot_be_trusted(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(peer_prefixes.platform, "machine", lambda: "aarch64")
    cache = ThinkerPrefixCache(max_bytes=8 * PER_BLOCK)
    with caplog.at_level(logging.WARNING, "chroma_triton.engine.peer_prefixes"):
        cache.reserve(2, 1, 4, torch.float32, "cpu", peers_folder=tmp_path, name="arm")
    assert cache.peers is None and "x86's store ordering" in caplog.text
    assert list(tmp_path.iterdir()) == []  # its pool's files are unlinked (the pool keeps its mapping)
    ids, audio = _prompt(3 * BLOCK, seed=10)
    cache.put(prompt_block_keys(ids, audio, AUDIO), *_rows(3 * BLOCK, seed=11))  # works as unshared
    assert len(cache) == 1


def test_a_full_bucket_or_a_scattered_prompt_stays_with_its_engine(tmp_path):
    k = torch.zeros(2, 1, 64 * BLOCK, 4)
    folder = tmp_path / FOLDER
    folder.mkdir()
    from chroma_triton.engine.peer_memory import shared_cpu_tensor

    files = {part: folder / f"x.{part}" for part in ("k", "v")}
    k, v = (shared_cpu_tensor(files[p], tuple(k.shape), torch.float32) for p in ("k", "v"))
    peers = PeerPrefixes(folder, "x", k, v, BLOCK, BLOCK, files, slots=8)  # one bucket of 8
    for pid in range(9):
        peers.stored(pid, [f"prompt {pid} block {b}".encode().ljust(32, b".") for b in range(2)], [(2 * pid, 2)])
    assert peers.unpublished == 1 and peers._alloc.used() == 8
    peers.dropped(3)
    peers.stored(9, [b"prompt 9".ljust(32, b".")], [(40, 1)])
    assert peers.unpublished == 1 and peers._alloc.used() == 8
    peers.stored(10, [b"prompt 10".ljust(32, b".")], [(p, 1) for p in range(50, 50 + 2 * 9, 2)])  # 9 runs
    assert peers.unpublished == 2
    table = peers.own
    assert sorted(np.flatnonzero(table.key0).tolist()) == list(range(8)) and not (table.seq & 1).any()
    peers.close()


def test_a_turn_on_another_engine_streams_what_it_streams_on_the_conversations_own(pipe, question_wav, ref_voice,
                                                                                   tmp_path):
    """Two engines sharing a folder (as one per GPU at dp 2): a conversation's first turn on one,
    its second on the other, which copies the first turn's prompt instead of prefilling it, and
    streams the codes one engine serving both turns streams."""
    turns = [conversation_turn(pipe, question_wav, ref_voice, 0, t) for t in range(2)]
    opts = dict(max_batch=2, thinker_prefix_cache_mib=8, thinker_prefix_min_tokens=BLOCK)
    alone = make_engine(pipe, **opts)
    try:
        expect = [collect(alone.submit(copy.deepcopy(r)))["codes"] for r in turns]
        assert alone.stats()["prefill_prefix_prompts"] == 1
    finally:
        alone.shutdown()
    first = make_engine(pipe, **opts, thinker_prefix_peers=str(tmp_path))
    try:
        got = [collect(first.submit(copy.deepcopy(turns[0])))["codes"]]
        first._stop.set()  # idle from here (its cache and files stay until shutdown)
        first._pending.put(None)
        first._thread.join(10)
        second = make_engine(pipe, **opts, thinker_prefix_peers=str(tmp_path))
        try:
            out = collect(second.submit(copy.deepcopy(turns[1])))
            got.append(out["codes"])
            stats = second.stats()
        finally:
            second.shutdown()
    finally:
        first._thread = None
        first.shutdown()
    assert out["failed"] is None and out["finished"] is not None
    expected_positions = len(turns[0].thinker_ids) // BLOCK * BLOCK
    assert stats["prefix_imports"] == 1 and stats["prefix_import_tokens"] == expected_positions, stats
    assert stats["prefix_imports_lost"] == 0 and stats["thinker_prefix_peers"] == 1
    assert stats["prefill_prefix_prompts"] == 1 and stats["prefill_prefix_tokens"] == expected_positions
    for a, b in zip(expect, got):
        np.testing.assert_array_equal(a, b)
    assert list(tmp_path.iterdir()) == []
