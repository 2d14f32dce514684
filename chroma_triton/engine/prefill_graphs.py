"""The thinker's prompt prefill through CUDA graphs (`EngineOptions.prefill_graphs`).

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
The scratch rows (`max_rows` x `max_len` positions of the thinker's cache) and the largest graph's
pool come out of `activation_reserve_gib`; the engine's row planning does not count them.
"""

from __future__ import annotations

from functools import partial

import torch

from ..model.thinker import TorchThinker
from ..model.trunk import eager_layers
from .graphs import StepRunner, batch_buckets, bucket

LENGTH_STEP = 64


def prefill_length_buckets(max_len: int) -> list[int]:
    """64, 128, 256, ... doubling up to max_len (included)."""
    sizes, s = [], LENGTH_STEP
    while s < max_len:
        sizes.append(s)
        s *= 2
    return sizes + [max_len]


class PrefillGraphs:
    def __init__(self, thinker: TorchThinker, max_rows: int, max_len: int, device: torch.device,
                 use_graphs: bool = True):
        self.thinker = thinker
        self.rows = batch_buckets(max_rows)
        self.lengths = prefill_length_buckets(min(max_len, thinker.max_len))
        lm = thinker.lm
        p = lm.lm_head.weight
        self.scratch, _ = lm.model.new_cache(self.rows[-1], self.lengths[-1], p.device, p.dtype)
        self.runner = StepRunner(use_graphs=use_graphs and device.type == "cuda", shared_pool=True,
                                 device=device if device.type == "cuda" else None)
        self.calls = 0  # prefills that took this path

    def __len__(self) -> int:
        return len(self.runner)

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
        h, t = self._graph(xb, lb)
        cache = self.thinker.cache  # this prefill's keys and values, into the engine's rows
        cache.k[:, row_start:row_start + n, :, :padded].copy_(self.scratch.k[:, :n, :, :padded])
        cache.v[:, row_start:row_start + n, :, :padded].copy_(self.scratch.v[:, :n, :, :padded])
        return h[:n], t[:n]

    def _graph(self, x: torch.Tensor, lengths: torch.Tensor):
        """The graph of x's (rows, length) bucket: captured on its first call, replayed after."""
        rows, padded = x.shape[0], x.shape[1]
        with eager_layers():  # prompt shapes: compiled layers stay out of prefills (see trunk.eager_layers)
            return self.runner(("prefill", rows, padded), partial(self._run, key_len=padded), x, lengths)

    def _run(self, x: torch.Tensor, lengths: torch.Tensor, *, key_len: int):
        rows = x.shape[0]
        positions = torch.arange(key_len, device=x.device).expand(rows, -1)
        h = self.thinker.lm.model(x, self.scratch, self.thinker.rotary, positions, key_len, row_start=0)
        last = h[torch.arange(rows, device=x.device), lengths - 1]
        return last, self.thinker.greedy(last)

    @torch.no_grad()
    def capture_all(self, stop=lambda: False) -> bool:
        """Capture every (rows, length) graph now, shortest first; `stop()` ends it early. Returns
        whether all were captured."""
        p = self.thinker.lm.lm_head.weight
        for padded in self.lengths:
            for rows in self.rows:
                if stop():
                    return False
                x = torch.zeros(rows, padded, self.thinker.hidden_size, dtype=p.dtype, device=p.device)
                self._graph(x, torch.ones(rows, dtype=torch.long, device=p.device))
        return True
