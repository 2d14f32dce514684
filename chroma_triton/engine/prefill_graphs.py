"""Admissions through CUDA graphs (`EngineOptions.prefill_graphs`): the thinker's prompt prefill
(`PrefillGraphs`) and the backbone's two positions after a cached voice prefix (`BackboneTailGraphs`).

An eager prefill launches its kernels one by one from Python: about 45 per layer, over 1,600 for
the thinker's 36 layers, whatever the batch. In the traces of docs/benchmarks.md run 36 a
1-request prefill took 50 ms (median) and a 16-request one 64 ms, so most of it is that fixed
launch cost, and every running stream waits for it. Graphs replay a whole prefill with one launch.

Graphs need static shapes and fixed memory. So a batch of prompts is padded to a rows bucket
(1, 2, 4, ... `max_rows`) and a length bucket (64, 128, ... `max_len`), and runs into scratch
cache rows 0..; its keys and values are then copied into the engine's rows (one copy per cache
for all layers), since the rows it goes to change with every admission. Padding positions hold
zeros, as `pad_batch` pads; they write keys and values past a prompt's end, which a decode step
overwrites before any query reads them (causal mask).

Long prompts (a conversation's history: every earlier turn's audio and text) get long buckets
with fewer rows: a bucket exists while its rows x length stay within `max_tokens` (one row
always), so the scratch rows and the matrix products' activations stay those of the short
buckets (`admission_buckets`). A prompt's prefill starts at position 0, so attention is SDPA's
causal kind with no additive mask (`Trunk.forward`'s `from_start`), which would grow as
rows x length^2. The scratch is one allocation of that many positions, which each bucket sees as
rows x length (`ScratchCache`). An admission whose prompts differ in length is split by
`PrefillGraphs.plan` into groups of similar length, each one replay (prompts sorted by length,
the split that pads least, counting a replay's own cost); prompts longer than `max_len` are
prefilled eagerly, as one group, and the others still go through graphs.

Padded to a bucket, a prompt's states are computed with other matrix shapes than the eager
path's (padded to the batch's longest prompt only): equal up to the kernels' rounding, not
bitwise. The graphs share one memory pool: a prefill's outputs are read before the next prefill.
The engine's row planning keeps the scratch (capacity.admission_scratch_bytes) out of the KV
budget; the largest graph's pool comes out of `activation_reserve_gib`.
"""

from __future__ import annotations

from functools import partial

import torch

from ..model.thinker import TorchThinker
from ..model.trunk import KVCache, eager_layers
from .graphs import StepRunner, batch_buckets, bucket
from .voice_prefix import copy_prefixes

LENGTH_STEP = 64
TAIL_MAX_LEN = 512  # the backbone tails' longest bucket: a voice prefix of up to 510 positions (a long reference)
REPLAY_POSITIONS = 256  # PrefillGraphs.plan: what one more replay costs, in padded prompt positions


def prefill_length_buckets(max_len: int) -> list[int]:
    """64, 128, 256, ... doubling up to max_len (included)."""
    sizes, s = [], LENGTH_STEP
    while s < max_len:
        sizes.append(s)
        s *= 2
    return sizes + [max_len]


def admission_buckets(max_rows: int, max_len: int, max_tokens: int = 0) -> list[tuple[int, int]]:
    """Every (rows, length) bucket, shortest length first: rows from `batch_buckets(max_rows)`,
    lengths from `prefill_length_buckets(max_len)`, kept while rows x length <= `max_tokens`
    (0: no bound), one row at every length."""
    return [(rows, length) for length in prefill_length_buckets(max_len) for rows in batch_buckets(max_rows)
            if rows == 1 or not max_tokens or rows * length <= max_tokens]


def scratch_positions(buckets: list[tuple[int, int]]) -> int:
    """Positions of the scratch all `buckets` share: the largest rows x length."""
    return max(rows * length for rows, length in buckets)


def scratch_positions_up_to(max_rows: int, max_len: int, max_tokens: int = 0) -> int:
    """The most scratch positions admission graphs of up to `max_rows` rows can need: the engine
    plans memory before it knows how many rows fit, and fewer rows can need more (12 x 512 fits a
    bound of 6,200 positions where 16 rows' buckets stop at 8 x 512)."""
    return max(scratch_positions(admission_buckets(rows, max_len, max_tokens)) for rows in range(1, max_rows + 1))


def cheapest_groups(total: int, fit: int, bucket_of) -> list[tuple[int, bool]]:
    """Consecutive groups `(count, through a graph)` of `total` prompts in order, of which the first
    `fit` can go through graphs: those split where the padded positions are fewest, each further
    replay counted as `REPLAY_POSITIONS` more (`bucket_of(j, i)`: the (rows, length) bucket of
    prompts j..i-1 as one replay, or None); the others make one eager group at the end."""
    cost = [0] + [None] * fit  # cost[i]: the cheapest way to prefill prompts 0..i-1; cut[i]: its last group's start
    cut = [0] * (fit + 1)
    for i in range(1, fit + 1):
        for j in range(i):
            found = bucket_of(j, i)
            if found is None or cost[j] is None:
                continue
            c = cost[j] + found[0] * found[1] + REPLAY_POSITIONS
            if cost[i] is None or c < cost[i]:
                cost[i], cut[i] = c, j
    groups, i = [], fit
    while i > 0:
        groups.append((i - cut[i], True))
        i = cut[i]
    groups.reverse()
    return groups + ([(total - fit, False)] if fit < total else [])


class ScratchCache:
    """The admission graphs' scratch keys and values: one allocation of `positions` positions per
    layer, which a bucket of `rows` rows sees as a `KVCache` [layers, rows, kv_heads,
    positions // rows, head_dim] (a graph reads its length's first positions): one view per row
    count, so the buckets of a row count share their cache tensor, as the engine's steps do."""

    def __init__(self, cfg, positions: int, device, dtype):
        self.positions = positions
        size = positions * cfg.num_kv_heads * cfg.head_dim
        self.k = torch.zeros(cfg.num_layers, size, device=device, dtype=dtype)
        self.v = torch.zeros(cfg.num_layers, size, device=device, dtype=dtype)
        self._shape = (cfg.num_kv_heads, cfg.head_dim)
        self._views: dict[int, KVCache] = {}

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def bucket(self, rows: int, length: int) -> KVCache:
        """The cache a bucket of `rows` rows of up to `length` positions computes in."""
        if rows * length > self.positions:
            raise ValueError(f"bucket {rows} x {length} exceeds the scratch's {self.positions} positions")
        if rows not in self._views:
            heads, dim = self._shape
            shape = (self.k.shape[0], rows, heads, self.positions // rows, dim)
            size = rows * heads * shape[3] * dim
            self._views[rows] = KVCache.over(self.k[:, :size].view(shape), self.v[:, :size].view(shape))
        return self._views[rows]


class _ScratchGraphs:
    """What both kinds of admission graphs share: a batch is padded to a (rows, length) bucket
    (`admission_buckets`), computed in scratch rows 0.. of a cache of their own (`ScratchCache`) by
    the graph of that bucket (captured on first use or by `capture_all`; all
    share one memory pool, so a replay's outputs are read before the next replay), and its keys and
    values are copied into the engine's rows. Subclasses give `KIND`, `_run(*inputs, key_len)` and
    `_dummy_inputs(rows, padded)`. `compiled`: a compiled trunk's layers run compiled here too
    (else eagerly: see trunk.eager_layers); the buckets bound the shapes torch.compile meets."""

    KIND = ""

    def __init__(self, trunk, like: torch.Tensor, cache_len: int, max_rows: int, max_len: int, device: torch.device,
                 use_graphs: bool, compiled: bool = False, max_tokens: int = 0):
        """`trunk`: the trunk the scratch cache is for; `like`: a weight whose device and dtype it
        takes; `cache_len`: the engine cache's length (no bucket goes past it); `max_tokens`:
        the most positions (rows x length) of a bucket with more than one row (0: no bound)."""
        self.buckets = admission_buckets(max_rows, min(max_len, cache_len), max_tokens)
        self.lengths = sorted({length for _, length in self.buckets})
        self._rows_at = {length: [r for r, l in self.buckets if l == length] for length in self.lengths}
        self.scratch = ScratchCache(trunk.cfg, scratch_positions(self.buckets), like.device, like.dtype)
        self.runner = StepRunner(use_graphs=use_graphs and device.type == "cuda", shared_pool=True,
                                 device=device if device.type == "cuda" else None)
        self.calls = 0  # replays (one per group of an admission)
        self.compiled = compiled

    def __len__(self) -> int:
        """Graphs of this kind captured so far (the runner may hold others: prefix_rest_graphs.py)."""
        return self.runner.count(self.KIND)

    def bucket_for(self, rows: int, length: int) -> tuple[int, int] | None:
        """The smallest (rows, length) bucket that holds `rows` prompts of up to `length` positions,
        or None."""
        if not 0 < length <= self.lengths[-1]:
            return None
        padded = bucket(length, self.lengths)
        fitting = [r for r in self._rows_at[padded] if r >= rows]
        return (fitting[0], padded) if fitting else None

    def _replay(self, rows: int, padded: int, *inputs):
        """The graph of the (rows, padded) bucket on `inputs`: captured on its first call, replayed after."""
        with eager_layers(not self.compiled):  # the engine's admissions run inside eager_layers()
            return self.runner((self.KIND, rows, padded), partial(self._run, key_len=padded), *inputs)

    def _copy_into(self, cache, row_start: int, n: int, rows: int, padded: int) -> None:
        """Scratch rows 0..n-1 of bucket (rows, padded) into `cache`'s rows row_start.."""
        scratch = self.scratch.bucket(rows, padded)
        cache.k[:, row_start:row_start + n, :, :padded].copy_(scratch.k[:, :n, :, :padded])
        cache.v[:, row_start:row_start + n, :, :padded].copy_(scratch.v[:, :n, :, :padded])

    @torch.no_grad()
    def compile_all(self) -> None:
        """With `compiled`: run every (rows, length) bucket's function once, outside any graph, so
        that torch.compile compiles for them now (captures, at start or on first use, then find
        the code compiled)."""
        if not self.compiled:
            return
        with eager_layers(False):
            for rows, padded in self.buckets:
                self._run(*self._dummy_inputs(rows, padded), key_len=padded)

    @torch.no_grad()
    def capture_all(self, stop=lambda: False) -> bool:
        """Capture every (rows, length) graph now, shortest first; `stop()` ends it early. Returns
        whether all were captured."""
        for rows, padded in self.buckets:
            if stop():
                return False
            self._replay(rows, padded, *self._dummy_inputs(rows, padded))
        return True


class PrefillGraphs(_ScratchGraphs):
    KIND = "prefill"

    def __init__(self, thinker: TorchThinker, max_rows: int, max_len: int, device: torch.device,
                 use_graphs: bool = True, compiled: bool = False, max_tokens: int = 0):
        super().__init__(thinker.lm.model, thinker.lm.lm_head.weight, thinker.max_len, max_rows, max_len, device,
                         use_graphs, compiled, max_tokens)
        self.thinker = thinker

    def plan(self, lengths: list[int]) -> list[tuple[int, bool]]:
        """How to prefill prompts of `lengths` (ascending): consecutive groups `(count, through a
        graph)`. Prompts longer than every bucket make one eager group at the end; the others are
        split where that pads least, each further replay counted as `REPLAY_POSITIONS` positions
        (a short prompt beside a long one would be padded to the long one's bucket)."""
        if any(b < a for a, b in zip(lengths, lengths[1:])):
            raise ValueError("plan: lengths must be ascending")
        fit = sum(1 for n in lengths if n <= self.lengths[-1])
        return cheapest_groups(len(lengths), fit, lambda j, i: self.bucket_for(i - j, lengths[i - 1]))

    @torch.no_grad()  # not inference mode: a graph's static inputs are copied into outside it
    def prefill(self, row_start: int, prompts, max_new_tokens=None):
        """As `TorchThinker.prefill`: prompts (that one bucket holds, `bucket_for`) into cache rows row_start.., returning
        (last states [P, H], greedy next ids [P]); views into the graphs' memory, which the next
        replay overwrites."""
        self.calls += 1
        x, lengths = self.thinker.prompt_batch(prompts)
        n, length = x.shape[0], x.shape[1]
        found = self.bucket_for(n, length)
        if found is None:
            raise ValueError(f"no admission graph holds {n} prompts of {length} positions")
        rows, padded = found
        xb = x.new_zeros(rows, padded, x.shape[2])
        xb[:n, :length] = x
        lb = torch.ones(rows, dtype=lengths.dtype, device=lengths.device)
        lb[:n] = lengths
        h, t = self._replay(rows, padded, xb, lb)
        self._copy_into(self.thinker.cache, row_start, n, rows, padded)  # this prefill's keys and values
        return h[:n], t[:n]

    def _run(self, x: torch.Tensor, lengths: torch.Tensor, *, key_len: int):
        rows = x.shape[0]
        positions = torch.arange(key_len, device=x.device).expand(rows, -1)
        h = self.thinker.lm.model(x, self.scratch.bucket(rows, key_len), self.thinker.rotary, positions, key_len,
                                  from_start=True)
        last = h[torch.arange(rows, device=x.device), lengths - 1]
        return last, self.thinker.greedy(last)

    def _dummy_inputs(self, rows: int, padded: int):
        p = self.thinker.lm.lm_head.weight
        return (torch.zeros(rows, padded, self.thinker.hidden_size, dtype=p.dtype, device=p.device),
                torch.ones(rows, dtype=torch.long, device=p.device))


class BackboneTailGraphs(_ScratchGraphs):
    """The backbone's part of an admission when the voice's prefix is cached, through CUDA graphs.

    With the voice's keys and values cached (engine/voice_prefix.py), a new row's backbone prefill
    is two positions, [h0, embed(t1)], after its voice's prefix. Eagerly that is one call of 16
    layers, some 450 kernels launched one by one from Python: the profile of session 16
    (scripts/profile_engine.py, one H200) had an admission of one request take 23 ms, of which
    6 ms on the GPU. Here the rows are padded to a rows bucket and their key length to a length
    bucket; the voices' prefixes are copied into the scratch rows, the graph computes the two
    positions there, and the scratch rows (prefix and tail) are copied into the engine's rows.
    Rows past the batch and keys past a row's end are padding the causal mask keeps out of every
    real query, so the states match the eager step's up to the kernels' rounding (other shapes).
    Longer prefixes, or more rows, take the eager step.
    """

    KIND = "backbone_tail"

    def __init__(self, frames, max_rows: int, max_len: int, device: torch.device, use_graphs: bool = True,
                 compiled: bool = False):
        super().__init__(frames.backbone.model, frames.backbone.codebook0_head.weight, frames.backbone_cache.max_len,
                         max_rows, max_len, device, use_graphs, compiled)
        self.frames = frames
        self.hidden = frames.backbone.model.cfg.hidden_size

    def fits(self, rows: int, longest_prefix: int) -> bool:
        return self.bucket_for(rows, longest_prefix + 2) is not None

    @torch.no_grad()
    def run(self, row_start: int, prefixes: list[tuple[torch.Tensor, torch.Tensor]], tails: torch.Tensor) -> torch.Tensor:
        """Rows row_start.. of the backbone cache get their voice's prefix (`prefixes[i]`: keys and
        values [layers, kv_heads, P_i, head_dim]) and the two positions of `tails` [n, 2, H] after
        it; returns the states at the second position [n, H]."""
        self.calls += 1
        n = tails.shape[0]
        lengths = [pk.shape[2] for pk, _ in prefixes]
        rows, padded = self.bucket_for(n, max(lengths) + 2)
        copy_prefixes(self.scratch.bucket(rows, padded), 0, prefixes)
        x = tails.new_zeros(rows, 2, self.hidden)
        x[:n] = tails
        start = torch.zeros(rows, dtype=torch.long)
        start[:n] = torch.tensor(lengths)
        positions = (start[:, None] + torch.arange(2)).to(tails.device, non_blocking=True)
        states = self._replay(rows, padded, x, positions)
        self._copy_into(self.frames.backbone_cache, row_start, n, rows, padded)  # every row's prefix and tail
        return states[:n].clone()  # the pool's memory is the next replay's

    def _run(self, x: torch.Tensor, positions: torch.Tensor, *, key_len: int) -> torch.Tensor:
        h = self.frames.backbone.model(x, self.scratch.bucket(x.shape[0], key_len), self.frames.backbone_rotary,
                                       positions, key_len)
        return h[:, 1]

    def _dummy_inputs(self, rows: int, padded: int):
        p = self.frames.backbone.codebook0_head.weight
        return (torch.zeros(rows, 2, self.hidden, dtype=p.dtype, device=p.device),
                torch.arange(2, device=p.device).repeat(rows, 1))  # not a view: torch.compile guards on that (run's are not)
