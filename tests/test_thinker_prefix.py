"""The thinker prefix cache (engine/thinker_prefix.py): block keys, the store, and the engine
prefilling only what follows a stored prompt, on the tiny checkpoint (CPU)."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch

from chroma_triton.engine import ChromaEngine, EngineOptions
from chroma_triton.engine import thinker_prefix
from chroma_triton.engine.thinker_prefix import BLOCK, IDLE_S_DEFAULT, ThinkerPrefixCache, prompt_block_keys
from chroma_triton.engine import GenerationRequest, SamplingParams
from chroma_triton.pipeline import ChromaPipeline
from test_engine import collect, history_request, make_engine

AUDIO = 99


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    """The tiny checkpoint on the CPU; the tests make their own engines over its parts."""
    p = ChromaPipeline.from_pretrained(tiny_checkpoint, options=EngineOptions(max_batch=8))
    yield p
    p.close()


def _prompt(n: int, audio_at=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n,), generator=g).tolist()
    for i in audio_at:
        ids[i] = AUDIO
    return ids, torch.randn(len(audio_at), 8, generator=g)


def test_block_keys_cover_everything_up_to_each_block_end():
    ids, audio = _prompt(200, audio_at=range(70, 80))
    keys = prompt_block_keys(ids, audio, AUDIO)
    assert len(keys) == 200 // BLOCK == 3 and len(set(keys)) == 3
    # a longer prompt that starts the same way (a conversation's next turn) shares the keys
    longer = prompt_block_keys(ids + [1, 2, 3] * 40, torch.cat([audio, torch.zeros(0, 8)]), AUDIO)
    assert longer[:3] == keys and len(longer) == 5
    # another token in block 1: blocks 0 stays, 1 and later change
    other = list(ids)
    other[100] = (other[100] + 1) % 50
    changed = prompt_block_keys(other, audio, AUDIO)
    assert changed[0] == keys[0] and changed[1] != keys[1] and changed[2] != keys[2]
    # the same ids with other audio embeddings (another clip of as many tokens) in block 1
    moved = audio.clone()
    moved[3, 5] += 1e-3
    keyed = prompt_block_keys(ids, moved, AUDIO)
    assert keyed[0] == keys[0] and keyed[1] != keys[1]
    # bf16 embeddings (as served on GPUs) hash too, as their own bytes: numpy has no bfloat16.
    # Blocks with audio differ from float32 rows of the same values; block 0 (no audio: a system
    # prompt) is shared whatever the audio's dtype
    rounded = audio.bfloat16()
    as_bf16, as_fp32 = prompt_block_keys(ids, rounded, AUDIO), prompt_block_keys(ids, rounded.float(), AUDIO)
    assert as_bf16[0] == as_fp32[0] == keys[0] and as_bf16[1] != as_fp32[1]
    nudged = rounded.clone()
    nudged.view(torch.int16)[9, 7] += 1  # the next bf16 value
    assert prompt_block_keys(ids, nudged, AUDIO)[1] != as_bf16[1]
    assert prompt_block_keys(ids[:63], None, AUDIO) == []


def test_block_keys_hashed_on_threads_are_the_serial_ones(monkeypatch):
    """A long prompt's blocks are hashed on a few threads: the same keys as one by one."""
    from chroma_triton.engine import thinker_prefix

    ids, audio = _prompt(700, audio_at=range(10, 650))
    monkeypatch.setattr(thinker_prefix, "_PARALLEL_BYTES", 1 << 40)
    serial = prompt_block_keys(ids, audio, AUDIO)
    monkeypatch.setattr(thinker_prefix, "_PARALLEL_BYTES", 0)
    assert prompt_block_keys(ids, audio, AUDIO) == serial and len(serial) == 700 // BLOCK


def shared_blocks(req, stored) -> int:
    """Whole blocks of `req`'s prompt that start one of `stored`'s too, leaving one position."""
    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    best = max(common(req.thinker_ids, s.thinker_ids) for s in stored)
    return min(best // BLOCK, (len(req.thinker_ids) - 1) // BLOCK)


def _kv(positions: int, fill: float):
    shape = (2, 1, positions, 4)  # layers, kv heads, positions, head dim
    return torch.full(shape, fill), torch.full(shape, -fill)


PER_BLOCK = 2 * 2 * 1 * BLOCK * 4 * 4  # the bytes of one block of `_kv`'s k and v (float32)


def test_the_store_finds_the_longest_stored_prefix_and_stays_in_its_bytes():
    a_ids, a_audio = _prompt(5 * BLOCK + 10, audio_at=range(3, 9), seed=1)
    a = prompt_block_keys(a_ids, a_audio, AUDIO)
    cache = ThinkerPrefixCache(max_bytes=12 * PER_BLOCK, min_tokens=2 * BLOCK)
    assert cache.match(a, len(a_ids)) is None
    cache.put(a[:4], *_kv(4 * BLOCK, 1.0))  # a prompt of 4 whole blocks (another turn of the same start)
    assert cache.covers(a[:4]) and not cache.covers(a)
    m = cache.match(a, len(a_ids))
    assert m.length == 4 * BLOCK and m.k.shape[2] == 4 * BLOCK and float(m.k[0, 0, 0, 0]) == 1.0
    assert cache.matched_length(a, len(a_ids)) == 4 * BLOCK  # what planning asks (no use counted)
    # a prompt that shares only the first 2 blocks finds those (a shared system prompt)
    b_ids = a_ids[:2 * BLOCK] + [7] * (3 * BLOCK)
    b = prompt_block_keys(b_ids, a_audio, AUDIO)
    assert cache.match(b, len(b_ids)).length == 2 * BLOCK
    # ...but not below min_tokens, and never the whole prompt (its last state is computed)
    c_ids = a_ids[:BLOCK] + [7] * (3 * BLOCK)
    assert cache.match(prompt_block_keys(c_ids, a_audio, AUDIO), len(c_ids)) is None
    assert cache.match(a[:4], 4 * BLOCK).length == 3 * BLOCK
    # bounded by bytes: least recently used prompts go first; one larger than the bound is not kept
    cache.put(b, *_kv(5 * BLOCK, 2.0))
    assert cache.nbytes == 9 * PER_BLOCK and len(cache) == 2
    assert cache.match(b, len(b_ids) + 1).length == 5 * BLOCK
    d_ids, d_audio = _prompt(4 * BLOCK, seed=3)
    d = prompt_block_keys(d_ids, d_audio, AUDIO)
    cache.match(a, len(a_ids))  # a used last: b is the least recently used
    cache.put(d, *_kv(4 * BLOCK, 3.0))
    assert len(cache) == 2 and cache.nbytes == 8 * PER_BLOCK and cache.covers(d)
    assert cache.match(a, len(a_ids)).length == 4 * BLOCK
    # b went; the two blocks it shared with a are found in a again
    found = cache.match(b, len(b_ids) + 1)
    assert found.length == 2 * BLOCK and float(found.k[0, 0, 0, 0]) == 1.0
    big = prompt_block_keys(*_prompt(13 * BLOCK, seed=4), AUDIO)
    assert not cache.make_room(big, 13 * PER_BLOCK)  # too large: not stored, nothing evicted
    cache.put(big, *_kv(13 * BLOCK, 4.0))
    assert len(cache) == 2 and cache.nbytes == 8 * PER_BLOCK
    # storing a prompt that contains a stored one whole (its conversation's next turn) drops that one
    a_next = prompt_block_keys(a_ids + [5] * (2 * BLOCK), a_audio, AUDIO)
    assert a_next[:5] == a and cache.make_room(a_next, 7 * PER_BLOCK)
    assert len(cache) == 1 and cache.nbytes == 4 * PER_BLOCK and cache.covers(d)  # a dropped; d fits beside it
    cache.put(a_next, *_kv(7 * BLOCK, 5.0))
    assert cache.match(a, len(a_ids)).length == 5 * BLOCK and cache.nbytes == 11 * PER_BLOCK
    assert cache.make_room(b, 5 * PER_BLOCK) and not cache.covers(d)  # d, the newest newcomer, makes room
    with pytest.raises(ValueError):
        ThinkerPrefixCache(-1)


def test_prompts_live_in_one_pool_of_whole_pages_and_read_back_as_views():
    """The bound is taken at once as pages of BLOCK positions (`reserve`; the engine does so on a
    GPU at load), rounded down to whole pages; a prompt is copied in from a row's view and its
    match reads the pool in place; keys of another shape are refused, not stored."""
    cache = ThinkerPrefixCache(max_bytes=10 * PER_BLOCK + PER_BLOCK // 2, min_tokens=BLOCK)
    cache.reserve(2, 1, 4, torch.float32, "cpu")
    assert cache.max_bytes == 10 * PER_BLOCK and cache._pool.nbytes() == cache.max_bytes
    rows = torch.randn(2, 3, 1, 6 * BLOCK, 4), torch.randn(2, 3, 1, 6 * BLOCK, 4)  # [layers, rows, heads, positions, dim]
    ids, audio = _prompt(5 * BLOCK + 3, seed=5)
    keys = prompt_block_keys(ids, audio, AUDIO)
    cache.put(keys, rows[0][:, 1, :, :5 * BLOCK], rows[1][:, 1, :, :5 * BLOCK])
    rows[0].zero_()  # the row is reused: the cache has its own copy
    m = cache.match(keys, len(ids))
    assert m.length == 5 * BLOCK and m.k.shape == (2, 1, 5 * BLOCK, 4)
    assert m.k.data_ptr() == cache._pool.k.data_ptr()  # the pool itself, no copy
    assert torch.equal(m.v, rows[1][:, 1, :, :5 * BLOCK]) and float(m.k.abs().sum()) > 0
    with pytest.raises(ValueError, match="do not fit"):
        cache.put(prompt_block_keys(*_prompt(2 * BLOCK, seed=6), AUDIO), torch.zeros(2, 2, 2 * BLOCK, 4),
                  torch.zeros(2, 2, 2 * BLOCK, 4))
    assert len(cache) == 1 and cache.nbytes == 5 * PER_BLOCK


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _turns(cache, clock, schedule, room_blocks: int) -> list[bool]:
    """Run `schedule` ((conversation, blocks) turns, 0.1 s apart) through `cache` (None: least
    recently used eviction of whole conversations, the cache before session 25); for each turn
    whether it found its conversation's previous turn stored."""
    lru: OrderedDict = OrderedDict()  # conversation -> blocks
    last: dict = {}
    found = []
    for conversation, blocks in schedule:
        clock.now += 0.1
        keys = [f"conversation {conversation} block {b}".encode() for b in range(blocks)]
        if cache is None:
            found.append(conversation in lru and lru[conversation] == last.get(conversation))
            lru.pop(conversation, None)
            while lru and sum(lru.values()) + blocks > room_blocks:
                lru.popitem(last=False)
            lru[conversation] = blocks
        else:
            m = cache.match(keys, blocks * BLOCK + 1)
            found.append(m is not None and m.length == last.get(conversation, -1) * BLOCK)
            if cache.make_room(keys, blocks * PER_BLOCK):
                cache.put(keys, *_kv(blocks * BLOCK, 1.0))
            assert cache.nbytes <= room_blocks * PER_BLOCK
        last[conversation] = blocks
    return found


def _hit_rate(schedule, room_blocks: int, counted: slice) -> tuple[float, float]:
    """(this cache's, least recently used eviction's) share of hits among the turns `counted`."""
    clock = _Clock()
    ours = _turns(ThinkerPrefixCache(room_blocks * PER_BLOCK, clock=clock), clock, schedule, room_blocks)[counted]
    lru = _turns(None, _Clock(), schedule, room_blocks)[counted]
    return sum(ours) / len(ours), sum(lru) / len(lru)


def test_conversations_beyond_the_cache_keep_the_hits_of_those_it_holds():
    """30 conversations take turns in the same order, each turn two blocks longer than the last
    (room for 280 blocks; from round 6 on each prompt has 16-22, so it holds 12-17 of them). Least
    recently used eviction drops the prompt whose next turn is due soonest: once the cache is full
    no turn finds its last one. Newest newcomers first, the conversations held keep their hits,
    near the 42-58 % that fit; with fewer conversations than the room, every one hits."""
    def rounds(conversations: int):
        return [(c, 4 + 2 * r) for r in range(10) for c in range(conversations)]

    assert _hit_rate(rounds(12), 280, slice(12, None)) == (1.0, 1.0)
    ours, lru = _hit_rate(rounds(30), 280, slice(6 * 30, None))
    assert ours >= 0.35 and lru == 0.0, (ours, lru)


def test_conversations_that_ended_make_room_for_new_ones():
    """20 conversations for 6 rounds, then 20 others (room for about 20): the first ones stop
    coming back and, once idle for twice the time conversations took to come back, make room.
    From the third round of the new ones on nearly every turn finds its last one, as with least
    recently used eviction. Keeping newcomers last in line without the horizon, 36 % did (the
    ended ones left only as the new ones' returning turns pushed them out)."""
    first = [(c, 4 + 2 * r) for r in range(6) for c in range(20)]
    then = [(100 + c, 4 + r) for r in range(8) for c in range(20)]
    ours, lru = _hit_rate(first + then, 20 * 14, slice(len(first) + 3 * 20, None))
    assert ours >= 0.9 and lru >= 0.9, (ours, lru)
    clock = _Clock()
    cache = ThinkerPrefixCache(280 * PER_BLOCK, clock=clock)
    _turns(cache, clock, first, 280)
    assert cache.idle_s() == pytest.approx(2 * 20 * 0.1)  # they came back every 2 s


def test_one_shot_prompts_that_fill_the_cache_leave_once_conversations_come_back(monkeypatch):
    """40 one-shot prompts fill the cache (room for 280 blocks, 7 each), then 20 conversations take
    10 rounds of turns, 2 s apart, all of which fit. Their first turns find the cache full of
    prompts younger than IDLE_S_DEFAULT and make room from each other (the newest newcomer); their
    second turns come back to dropped prompts, which teaches the horizon (2 x 2 s), so the one-shot
    prompts leave and from the fourth round on nearly every turn finds its last one. Without
    counting returns to dropped prompts (DROPPED_KEPT 0) the cache saw no return and kept the
    one-shot prompts for the 30 s default: nearly no hits in these 20 s."""
    one_shots = [(1000 + c, 7) for c in range(40)]
    conversations = [(c, 4 + r) for r in range(10) for c in range(20)]
    counted = slice(len(one_shots) + 3 * 20, None)

    def run():
        clock = _Clock()
        cache = ThinkerPrefixCache(280 * PER_BLOCK, clock=clock)
        found = _turns(cache, clock, one_shots + conversations, 280)[counted]
        return sum(found) / len(found), cache

    ours, cache = run()
    assert ours >= 0.9, ours
    assert cache.idle_s() == pytest.approx(2 * 20 * 0.1)
    assert cache.returns_dropped >= 19 and cache.returns_held >= 0.9 * 6 * 20
    assert cache.returns_held + cache.returns_dropped <= 9 * 20  # every turn after a conversation's first, at most
    monkeypatch.setattr(thinker_prefix, "DROPPED_KEPT", 0)
    without, cache = run()
    assert without <= 0.1 and cache.returns_dropped == 0, without
    assert cache.idle_s() == IDLE_S_DEFAULT  # held returns only: none yet


def test_prefix_groups_bound_padding_and_attention():
    from chroma_triton.engine.thinker_prefix import prefix_groups

    assert prefix_groups([50, 60, 70], [500, 600, 700], max_queries=1000) == [3]
    assert prefix_groups([50, 60, 400], [500, 600, 900], max_queries=1000) == [2, 1]  # 3 x 400 > 1000 padded
    assert prefix_groups([50, 60, 70], [4000, 4000, 4000], max_queries=1000, max_scores=500_000) == [2, 1]
    assert prefix_groups([5000], [6000], max_queries=1000) == [1]  # one prompt always makes a group
    assert prefix_groups([], [], 1000) == []
    with pytest.raises(ValueError):
        prefix_groups([70, 60], [700, 600], 1000)


@pytest.mark.parametrize("graphs", [False, True])
def test_a_turn_after_a_stored_one_prefills_what_the_whole_prompt_prefill_does(pipe, question_wav, ref_voice, graphs):
    """The thinker's prefill of a conversation's next turn after the previous turn's prompt was
    stored: only the positions after the stored blocks are computed (eagerly, or with
    `prefill_graphs` padded to a prefix rest graph's bucket, which the CPU runs eagerly), and the
    states, greedy tokens and every row's keys and values are those of prefilling the whole prompt."""
    pipe.engine.shutdown()
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=8, thinker_prefix_cache_mib=64,
                                                    thinker_prefix_min_tokens=BLOCK, prefill_graphs=graphs))
    earlier = [history_request(pipe, question_wav, ref_voice, turns=t) for t in (0, 1)]
    later = [history_request(pipe, question_wav, ref_voice, turns=t) for t in (1, 2)]
    for r in earlier + later:
        r.prefix_keys = prompt_block_keys(r.thinker_ids, r.audio_embeds, pipe.parts.special.audio)
    for r, nxt in zip(earlier, later):  # the property the cache relies on: a turn starts as the one before
        assert nxt.thinker_ids[:len(r.thinker_ids)] == r.thinker_ids
    thinker, cache = engine.thinker, engine.thinker_prefixes
    with torch.no_grad():
        engine._prefill_thinker(0, [(r, None) for r in earlier], {})
        engine._store_prefixes(0, [(r, None) for r in earlier])
        assert len(cache) == 1  # turn 1 holds turn 0 whole: turn 0 was dropped for it
        items = [(r, None) for r in later]
        matches = engine._prefix_matches(items)
        # the longest whole-block start shared with a stored prompt, short of the whole prompt: turn 1
        # finds all of its own earlier copy but its last position, turn 2 all of turn 1's blocks
        assert [matches[id(r)].length for r in later] == [shared_blocks(r, earlier) * BLOCK for r in later]
        assert [m.length for m in matches.values()] == [3 * BLOCK, 3 * BLOCK]
        # the admission pacer plans with the positions left to compute
        assert [engine._thinker_positions(r) for r in later] == [len(r.thinker_ids) - 3 * BLOCK for r in later]
        h, t, counts = engine._prefill_thinker(2, items, matches)
        h_whole, t_whole = thinker.prefill(4, [(torch.tensor(r.thinker_ids), r.audio_embeds) for r in later])
    assert counts["prefill_prefix_prompts"] == 2
    assert counts["prefill_prefix_graph_prompts"] == (2 if graphs else 0)
    assert counts["prefill_prefix_tokens"] == sum(m.length for m in matches.values())
    torch.testing.assert_close(h, h_whole)
    assert torch.equal(t, t_whole)
    for i, r in enumerate(later):
        n = len(r.thinker_ids)
        torch.testing.assert_close(thinker.cache.k[:, 2 + i, :, :n], thinker.cache.k[:, 4 + i, :, :n])
        torch.testing.assert_close(thinker.cache.v[:, 2 + i, :, :n], thinker.cache.v[:, 4 + i, :, :n])
    with pytest.raises(ValueError):  # a prefix must leave a position to compute
        r = later[0]
        thinker.prefill_after(0, [(torch.tensor(r.thinker_ids), r.audio_embeds)],
                              [(len(r.thinker_ids), thinker.cache.k[:, 0], thinker.cache.v[:, 0])])


def test_prefix_rest_graph_buckets_and_plans(pipe):
    """Prefix rest graphs (engine/prefix_rest_graphs.py): a bucket's rows and key length are an
    admission graph bucket's, its rest length one of REST_LENGTHS, its key length at least the
    longest start plus that rest length; plans pad least and leave what no graph holds to the end.
    The buckets captured at start are those a prefix of at least min_tokens reaches."""
    from chroma_triton.engine.prefix_rest_graphs import REST_LENGTHS

    engine = make_engine(pipe, max_batch=4, thinker_prefix_cache_mib=16, prefill_graphs=True,
                         prefill_graph_max_len=512, prefill_graph_tokens=1024)
    try:
        graphs = engine.prefix_rest_graphs
        assert graphs is not None and REST_LENGTHS[-1] == 512
        assert graphs.bucket_for(1, 50, 100) == (1, 64, 256)  # 100 + 64 positions: the 256 bucket
        assert graphs.bucket_for(3, 100, 200) is None  # 4 rows x 512 exceed 1024 positions
        assert graphs.bucket_for(2, 100, 200) == (2, 128, 512)
        assert graphs.bucket_for(1, 600, 0) is None and graphs.bucket_for(1, 60, 460) is None
        assert graphs.plan([50, 60, 300], [100, 100, 100]) == [(2, True), (1, True)]
        assert graphs.plan([50, 600], [100, 100]) == [(1, True), (1, False)]
        assert graphs.plan([], []) == []
        with pytest.raises(ValueError):
            graphs.plan([60, 50], [100, 100])
        # min_tokens 256 (the default): only the 512 bucket has room for a rest after such a prefix
        assert graphs.min_start == 256
        assert graphs.buckets() == [(rows, rest, 512) for rows in (1, 2) for rest in (64, 128, 192, 256)]
        assert graphs.capture_all() and not graphs.capture_all(stop=lambda: True)  # eager on the CPU
        assert make_engine(pipe, max_batch=4, thinker_prefix_cache_mib=16).prefix_rest_graphs is None  # no graphs
    finally:
        engine.shutdown()


def test_prefix_rests_through_graphs_and_eagerly_in_one_admission(pipe, question_wav, ref_voice):
    """An admission whose stored-prefix prompts a rest graph partly holds: those go through it (padded
    rows, rest and keys), the others eagerly after them, and every state, token and key is the
    whole prompt prefill's."""
    engine = make_engine(pipe, max_batch=8, thinker_prefix_cache_mib=64, thinker_prefix_min_tokens=BLOCK,
                         prefill_graphs=True, prefill_graph_max_len=256, prefill_graph_tokens=512)
    try:
        earlier = [history_request(pipe, question_wav, ref_voice, turns=t) for t in (0, 1)]
        later = [history_request(pipe, question_wav, ref_voice, turns=t) for t in (1, 2)]
        for r in earlier + later:
            r.prefix_keys = prompt_block_keys(r.thinker_ids, r.audio_embeds, pipe.parts.special.audio)
        with torch.no_grad():
            engine._prefill_thinker(0, [(r, None) for r in earlier], {})
            engine._store_prefixes(0, [(r, None) for r in earlier])
            items = [(r, None) for r in later]
            matches = engine._prefix_matches(items)
            rests = [len(r.thinker_ids) - matches[id(r)].length for r in later]
            fits = [engine.prefix_rest_graphs.fits(n, matches[id(r)].length) for n, r in zip(rests, later)]
            # rests of 54 and 182 positions after 192: 192 + 64 <= 256 < 192 + 192
            assert fits == [True, False], (rests, [matches[id(r)].length for r in later])
            h, t, counts = engine._prefill_thinker(2, items, matches)
            h_whole, t_whole = engine.thinker.prefill(4, [(torch.tensor(r.thinker_ids), r.audio_embeds) for r in later])
    finally:
        engine.shutdown()
    assert counts["prefill_prefix_prompts"] == 2 and counts["prefill_prefix_graph_prompts"] == 1
    torch.testing.assert_close(h, h_whole)
    assert torch.equal(t, t_whole)
    cache = engine.thinker.cache
    for i, r in enumerate(later):
        n = len(r.thinker_ids)
        torch.testing.assert_close(cache.k[:, 2 + i, :, :n], cache.k[:, 4 + i, :, :n])
        torch.testing.assert_close(cache.v[:, 2 + i, :, :n], cache.v[:, 4 + i, :, :n])


def conversation_turn(pipe, question_wav, ref_voice, conversation: int, turn: int) -> GenerationRequest:
    """Conversation `conversation`'s request after `turn` earlier exchanges: its first words name it
    (conversations part at their 15th prompt token), then the question clip and a text reply per
    exchange."""
    reply = "Sure, the weather today is sunny with a light breeze from the west."
    opening = [{"type": "text", "text": f"This is conversation {conversation}."}]
    messages = []
    for t in range(turn + 1):
        messages.append({"role": "user", "content": (opening if t == 0 else []) + [{"type": "audio", "audio": question_wav}]})
        if t < turn:
            messages.append({"role": "assistant", "content": reply})
    return pipe.prepare(messages, ref_voice[0], ref_voice[1],
                        SamplingParams(seed=10 * turn + conversation, max_tokens=8))


@pytest.mark.parametrize("graphs", [False, True])
def test_conversations_through_the_engine_stream_what_they_stream_without_the_cache(pipe, question_wav, ref_voice,
                                                                                    graphs):
    """Through the loop: a conversation turn by turn, with a second conversation's turns beside it
    in the same admissions; with the cache every later turn takes its start from it (admission
    graphs or not for the rest) and every request streams the codes it streams without the cache.
    The cache's memory is kept out of the rows' budget."""
    turns = [[conversation_turn(pipe, question_wav, ref_voice, c, t) for c in range(2)] for t in range(3)]
    codes, stats = {}, {}
    for mib in (0, 16):
        engine = make_engine(pipe, max_batch=4, thinker_prefix_cache_mib=mib, thinker_prefix_min_tokens=BLOCK,
                             prefill_graphs=graphs, prefill_graph_max_len=512, prefill_graph_tokens=1024)
        try:
            assert engine.capacity.prefix_cache_bytes == mib << 20
            out = []
            for pair in turns:  # each turn's two requests admitted together, after the turn before
                out += [collect(s) for s in [engine.submit(copy.deepcopy(r)) for r in pair]]
            stats[mib] = engine.stats()
        finally:
            engine.shutdown()
        assert all(r["finished"] is not None and r["failed"] is None for r in out)
        codes[mib] = [r["codes"] for r in out]
    assert stats[0]["prefill_prefix_prompts"] == 0
    # turns 1 and 2 of both, each from its own conversation's turn before: the two conversations
    # part at their 15th token (their first words), below min_tokens
    assert stats[16]["prefill_prefix_prompts"] == 4, stats[16]
    expect = sum(len(turns[t - 1][0].thinker_ids) // BLOCK * BLOCK for t in (1, 2)) * 2
    assert stats[16]["prefill_prefix_tokens"] == expect
    fresh = stats[16]["prefill_graph_prompts"] + stats[16]["prefill_eager_prompts"]
    assert fresh == 2 and (stats[16]["prefill_graph_prompts"] == 2) == graphs
    assert stats[16]["prefill_prefix_graph_prompts"] == (4 if graphs else 0), stats[16]
    for a, b in zip(codes[0], codes[16]):
        np.testing.assert_array_equal(a, b)


def test_a_failing_store_or_admission_loses_nothing(pipe, question_wav, ref_voice, monkeypatch):
    """The cache is optional: a copy that fails is logged and the requests go on. An admission
    that fails after the thinker's prefill (here the backbone's, once) is retried request by
    request, and its prompts are counted once."""
    engine = make_engine(pipe, max_batch=4, thinker_prefix_cache_mib=16, thinker_prefix_min_tokens=BLOCK)
    try:
        def broken_put(*args, **kwargs):
            raise torch.cuda.OutOfMemoryError("no room for a prefix")

        monkeypatch.setattr(engine.thinker_prefixes, "put", broken_put)
        first = [conversation_turn(pipe, question_wav, ref_voice, c, 0) for c in range(2)]
        out = [collect(s) for s in [engine.submit(copy.deepcopy(r)) for r in first]]
        assert all(r["failed"] is None and r["finished"] is not None for r in out)
        assert len(engine.thinker_prefixes) == 0
        monkeypatch.undo()

        calls = []
        backbone = engine._prefill_backbone_cached

        def fails_once(*args):
            calls.append(len(args[1]))
            if len(calls) == 1:
                raise RuntimeError("backbone trouble")
            return backbone(*args)

        monkeypatch.setattr(engine, "_prefill_backbone_cached", fails_once)
        before = engine.stats()
        second = [conversation_turn(pipe, question_wav, ref_voice, c, 1) for c in range(2)]
        streams = [engine.submit(copy.deepcopy(r)) for r in second]
        out = [collect(s) for s in streams]
        after = engine.stats()
    finally:
        engine.shutdown()
    assert all(r["failed"] is None and r["finished"] is not None for r in out)
    assert calls[0] in (1, 2) and calls[1:] == [1] * (len(calls) - 1)
    fresh = sum(after[k] - before[k] for k in ("prefill_graph_prompts", "prefill_eager_prompts", "prefill_prefix_prompts"))
    assert fresh == 2  # each prompt once, retried or not
