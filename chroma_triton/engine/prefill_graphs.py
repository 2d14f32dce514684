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
overwrites before any query reads them (causal mask). Prompts longer than `max_len`, or more rows
than `max_rows`, take the eager path.

Padded to a bucket, a prompt's states are computed with other matrix shapes than the eager
path's (padded to the batch's longest prompt only): equal up to the kernels' rounding, not
bitwise. The graphs share one memory pool: a prefill's outputs are read before the next prefill.
The engine's row planning keeps the scratch rows (`max_rows` x `max_len` positions of the thinker's
cache, and of the backbone's for the tails; capacity.admission_scratch_bytes) out of the KV
budget; the largest graph's pool comes out of `activation_reserve_gib`.
"""

from __future__ import annotations

from functools import partial

import torch

from ..model.thinker import TorchThinker
from ..model.trunk import eager_layers
from .graphs import StepRunner, batch_buckets, bucket
from .voice_prefix import copy_prefixes

LENGTH_STEP = 64


def prefill_length_buckets(max_len: int) -> list[int]:
    """64, 128, 256, ... doubling up to max_len (included)."""
    sizes, s = [], LENGTH_STEP
    while s < max_len:
        sizes.append(s)
        s *= 2
    return sizes + [max_len]


class _ScratchGraphs:
    """What both kinds of admission graphs share: a batch is padded to a rows bucket (1, 2, 4, ...
    `max_rows`) and a length bucket (`prefill_length_buckets`), computed in scratch rows 0.. of a
    cache of their own by the graph of that bucket (captured on first use or by `capture_all`; all
    share one memory pool, so a replay's outputs are read before the next replay), and its keys and
    values are copied into the engine's rows. Subclasses give `KIND`, `_run(*inputs, key_len)` and
    `_dummy_inputs(rows, padded)`. `compiled`: a compiled trunk's layers run compiled here too
    (else eagerly: see trunk.eager_layers); the buckets bound the shapes torch.compile meets."""

    KIND = ""

    def __init__(self, trunk, like: torch.Tensor, cache_len: int, max_rows: int, max_len: int, device: torch.device,
                 use_graphs: bool, compiled: bool = False):
        """`trunk`: the trunk the scratch cache is for; `like`: a weight whose device and dtype it
        takes; `cache_len`: the engine cache's length (no bucket goes past it)."""
        self.rows = batch_buckets(max_rows)
        self.lengths = prefill_length_buckets(min(max_len, cache_len))
        self.scratch, _ = trunk.new_cache(self.rows[-1], self.lengths[-1], like.device, like.dtype)
        self.runner = StepRunner(use_graphs=use_graphs and device.type == "cuda", shared_pool=True,
                                 device=device if device.type == "cuda" else None)
        self.calls = 0  # admissions that took this path
        self.compiled = compiled

    def __len__(self) -> int:
        return len(self.runner)

    def _replay(self, rows: int, padded: int, *inputs):
        """The graph of the (rows, padded) bucket on `inputs`: captured on its first call, replayed after."""
        with eager_layers(not self.compiled):  # the engine's admissions run inside eager_layers()
            return self.runner((self.KIND, rows, padded), partial(self._run, key_len=padded), *inputs)

    def _copy_into(self, cache, row_start: int, n: int, padded: int) -> None:
        """Scratch rows 0..n-1, positions 0..padded-1, into `cache`'s rows row_start.."""
        cache.k[:, row_start:row_start + n, :, :padded].copy_(self.scratch.k[:, :n, :, :padded])
        cache.v[:, row_start:row_start + n, :, :padded].copy_(self.scratch.v[:, :n, :, :padded])

    @torch.no_grad()
    def compile_all(self) -> None:
        """With `compiled`: run every (rows, length) bucket's function once, outside any graph, so
        that torch.compile compiles for them now (captures, at start or on first use, then find
        the code compiled)."""
        if not self.compiled:
            return
        with eager_layers(False):
            for rows, padded in self._buckets():
                self._run(*self._dummy_inputs(rows, padded), key_len=padded)

    @torch.no_grad()
    def capture_all(self, stop=lambda: False) -> bool:
        """Capture every (rows, length) graph now, shortest first; `stop()` ends it early. Returns
        whether all were captured."""
        for rows, padded in self._buckets():
            if stop():
                return False
            self._replay(rows, padded, *self._dummy_inputs(rows, padded))
        return True

    def _buckets(self):
        """Every (rows, length) bucket, shortest length first."""
        return ((rows, padded) for padded in self.lengths for rows in self.rows)


class PrefillGraphs(_ScratchGraphs):
    KIND = "prefill"

    def __init__(self, thinker: TorchThinker, max_rows: int, max_len: int, device: torch.device,
                 use_graphs: bool = True, compiled: bool = False):
        super().__init__(thinker.lm.model, thinker.lm.lm_head.weight, thinker.max_len, max_rows, max_len, device,
                         use_graphs, compiled)
        self.thinker = thinker

    def fits(self, prompts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> bool:
        return len(prompts) <= self.rows[-1] and max(t.reshape(-1).shape[0] for t, _ in prompts) <= self.lengths[-1]

    @torch.no_grad()  # not inference mode: a graph's static inputs are copied into outside it
    def prefill(self, row_start: int, prompts, max_new_tokens=None):
        """As `TorchThinker.prefill`: prompts into cache rows row_start.., returning (last states
        [P, H], greedy next ids [P])."""
        self.calls += 1
        x, lengths = self.thinker.prompt_batch(prompts)
        n, length = x.shape[0], x.shape[1]
        rows, padded = bucket(n, self.rows), bucket(length, self.lengths)
        xb = x.new_zeros(rows, padded, x.shape[2])
        xb[:n, :length] = x
        lb = torch.ones(rows, dtype=lengths.dtype, device=lengths.device)
        lb[:n] = lengths
        h, t = self._replay(rows, padded, xb, lb)
        self._copy_into(self.thinker.cache, row_start, n, padded)  # this prefill's keys and values
        return h[:n], t[:n]

    def _run(self, x: torch.Tensor, lengths: torch.Tensor, *, key_len: int):
        rows = x.shape[0]
        positions = torch.arange(key_len, device=x.device).expand(rows, -1)
        h = self.thinker.lm.model(x, self.scratch, self.thinker.rotary, positions, key_len, row_start=0)
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
        return rows <= self.rows[-1] and longest_prefix + 2 <= self.lengths[-1]

    @torch.no_grad()
    def run(self, row_start: int, prefixes: list[tuple[torch.Tensor, torch.Tensor]], tails: torch.Tensor) -> torch.Tensor:
        """Rows row_start.. of the backbone cache get their voice's prefix (`prefixes[i]`: keys and
        values [layers, kv_heads, P_i, head_dim]) and the two positions of `tails` [n, 2, H] after
        it; returns the states at the second position [n, H]."""
        self.calls += 1
        n = tails.shape[0]
        lengths = [pk.shape[2] for pk, _ in prefixes]
        rows, padded = bucket(n, self.rows), bucket(max(lengths) + 2, self.lengths)
        copy_prefixes(self.scratch, 0, prefixes)
        x = tails.new_zeros(rows, 2, self.hidden)
        x[:n] = tails
        start = torch.zeros(rows, dtype=torch.long)
        start[:n] = torch.tensor(lengths)
        positions = (start[:, None] + torch.arange(2)).to(tails.device, non_blocking=True)
        states = self._replay(rows, padded, x, positions)
        self._copy_into(self.frames.backbone_cache, row_start, n, padded)  # every row's prefix and tail
        return states[:n].clone()  # the pool's memory is the next replay's

    def _run(self, x: torch.Tensor, positions: torch.Tensor, *, key_len: int) -> torch.Tensor:
        h = self.frames.backbone.model(x, self.scratch, self.frames.backbone_rotary, positions, key_len)
        return h[:, 1]

    def _dummy_inputs(self, rows: int, padded: int):
        p = self.frames.backbone.codebook0_head.weight
        return (torch.zeros(rows, 2, self.hidden, dtype=p.dtype, device=p.device),
                torch.arange(2, device=p.device).expand(rows, 2).contiguous())
