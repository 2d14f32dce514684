"""Prefills after a stored prefix through CUDA graphs (`thinker_prefix_cache_mib` with
`prefill_graphs`).

A prompt that starts like a stored one (engine/thinker_prefix.py) computes only its rest: a
conversation's next turn is the assistant's last reply and the new user turn, some 100-300
positions after a prefix of hundreds or thousands. Eagerly that is one call of the thinker's 36
layers, over 1,100 kernels launched one by one from Python: on one H200 (run 65 of
docs/benchmarks.md) a rest of 54 positions took 7 ms on the GPU and over 40 ms served, three
times the whole prompt's admission graph. Here the rest replays as one graph.

A graph needs static shapes, so a group of such prompts is padded to a bucket of (rows, rest
length, key length): rows and key length from the admission graphs' buckets
(`PrefillGraphs.bucket_for`), so the group computes in their scratch (`ScratchCache`), and a rest
length from `REST_LENGTHS`. The stored prefixes are copied into scratch rows 0.., the graph
computes the rests after them (masked attention over the copied keys, each row from its own
start), and the scratch rows (prefix and rest) are copied into the engine's rows, as an admission
graph's are. Padding rows start at 0; a row's padding positions write keys past its prompt's end,
which a decode step overwrites before any query reads them. The key length is at least every
row's start plus the rest bucket, so no padding position wraps onto a real one.

Every bucket a stored prefix can reach (`buckets`: starts of at least the cache's `min_tokens`)
is captured at start (`capture_all`), into the admission graphs' runner: one memory pool, so a
replay's outputs are read before the next replay. Captured on first use instead, each capture
stalled every running stream for 100-300 ms (2 eager runs and the capture; run 66 of
docs/benchmarks.md), some 27 times in a level of 256 conversations. Their layers run eagerly
inside the graph even under `compile`: compiling every shape would add minutes to the start, and
the replay already saves the launches. Rests longer than
`REST_LENGTHS`, or whose key length exceeds every bucket, take the eager path (`prefill_after`).
"""

from __future__ import annotations

from functools import partial

import torch

from ..model.trunk import eager_layers
from .graphs import bucket
from .prefill_graphs import PrefillGraphs, cheapest_groups
from .voice_prefix import copy_prefixes

REST_LENGTHS = (64, 128, 192, 256, 384, 512)


class PrefixRestGraphs:
    KIND = "prefix_rest"

    def __init__(self, admission: PrefillGraphs, min_start: int):
        """`min_start`: the shortest stored prefix a prompt takes (ThinkerPrefixCache.min_tokens)."""
        self.admission = admission
        self.thinker = admission.thinker
        self.min_start = min_start
        self.calls = 0  # replays (one per group of an admission)

    def buckets(self) -> list[tuple[int, int, int]]:
        """Every (rows, rest length, key length) bucket `bucket_for` can give for prefixes of at
        least `min_start` positions: an admission bucket's rows and length, and a rest length that
        leaves room for such a prefix before it."""
        return [(rows, rest, key_len) for rows, key_len in self.admission.buckets for rest in REST_LENGTHS
                if rest + self.min_start <= key_len]

    def __len__(self) -> int:
        """Graphs captured so far (none without CUDA graphs)."""
        return self.admission.runner.count(self.KIND)

    def bucket_for(self, rows: int, rest: int, start: int) -> tuple[int, int, int] | None:
        """The smallest (rows, rest length, key length) bucket for `rows` prompts whose rests are at
        most `rest` positions after prefixes of at most `start`, or None."""
        if not 0 < rest <= REST_LENGTHS[-1]:
            return None
        padded = bucket(rest, list(REST_LENGTHS))
        found = self.admission.bucket_for(rows, start + padded)
        return None if found is None else (found[0], padded, found[1])

    def plan(self, rests: list[int], starts: list[int]) -> list[tuple[int, bool]]:
        """How to prefill prompts of `rests` (ascending) after prefixes of `starts`: consecutive
        groups `(count, through a graph)`. The prompts a graph holds come first (the caller orders
        them so, `fits`) and are split where that pads least (`cheapest_groups`: rows x rest
        length; the key length is left out, since a position's attention over 2,048 keys is about a
        tenth of its work in the layers' products); the others make one eager group at the end."""
        fit = 0
        while fit < len(rests) and self.fits(rests[fit], starts[fit]):
            fit += 1
        if any(b < a for a, b in zip(rests[:fit], rests[1:fit])):
            raise ValueError("plan: the rests a graph holds must be ascending")

        def bucket_of(j: int, i: int):  # the group j..i-1 as one replay: (rows, rest length)
            found = self.bucket_for(i - j, rests[i - 1], max(starts[j:i]))
            return None if found is None else found[:2]
        return cheapest_groups(len(rests), fit, bucket_of)

    def fits(self, rest: int, start: int) -> bool:
        return self.bucket_for(1, rest, start) is not None

    @torch.no_grad()  # not inference mode: a graph's static inputs are copied into outside it
    def prefill(self, row_start: int, prompts, prefixes):
        """As `TorchThinker.prefill_after` (prefixes[i]: (start, k, v)), for prompts one bucket holds:
        returns (last states [P, H], greedy next ids [P]), views into the graphs' memory, which
        the next replay overwrites."""
        self.calls += 1
        starts = [start for start, _, _ in prefixes]
        x, lengths = self.thinker.prompt_batch(self.thinker.rests(prompts, starts))
        n, length = x.shape[0], x.shape[1]
        found = self.bucket_for(n, length, max(starts))
        if found is None:
            raise ValueError(f"no prefix rest graph holds {n} rests of {length} positions after {max(starts)}")
        rows, padded, key_len = found
        copy_prefixes(self.admission.scratch.bucket(rows, key_len), 0,
                      [(k[:, :, :start], v[:, :, :start]) for start, k, v in prefixes])
        xb = x.new_zeros(rows, padded, x.shape[2])
        xb[:n, :length] = x
        first = torch.zeros(rows, dtype=torch.long)
        first[:n] = torch.tensor(starts)
        positions = (first[:, None] + torch.arange(padded)).to(x.device, non_blocking=True)
        last = torch.zeros(rows, dtype=lengths.dtype, device=lengths.device)
        last[:n] = lengths - 1
        h, t = self._replay(rows, padded, key_len, xb, positions, last)
        self.admission._copy_into(self.thinker.cache, row_start, n, rows, key_len)  # prefixes and rests
        return h[:n], t[:n]

    @torch.no_grad()
    def capture_all(self, stop=lambda: False) -> bool:
        """Capture every bucket's graph now (`buckets`); `stop()` ends it early. Returns whether all
        were captured."""
        for rows, rest, key_len in self.buckets():
            if stop():
                return False
            p = self.thinker.lm.lm_head.weight
            positions = (key_len - rest + torch.arange(rest, device=p.device)).repeat(rows, 1)
            self._replay(rows, rest, key_len, torch.zeros(rows, rest, self.thinker.hidden_size, dtype=p.dtype,
                                                          device=p.device),
                         positions, torch.zeros(rows, dtype=torch.long, device=p.device))
        return True

    def _replay(self, rows: int, rest: int, key_len: int, *inputs):
        """The graph of bucket (rows, rest, key_len) on `inputs`: captured on its first call."""
        with eager_layers():
            return self.admission.runner((self.KIND, rows, rest, key_len), partial(self._run, key_len=key_len), *inputs)

    def _run(self, x: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, *, key_len: int):
        rows = x.shape[0]
        h = self.thinker.lm.model(x, self.admission.scratch.bucket(rows, key_len), self.thinker.rotary, positions,
                                  key_len)
        states = h[torch.arange(rows, device=x.device), last]
        return states, self.thinker.greedy(states)
