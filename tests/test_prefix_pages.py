"""The thinker prefix cache's page pool (engine/prefix_pages.py): pages handed out as runs, given
back and merged, read back as views or one concatenation."""

from __future__ import annotations

import random

import pytest
import torch

from chroma_triton.engine.prefix_pages import PagePool, runs_pages

PAGE = 4


def _pool(pages: int) -> PagePool:
    return PagePool(pages, PAGE, layers=2, kv_heads=1, head_dim=3, dtype=torch.float32, device="cpu")


def _kv(pages: int, fill: float):
    k = torch.arange(2 * pages * PAGE * 3, dtype=torch.float32).reshape(2, 1, pages * PAGE, 3) + fill
    return k, -k


def test_a_prompt_takes_one_run_when_one_is_long_enough_and_reads_as_a_view():
    pool = _pool(10)
    assert PagePool.page_bytes(PAGE, 2, 1, 3, 4) * 10 == pool.nbytes() == 2 * 2 * 40 * 3 * 4
    a, b = pool.take(3), pool.take(4)
    assert (a, b, pool.free_pages) == ([(0, 3)], [(3, 4)], 3)
    k, v = _kv(4, 100.0)
    pool.write(b, k, v)
    rk, rv = pool.read(b, 3 * PAGE + 1)  # the first positions of the prompt
    assert rk.data_ptr() == pool.k[:, :, 3 * PAGE:].data_ptr()  # a view: no copy
    assert torch.equal(rk, k[:, :, :3 * PAGE + 1]) and torch.equal(rv, v[:, :, :3 * PAGE + 1])
    assert pool.take(4) is None and pool.free_pages == 3  # more than is free: nothing taken


def test_pages_given_back_merge_and_a_prompt_may_span_runs():
    pool = _pool(10)
    a, b, c = pool.take(3), pool.take(3), pool.take(3)
    pool.give_back(a)
    pool.give_back(c)  # free: 0-2 and 6-9, not adjacent
    assert pool._free == [(0, 3), (6, 4)] and pool.free_pages == 7
    d = pool.take(5)  # no run of 5: the lowest pages, in two runs
    assert d == [(0, 3), (6, 2)] and runs_pages(d) == 5
    k, v = _kv(5, 7.0)
    pool.write(d, k, v)
    rk, rv = pool.read(d, 5 * PAGE)
    assert torch.equal(rk, k) and torch.equal(rv, v)  # one concatenation, in the prompt's order
    pool.give_back(b)
    pool.give_back(d)
    assert pool._free == [(0, 10)] and pool.free_pages == 10  # everything merged back into one run


def test_random_takes_and_give_backs_never_hand_out_a_page_twice():
    rng = random.Random(3)
    pool = _pool(64)
    held: list = []
    for _ in range(2000):
        if held and (rng.random() < 0.45 or pool.free_pages == 0):
            pool.give_back(held.pop(rng.randrange(len(held))))
        else:
            runs = pool.take(rng.randint(1, 9))
            if runs is not None:
                held.append(runs)
        used = [p for runs in held for first, n in runs for p in range(first, first + n)]
        assert len(used) == len(set(used)) and len(used) + pool.free_pages == 64
        assert all(a[0] + a[1] < b[0] for a, b in zip(pool._free, pool._free[1:]))  # sorted, never adjacent


def test_keys_of_another_shape_or_dtype_do_not_fit():
    pool = _pool(2)
    assert pool.fits(torch.zeros(2, 1, 5, 3))
    assert not pool.fits(torch.zeros(2, 2, 5, 3)) and not pool.fits(torch.zeros(2, 1, 5, 3, dtype=torch.float64))
    with pytest.raises(ValueError):
        PagePool(0, PAGE, 2, 1, 3, torch.float32, "cpu")
