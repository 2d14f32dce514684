"""The thinker's keys and values of earlier prompts, kept so that a later prompt that starts the
same way prefills only the rest (`EngineOptions.thinker_prefix_cache_mib`).

A voice agent resends its whole conversation with every turn: turn n's prompt is turn n-1's
prompt, the assistant's reply and the new user turn. Its first positions' keys and values are
therefore those the previous turn computed, and so are those of a system prompt that every
conversation shares. They depend on nothing but the inputs at and before each position (causal
attention, absolute positions from 0), so the engine copies them into the new request's row and
prefills only the positions after them.

Prompts are matched in blocks of `BLOCK` positions. `prompt_block_keys` gives one key per whole
block, a digest of everything up to that block's end: the token ids and, at `<|AUDIO|>`
positions, the audio tower's embedding bytes (a clip is matched by what the thinker sees of it).
`ThinkerPrefixCache` keeps each stored prompt's whole blocks on the device, once, in pages of a
pool allocated at its bound (engine/prefix_pages.py), under every block's key, so a prompt that
shares only the first blocks of a stored one (a system prompt) finds them too. It is bounded by
bytes: a stored prompt that a newer one contains whole (the turn before it) gives way to that
one, then, among the others, those idle longest past the time conversations take to come back,
the newest newcomers, and the least recently used (`ThinkerPrefixCache`).

The reused keys and values were computed in another batch, possibly through another kernel
(an admission graph's bucket): equal to recomputing them up to the kernels' rounding.

With `reserve(peers_folder=...)` the caches of several engines (one per GPU) read each other's
stored prompts: `import_from_peers` copies a prompt this cache lacks from another engine's pool
into its own (engine/peer_prefixes.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .peer_memory import shared_cpu_tensor
from .peer_prefixes import PeerPrefixes
from .prefix_pages import PagePool, Runs

BLOCK = 64
log = logging.getLogger(__name__)


HASH_THREADS = 4  # prompt_block_keys: threads hashing a long prompt's blocks at once
_PARALLEL_BYTES = 1 << 20  # ...when its audio rows hold at least this many bytes
_HASHERS = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="prefix-hash")  # starts its threads when first used


def prompt_block_keys(ids: list[int], audio: torch.Tensor | None, audio_token_id: int) -> list[bytes]:
    """One key per whole block of the prompt `ids` (audio: the embeddings of its `<|AUDIO|>`
    positions in order, [n, H]; `audio_token_id`: the id the thinker replaces by them): key b
    covers positions 0 .. (b + 1) * BLOCK - 1, a chained digest of every block's own digest up
    to it. A block's digest covers its 64 ids and as many audio rows as it has audio ids: their
    bytes in the rows' own dtype (bf16 as served on GPUs, half the bytes of float32) and that
    dtype's name, so rows of two dtypes never share a key. The blocks of a long prompt's audio are
    hashed on `HASH_THREADS` threads (hashlib lets go of the GIL): this runs on the request's
    thread, before its admission, and a 1,000-position turn with 700 audio rows (5.7 MB) took 3-6 ms
    serially (run 66: `chroma_lm`'s execute 10.6 against 5.9 ms without the cache)."""
    tokens = np.asarray(ids, dtype=np.int64)
    is_audio = tokens == audio_token_id
    rows = None
    dtype = b""
    if audio is not None and int(is_audio.sum()):
        flat = audio.detach().reshape(int(is_audio.sum()), -1).cpu().contiguous()
        rows, dtype = flat.view(torch.uint8).numpy(), str(flat.dtype).encode()  # numpy has no bf16: bytes
    audio_before = np.concatenate([[0], np.cumsum(is_audio)])  # audio rows before each position

    def block_digest(b: int) -> bytes:
        lo, hi = b * BLOCK, (b + 1) * BLOCK
        h = hashlib.sha256(tokens[lo:hi].tobytes())
        if rows is not None and audio_before[hi] > audio_before[lo]:
            h.update(dtype)
            h.update(rows[audio_before[lo]:audio_before[hi]].data)
        return h.digest()

    blocks = range(len(tokens) // BLOCK)
    if rows is not None and rows.nbytes >= _PARALLEL_BYTES and len(blocks) > 1:
        digests = list(_HASHERS.map(block_digest, blocks))
    else:
        digests = [block_digest(b) for b in blocks]
    chain = hashlib.sha256(b"chroma thinker prefix v3")
    keys = []
    for digest in digests:
        chain.update(digest)
        keys.append(chain.digest())  # the running digest: everything up to this block's end
    return keys


MAX_SCORES = 1 << 24  # prefix_groups: query x key positions of one group (its mask: x heads per kv head x 2 bytes)


def prefix_groups(rests: list[int], totals: list[int], max_queries: int, max_scores: int = MAX_SCORES) -> list[int]:
    """Sizes of consecutive groups for prompts that start from a stored prefix (`rests`: positions
    each computes, ascending; `totals`: their whole lengths): each group is one call padded to its
    longest rest, so a group holds at most `max_queries` padded positions and `max_scores`
    padded queries x keys (its attention mask's size per head). One prompt always makes a group."""
    if any(b < a for a, b in zip(rests, rests[1:])):
        raise ValueError("prefix_groups: rests must be ascending")
    groups, start = [], 0
    for i in range(1, len(rests) + 1):
        count = i - start
        if i < len(rests):
            width, keys = rests[i], max(totals[start:i + 1])
            if (count + 1) * width <= max_queries and (count + 1) * width * keys <= max_scores:
                continue
        groups.append(count)
        start = i
    return groups


@dataclass
class PrefixMatch:
    """A stored prompt's first `length` positions: keys and values [layers, kv_heads, length,
    head_dim], views of the cache's pool (valid until the cache stores or drops again; the engine
    copies them into rows first, in stream order) or a concatenation of such views."""

    length: int
    k: torch.Tensor
    v: torch.Tensor


class _Stored:
    __slots__ = ("keys", "runs", "nbytes")

    def __init__(self, keys: list[bytes], runs: Runs, nbytes: int):
        self.keys, self.runs, self.nbytes = keys, runs, nbytes


#: `ThinkerPrefixCache`'s idle horizon before it has seen a conversation come back (seconds)
IDLE_S_DEFAULT = 30.0
IDLE_S_BOUNDS = (2.0, 600.0)
RETURNS_KEPT = 256  # the latest returns (a prompt taken whole by its conversation's next turn) the horizon is drawn from
DROPPED_KEPT = 4096  # the latest prompts dropped to make room, by last key: their conversations' returns count too


class ThinkerPrefixCache:
    """Stored prompts' keys and values on the device, at most `max_bytes` of them (0: off).

    Which prompt makes room for a new one. A server at capacity sees its conversations' turns come
    round in turn; when they need more bytes than the cache has, least recently used eviction drops
    each conversation's prompt just before its next turn would take from it, and no turn finds
    anything. So the cache tells prompts apart:

    - *returning*: prompts that a later prompt took whole (`match`: its conversation came back)
      and prompts stored as the next turn of a stored one (`make_room` drops that one);
    - *newcomers*: the rest, until a later prompt takes one whole.

    Room is made from, in this order: a prompt idle for longer than the horizon (least recently
    used returning first, then the oldest newcomer): its conversation has most likely ended; then
    the newest newcomer, so that the conversations already held keep their place and those beyond
    the cache wait; then the least recently used returning prompt. The horizon is twice the 90th
    percentile of how long the latest `RETURNS_KEPT` returning conversations took to come back
    (`IDLE_S_DEFAULT` before any did, within `IDLE_S_BOUNDS`): conversations that stop being used
    leave after about that long. A conversation whose prompt was dropped to make room (the latest
    `DROPPED_KEPT` of them) counts when it comes back too: else a cache full of prompts that never
    return (one-shot requests) would keep every conversation out for `IDLE_S_DEFAULT`, seeing no
    return to learn the horizon from. `tests/test_thinker_prefix.py` runs these patterns against
    least recently used eviction.

    `returns_held` and `returns_dropped` count the turns that came back to a stored prompt and to
    a dropped one: many of the latter mean the cache is too small for the conversations."""

    def __init__(self, max_bytes: int, min_tokens: int = BLOCK, clock=time.monotonic):
        if max_bytes < 0:
            raise ValueError("the thinker prefix cache's size must be >= 0")
        self.max_bytes = max_bytes
        self._pool: PagePool | None = None  # `reserve`, or the first `put`
        self.min_tokens = max(min_tokens, BLOCK)
        self._clock = clock
        self._prompts: dict[int, _Stored] = {}
        self._returning: OrderedDict[int, float] = OrderedDict()  # id -> last use, least recent first
        self._newcomers: OrderedDict[int, float] = OrderedDict()  # id -> stored at, oldest first
        self._index: dict[bytes, list[int]] = {}  # block key -> ids of the stored prompts that have it, newest last
        self._next_id = 0
        self._returns: deque[float] = deque(maxlen=RETURNS_KEPT)  # seconds a returning conversation was away
        self._idle_s = IDLE_S_DEFAULT
        self._room_for: tuple[bytes, bool] | None = None  # make_room's last prompt: its last key, whether it continues one
        self._dropped: OrderedDict[bytes, float] = OrderedDict()  # last key of a prompt dropped for room -> its last use
        self.nbytes = 0
        self.returns_held = 0  # turns whose conversation's previous prompt was stored (match took it whole)
        self.returns_dropped = 0  # ...had been dropped to make room (make_room found it among the dropped)
        self.peers: PeerPrefixes | None = None  # other engines' caches (reserve's peers_folder)

    def __len__(self) -> int:
        return len(self._prompts)

    def idle_s(self) -> float:
        """The horizon past which an unused prompt is taken for ended (seconds); only read here, so
        that a metrics thread may ask (the engine's thread sets it as conversations come back)."""
        return self._idle_s

    def match(self, keys: list[bytes], prompt_len: int) -> PrefixMatch | None:
        """The longest stored prefix of a prompt of `prompt_len` positions whose block keys are
        `keys`: at least `min_tokens` positions, and at least one position short of the prompt
        (its last state is computed, not stored). None if there is none. Counts as a use; a
        stored prompt taken whole (the conversation's next turn) becomes a returning one."""
        found = self._find(keys, prompt_len)
        if found is None:
            return None
        pid, blocks = found
        stored, now = self._prompts[pid], self._clock()
        if blocks == len(stored.keys):  # its conversation came back: how long it was away
            since = self._newcomers.pop(pid, None)
            since = self._returning.pop(pid) if since is None else since
            self._came_back(now - since)
            self.returns_held += 1
            self._returning[pid] = now
        elif pid in self._returning:
            self._returning[pid] = now
            self._returning.move_to_end(pid)
        return PrefixMatch(blocks * BLOCK, *self._pool.read(stored.runs, blocks * BLOCK))

    def matched_length(self, keys: list[bytes], prompt_len: int) -> int:
        """What `match` would reuse, in positions (0: nothing), without counting as a use: for
        planning an admission's cost."""
        found = self._find(keys, prompt_len)
        return 0 if found is None else found[1] * BLOCK

    def _find(self, keys: list[bytes], prompt_len: int) -> tuple[int, int] | None:
        for b in range(min(len(keys), (prompt_len - 1) // BLOCK), 0, -1):
            if b * BLOCK < self.min_tokens:
                return None
            holders = self._index.get(keys[b - 1])
            if holders:
                return holders[-1], b
        return None

    def covers(self, keys: list[bytes]) -> bool:
        """Whether every whole block of a prompt with these keys is stored already."""
        return bool(keys) and keys[-1] in self._index

    def make_room(self, keys: list[bytes], nbytes: int) -> bool:
        """Before storing a prompt of these block keys and `nbytes` (so its copy is made only
        when it will be kept, and never beside a full cache): False if it can never fit; else
        drop the stored prompts it contains whole (an earlier turn of its conversation: the new
        one answers for all of their blocks), then others in the class's order until it fits."""
        if not keys or nbytes > self.max_bytes:
            return False
        dropped_at = None
        for key in keys:  # a prompt dropped earlier that this one continues: its conversation came back anyway
            dropped_at = self._dropped.pop(key, dropped_at)  # the last found is the latest turn's
        if dropped_at is not None:
            self._came_back(self._clock() - dropped_at)
            self.returns_dropped += 1
        continues = False
        for key in keys:  # chained keys: a stored prompt whose last key is one of these is a prefix
            for pid in list(self._index.get(key, ())):
                if self._prompts[pid].keys[-1] == key:
                    self._drop(pid)
                    continues = True
        while self._prompts and self.nbytes + nbytes > self.max_bytes:
            self._drop_for_room(self._victim())
        self._room_for = (keys[-1], continues)
        return True

    def _came_back(self, away_s: float) -> None:
        self._returns.append(away_s)
        p90 = float(np.percentile(np.fromiter(self._returns, float), 90))
        self._idle_s = min(max(2.0 * p90, IDLE_S_BOUNDS[0]), IDLE_S_BOUNDS[1])

    def _drop_for_room(self, pid: int) -> None:
        """Drop a prompt that nothing newer contains, remembering its last use under its last key."""
        last_key = self._prompts[pid].keys[-1]
        self._dropped[last_key] = self._newcomers.get(pid, self._returning.get(pid))
        self._dropped.move_to_end(last_key)
        while len(self._dropped) > DROPPED_KEPT:
            self._dropped.popitem(last=False)
        self._drop(pid)

    def _victim(self) -> int:
        """The stored prompt to drop next (the class's docstring says which)."""
        now, idle_s = self._clock(), self.idle_s()
        for held in (self._returning, self._newcomers):
            if held:
                pid, used = next(iter(held.items()))
                if now - used > idle_s:
                    return pid
        if self._newcomers:
            return next(reversed(self._newcomers))
        return next(iter(self._returning))

    @property
    def reserved(self) -> bool:
        """Whether the pool is allocated."""
        return self._pool is not None

    def reserve(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                peers_folder: str | Path | None = None, name: str = "engine") -> None:
        """Allocate the pool now (the engine does when it starts on a GPU, so that its memory is
        taken at load), as many pages of BLOCK positions as the bound holds; the bound becomes
        their bytes. With `peers_folder`, share it with the caches of other engines that name the
        same folder (`name`: this one's, for its files there; on the CPU the pool is a file there)."""
        if self._pool is not None:
            raise RuntimeError("the thinker prefix cache's pool is allocated already")
        page_bytes = PagePool.page_bytes(BLOCK, layers, kv_heads, head_dim, dtype.itemsize)
        pages = self.max_bytes // page_bytes
        if pages < 1:
            raise ValueError(f"the thinker prefix cache's {self.max_bytes} bytes hold no block of {page_bytes}")
        files: dict[str, Path] = {}

        def in_file(part: str, shape: tuple, dtype_: torch.dtype) -> torch.Tensor:
            files[part] = Path(peers_folder) / f"{name}.{os.getpid()}.{part}"
            return shared_cpu_tensor(files[part], shape, dtype_)

        if peers_folder is not None and torch.device(device).type == "cpu":
            try:
                Path(peers_folder).mkdir(parents=True, exist_ok=True)
                self._pool = PagePool(pages, BLOCK, layers, kv_heads, head_dim, dtype, device, in_file)
            except OSError as exc:
                log.warning("thinker prefixes are not shared with other engines: no pool file of %.1f MiB in %s (%s)",
                            pages * page_bytes / 2**20, peers_folder, exc)
                for path in files.values():
                    path.unlink(missing_ok=True)
                files.clear()
                peers_folder = None
        if self._pool is None:
            self._pool = PagePool(pages, BLOCK, layers, kv_heads, head_dim, dtype, device)
        self.max_bytes = pages * page_bytes
        if peers_folder is not None:
            self.peers = PeerPrefixes.open(Path(peers_folder), name, self._pool.k, self._pool.v, BLOCK, BLOCK, files)
            if self.peers is None:
                for path in files.values():  # mapped already: the pool keeps its memory
                    path.unlink(missing_ok=True)

    def put(self, keys: list[bytes], k: torch.Tensor, v: torch.Tensor, returning: bool = False,
            publish: bool = True) -> int | None:
        """Store a prompt's whole blocks (k, v [layers, kv_heads, >= len(keys) * BLOCK, head_dim],
        copied into the pool's pages: a row's views will do) under each block's key, making room
        first unless `make_room` just did for these keys. A prompt that cannot fit is not stored.
        `returning`: keep it as a returning prompt (one a conversation's turn is about to take);
        `publish`: tell the peers (`import_from_peers` does once its copy is checked). Returns the
        stored prompt's id, or None."""
        if self._pool is None:
            self.reserve(k.shape[0], k.shape[1], k.shape[3], k.dtype, k.device)
        if not self._pool.fits(k):
            raise ValueError(f"keys of shape {tuple(k.shape)} ({k.dtype}, {k.device}) do not fit the thinker prefix "
                             f"cache's pool {tuple(self._pool.k.shape)} ({self._pool.k.dtype}, {self._pool.k.device})")
        nbytes = len(keys) * self._pool.page_nbytes
        made = self._room_for is not None and self._room_for[0] == keys[-1] and self.nbytes + nbytes <= self.max_bytes
        if not made and not self.make_room(keys, nbytes):
            return None
        continues = self._room_for[1] or returning
        self._room_for = None
        runs = self._pool.take(len(keys))
        assert runs is not None, "the thinker prefix cache's bytes and free pages disagree"  # room made = pages free
        try:
            self._pool.write(runs, k, v)
        except BaseException:
            self._pool.give_back(runs)
            raise
        pid = self._next_id
        self._next_id += 1
        self._prompts[pid] = _Stored(list(keys), runs, nbytes)
        (self._returning if continues else self._newcomers)[pid] = self._clock()
        self.nbytes += nbytes
        for key in keys:
            self._index.setdefault(key, []).append(pid)  # the newest holder of a shared block answers for it
        if self.peers is not None and publish:
            self.peers.stored(pid, keys, runs)
        return pid

    def peer_length(self, keys: list[bytes], prompt_len: int) -> int:
        """Positions of this prompt that another engine's cache holds beyond what this one does
        (what `import_from_peers` would bring): 0 without peers or when none holds more."""
        if self.peers is None or not keys:
            return 0
        try:  # asked on a request's thread while the engine's may store or drop: a race reads as nothing held
            have = self.matched_length(keys, prompt_len)
        except (IndexError, KeyError, RuntimeError):
            have = 0
        hit = self._peer_hit(keys, prompt_len, have)
        return 0 if hit is None else hit.blocks * BLOCK

    def _peer_hit(self, keys: list[bytes], prompt_len: int, have: int):
        """The peers' longest stored prompt that begins this one and is longer than the `have`
        positions this cache holds (and than min_tokens, and short of the whole prompt), or None."""
        return self.peers.find(keys, (prompt_len - 1) // BLOCK, max(have // BLOCK + 1, -(-self.min_tokens // BLOCK)))

    def import_from_peers(self, prompts: list[tuple[list[bytes], int]]) -> tuple[int, int, int]:
        """For each prompt (block keys, length) of which another engine's cache holds more than
        this one: copy that stored prompt into this cache (a returning prompt), so that `match`
        finds it. The copies are waited for, then checked: one whose source was dropped or
        rewritten meanwhile is dropped again. Returns (prompts imported, their positions, copies
        thrown away)."""
        if self.peers is None:
            return 0, 0, 0
        self.peers.flush()
        copied: list = []
        try:
            for keys, prompt_len in prompts:
                if not keys:
                    continue
                hit = self._peer_hit(keys, prompt_len, self.matched_length(keys, prompt_len))
                if hit is None:
                    continue
                k, v = hit.read(hit.blocks * BLOCK)
                pid = self.put(keys[:hit.blocks], k, v, returning=True, publish=False)
                if pid is not None:
                    copied.append((pid, hit))
            if not copied:
                return 0, 0, 0
            if self._pool.k.device.type == "cuda":
                torch.cuda.current_stream(self._pool.k.device).synchronize()  # the copies are done before the checks
            imported = positions = lost = 0
            while copied:
                pid, hit = copied[0]
                if pid in self._prompts:  # else a later copy of this call made room with it
                    if hit.still_valid():
                        imported += 1
                        positions += hit.blocks * BLOCK
                        stored = self._prompts[pid]
                        self.peers.stored(pid, stored.keys, stored.runs)
                    else:
                        self._drop(pid)
                        lost += 1
                copied.pop(0)
            return imported, positions, lost
        finally:  # something failed before every copy was checked: none of those may be matched
            for pid, _ in copied:
                if pid in self._prompts:
                    self._drop(pid)

    def close(self) -> None:
        """Stop sharing (this cache's files in the peers' folder are removed)."""
        if self.peers is not None:
            self.peers.close()
            self.peers = None

    def _drop(self, pid: int) -> None:
        if self.peers is not None:  # unpublished before its pages can be written again
            self.peers.dropped(pid)
        stored = self._prompts.pop(pid)
        self._returning.pop(pid, None)
        self._newcomers.pop(pid, None)
        self._pool.give_back(stored.runs)
        self.nbytes -= stored.nbytes
        for key in stored.keys:
            holders = self._index[key]
            holders.remove(pid)
            if not holders:
                del self._index[key]
