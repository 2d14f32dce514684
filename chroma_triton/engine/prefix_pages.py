"""Device memory for the thinker prefix cache (engine/thinker_prefix.py), allocated once.

The cache stores prompts of every length and drops them in another order. Copies of their own
(a tensor per prompt) left PyTorch's allocator with freed blocks of the wrong sizes: on an H200 the
cache took 2-8 GiB more than its bound (docs/benchmarks.md run 75), and it grew as prompts came,
after the rows had been planned. `PagePool` takes the bound at once, as keys and values of `pages`
pages of `page` positions ([layers, kv_heads, pages * page, head_dim] each), and hands out pages:
a prompt's memory is whole pages, so what a dropped prompt gives back fits any later one.

A prompt takes one run of consecutive free pages where one is long enough (first fit), else the
lowest free pages: its keys and values then read as one view of the pool (no copy), or as one
concatenation of its runs' views.
"""

from __future__ import annotations

import bisect
from typing import Callable

import torch

Runs = list[tuple[int, int]]  # (first page, pages)


class PagePool:
    def __init__(self, pages: int, page: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, alloc: Callable[[str, tuple, torch.dtype], torch.Tensor] | None = None):
        """`alloc(name, shape, dtype)` makes the keys' ("k") and values' ("v") tensors instead of
        `torch.empty` on `device` (engine/peer_prefixes.py: CPU pools in files other engines map)."""
        if pages < 1 or page < 1:
            raise ValueError(f"a page pool needs at least one page of at least one position, got {pages} x {page}")
        self.pages, self.page = pages, page
        self.page_nbytes = self.page_bytes(page, layers, kv_heads, head_dim, dtype.itemsize)
        shape = (layers, kv_heads, pages * page, head_dim)
        if alloc is None:
            self.k = torch.empty(shape, dtype=dtype, device=device)
            self.v = torch.empty(shape, dtype=dtype, device=device)
        else:
            self.k, self.v = alloc("k", shape, dtype), alloc("v", shape, dtype)
        self._free: Runs = [(0, pages)]  # free runs by first page, none adjacent to another
        self.free_pages = pages

    @staticmethod
    def page_bytes(page: int, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
        """Keys and values of one page."""
        return 2 * layers * kv_heads * page * head_dim * dtype_bytes

    def fits(self, k: torch.Tensor) -> bool:
        """Whether keys shaped like `k` ([layers, kv_heads, positions, head_dim]) can be stored here."""
        pk = self.k
        return (k.dtype == pk.dtype and k.device == pk.device and k.shape[0] == pk.shape[0]
                and k.shape[1] == pk.shape[1] and k.shape[3] == pk.shape[3])

    def take(self, count: int) -> Runs | None:
        """`count` free pages as runs, or None if fewer are free."""
        if count < 1 or count > self.free_pages:
            return None
        self.free_pages -= count
        for i, (first, n) in enumerate(self._free):
            if n >= count:
                self._free[i:i + 1] = [(first + count, n - count)] if n > count else []
                return [(first, count)]
        runs: Runs = []
        while count:  # no run is long enough: the lowest pages
            first, n = self._free[0]
            used = min(n, count)
            runs.append((first, used))
            if used == n:
                self._free.pop(0)
            else:
                self._free[0] = (first + used, n - used)
            count -= used
        return runs

    def give_back(self, runs: Runs) -> None:
        for first, n in runs:
            i = bisect.bisect_left(self._free, (first, 0))
            if i < len(self._free) and self._free[i][0] == first + n:  # joins the run after it
                n += self._free.pop(i)[1]
            if i > 0 and sum(self._free[i - 1]) == first:  # ...and the one before it
                first, n = self._free[i - 1][0], self._free[i - 1][1] + n
                i -= 1
                self._free.pop(i)
            self._free.insert(i, (first, n))
        self.free_pages += runs_pages(runs)

    def write(self, runs: Runs, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy keys and values [layers, kv_heads, >= the runs' positions, head_dim] into the runs' pages."""
        at = 0
        for first, n in runs:
            lo, size = first * self.page, n * self.page
            self.k[:, :, lo:lo + size].copy_(k[:, :, at:at + size])
            self.v[:, :, lo:lo + size].copy_(v[:, :, at:at + size])
            at += size

    def read(self, runs: Runs, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `positions` positions stored in `runs`: views of the pool when they lie in one
        run, else one concatenation of the runs' views."""
        return read_runs(self.k, self.v, self.page, runs, positions)

    def nbytes(self) -> int:
        return self.pages * self.page_nbytes


def read_runs(k: torch.Tensor, v: torch.Tensor, page: int, runs: Runs, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`PagePool.read` of a pool's keys `k` and values `v` (another engine's too)."""
    ks, vs = [], []
    for first, n in runs:
        size = min(n * page, positions)
        lo = first * page
        ks.append(k[:, :, lo:lo + size])
        vs.append(v[:, :, lo:lo + size])
        positions -= size
        if not positions:
            break
    if len(ks) == 1:
        return ks[0], vs[0]
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def runs_pages(runs: Runs) -> int:
    return sum(n for _, n in runs)
