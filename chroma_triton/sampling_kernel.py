"""`sampling.sample` as one Triton kernel per call (`EngineOptions.fused_sampling`).

The PyTorch sampler ranks each row's top-k candidates with `topk` (a radix select plus a sort:
about 26 us per call at batch 1 in run 9's kernel profile on an H100, 8 calls per frame) and then
runs a few fused elementwise kernels. This kernel does the whole chain in one program per row,
with no sort:

- the k-th largest scaled logit is found by bisection over the floats' order-preserving integer
  keys (a count per step, at most 32 steps, fewer once exactly k keys lie above the midpoint),
  ties at the k-th place taken by lowest token id;
- top-p keeps a token when the probability mass of the tokens ranked above it is below top_p,
  again by bisection over the keys (only for rows with top_p < 1); tokens tied at the cut count
  one by one in rank order (lowest ids first), so as many are kept as PyTorch's sort keeps;
- the token is drawn with the same counter-based noise as `sampling.sample` (argmax of p / E).

Same distribution and the same noise as `sampling.sample`: for the same logits it picks the same
token, except where two candidates' scores differ only in the last bits (the kernel's exp/log
round differently from PyTorch's) or at exact ties on the top-k / top-p boundary (PyTorch's order
among equal values is unspecified). tests/kernel_checks.py measures the agreement (on the CPU
under Triton's interpreter, on GPUs compiled).
"""

from __future__ import annotations

import torch

from .sampling import token_hashes


try:  # Triton ships with PyTorch's CUDA builds on Linux; without it only the PyTorch sampler runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


WARPS = 8  # warps per row's program (scripts/bench_launch.py times 2, 4, 8 and 16)


def available() -> bool:
    """Whether Triton can be imported."""
    return triton is not None


if triton is not None:
    @triton.jit
    def _mix32(x):
        """murmur3's 32-bit finaliser on uint32 (sampling.mix32)."""
        x = x ^ (x >> 16)
        x = x * tl.full(x.shape, 0x85EBCA6B, tl.uint32)
        x = x ^ (x >> 13)
        x = x * tl.full(x.shape, 0xC2B2AE35, tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def _sample_rows(logits_ptr, logits_stride, temp_ptr, temp_stride, topk_ptr, topk_stride, topp_ptr, topp_stride,
                    keys_ptr, keys_stride, table_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        ids = tl.arange(0, BLOCK)
        valid = ids < vocab
        x = tl.load(logits_ptr + row * logits_stride + ids, mask=valid, other=float("-inf")).to(tl.float32)
        temp = tl.load(temp_ptr + row * temp_stride)
        greedy = temp <= 0
        scaled = tl.math.div_rn(x, tl.where(greedy, 1.0, temp))  # IEEE division, as PyTorch's
        scaled = tl.where(valid, scaled, float("-inf"))
        # order-preserving int32 keys of the floats: negative ones get their lower 31 bits flipped
        bits = scaled.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)

        # top-k: tau = the k-th largest key (the largest t with count(key >= t) >= k)
        k = tl.load(topk_ptr + row * topk_stride).to(tl.int64)
        k = tl.where((k <= 0) | (k > vocab), vocab, k)
        lo = tl.min(tl.where(valid, key, 0x7FFFFFFF), axis=0).to(tl.int64)
        hi = tl.max(key, axis=0).to(tl.int64)
        hi = tl.where(k >= vocab, lo, hi)  # every token kept: no search
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            count = tl.sum((valid & (key >= mid.to(tl.int32))).to(tl.int64), axis=0)
            lo = tl.where(count >= k, mid, lo)
            hi = tl.where(count == k, mid, tl.where(count > k, hi, mid - 1))
        tau = lo.to(tl.int32)
        above = valid & (key > tau)
        need = k - tl.sum(above.to(tl.int64), axis=0)
        ties = valid & (key == tau)
        kept = above | (ties & (tl.cumsum(ties.to(tl.int64), axis=0) <= need))

        # top-p over the top-k: keep a token when the mass ranked above it is below top_p (rows
        # with top_p >= 1, the default, skip all of it)
        top = tl.max(scaled, axis=0)
        top_p = tl.load(topp_ptr + row * topp_stride)
        if top_p < 1.0:
            e = tl.where(kept, tl.exp(scaled - top), 0.0)
            probs = e / tl.sum(e, axis=0)
            lo = tl.min(tl.where(kept, key, 0x7FFFFFFF), axis=0).to(tl.int64)
            hi = tl.max(key, axis=0).to(tl.int64)  # the mass above the top token is 0 < top_p
            while lo < hi:  # the smallest key u whose mass above is below top_p
                mid = (lo + hi) >> 1
                mass = tl.sum(tl.where(kept & (key > mid.to(tl.int32)), probs, 0.0), axis=0)
                hi = tl.where(mass < top_p, mid, hi)
                lo = tl.where(mass < top_p, lo, mid + 1)
            kept = kept & (key >= lo.to(tl.int32))
            # tokens tied at the cut count in rank order, as sampling.sample's cumulative sum counts
            # them: the j-th of them (lowest ids first) stays while the mass above the tie plus j
            # of them is below top_p
            cut = tl.min(tl.where(kept, key, 0x7FFFFFFF), axis=0)
            tie = kept & (key == cut)
            above_cut = tl.sum(tl.where(kept & (key > cut), probs, 0.0), axis=0)
            p_tie = tl.max(tl.where(tie, probs, 0.0), axis=0)
            tie_rank = (tl.cumsum(tie.to(tl.int32), axis=0) - 1).to(tl.float32)
            kept = (kept & (key > cut)) | (tie & (above_cut + tie_rank * p_tie < top_p))

        # draw: argmax over the kept tokens of p / E, E ~ Exp(1) from (row key, token id)
        e = tl.where(kept, tl.exp(scaled - top), 0.0)
        probs = e / tl.sum(e, axis=0)
        row_key = tl.load(keys_ptr + row * keys_stride).to(tl.uint32)
        h = _mix32(row_key ^ tl.load(table_ptr + ids, mask=valid, other=0).to(tl.uint32))
        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        score = tl.where(kept, probs / -tl.log(u), -1.0)
        choice = tl.argmax(score, axis=0)
        best = tl.argmax(scaled, axis=0)
        tl.store(out_ptr + row, tl.where(greedy, best, choice).to(tl.int64))


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 keys: torch.Tensor, k_max: int | None = None, token_table: torch.Tensor | None = None,
                 segments: int = 1, num_warps: int | None = None) -> torch.Tensor:
    """`sampling.sample`'s contract (k_max and segments are not needed here and are ignored):
    logits [B, V] (any float dtype, last dim contiguous), temperature [B] float32, top_k [B] int,
    top_p [B] float32, keys [B] int64; returns ids [B] int64. One kernel launch, no host sync."""
    if triton is None:
        raise ImportError("fused sampling needs Triton (it comes with PyTorch's CUDA builds)")
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if token_table is None:
        token_table = token_hashes(torch.arange(vocab, device=logits.device))
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows == 0:
        return out
    block = triton.next_power_of_2(vocab)
    _sample_rows[(rows,)](logits, logits.stride(0), temperature, temperature.stride(0), top_k, top_k.stride(0),
                       top_p, top_p.stride(0), keys, keys.stride(0), token_table, out, vocab,
                       BLOCK=block, num_warps=num_warps or WARPS)
    return out
