"""`sampling.sample` as one Triton kernel per call (`EngineOptions.fused_sampling`).

The PyTorch sampler ranks each row's top-k candidates with `topk` (a radix select plus a sort:
about 26 us per call at batch 1 in run 9's kernel profile on an H100, 8 calls per frame) and then
runs a few fused elementwise kernels. This kernel does the whole chain in one program per row,
with no sort:

- the k-th largest scaled logit is found by a search over the floats' order-preserving integer
  keys: each pass counts the keys at or above RADIX thresholds at once and narrows the range
  RADIX-fold, until exactly k keys lie at or above a threshold or the range is one key. bf16
  logits (the model's) need 16-bit keys: at most 8 passes with RADIX 4 (32-bit keys: 16). Ties at
  the k-th place are taken by lowest token id;
- top-p keeps a token when the probability mass of the tokens ranked above it is below top_p,
  found by the same kind of search (only for rows with top_p < 1); tokens tied at the cut count
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
RADIX = 4  # thresholds tested per pass of the top-k and top-p searches (scripts/bench_launch.py times 2-16)


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
    def _at(values, j, index):
        """values[index] of a small vector indexed by j (0 when index is out of range)."""
        return tl.sum(tl.where(j == index, values, 0), axis=0)

    @triton.jit
    def _kth_key(key, valid, k, lo, hi, RADIX: tl.constexpr):
        """The largest t in [lo, hi] with count(key >= t) >= k, or one with exactly k keys at or above
        it. Each pass counts at RADIX thresholds at once (one reduction) and keeps the sub-range
        between the last one with enough keys and the next."""
        j = tl.arange(0, RADIX)
        while lo < hi:
            t = lo + ((hi - lo + 1) * j) // RADIX  # t[0] == lo
            counts = tl.sum((valid[:, None] & (key[:, None] >= t[None, :].to(tl.int32))).to(tl.int32), axis=0)
            last = tl.max(tl.where(counts >= k, j, 0), axis=0)  # count(key >= lo) >= k always holds
            t_last = _at(t, j, last)
            t_next = tl.where(last == RADIX - 1, hi + 1, _at(t, j, last + 1))  # fewer than k from here
            hi = tl.where(_at(counts, j, last) == k, t_last, t_next - 1)
            lo = t_last
        return lo

    @triton.jit
    def _top_p_key(key, kept, probs, top_p, lo, hi, RADIX: tl.constexpr):
        """The smallest u in [lo, hi] whose mass ranked above (kept tokens with key > u) is below top_p
        (hi qualifies: nothing lies above the largest key). RADIX thresholds per pass, as _kth_key."""
        j = tl.arange(0, RADIX)
        while lo < hi:
            t = lo + ((hi - lo + 1) * j) // RADIX
            above = kept[:, None] & (key[:, None] > t[None, :].to(tl.int32))
            mass = tl.sum(tl.where(above, probs[:, None], 0.0), axis=0)
            first = tl.min(tl.where(mass < top_p, j, RADIX), axis=0)  # RADIX: none of them qualifies
            new_lo = tl.where(first == 0, lo, _at(t, j, tl.where(first == RADIX, RADIX - 1, first - 1)) + 1)
            hi = tl.where(first == RADIX, hi, _at(t, j, first))
            lo = new_lo
        return lo

    @triton.jit
    def _sample_rows(logits_ptr, logits_stride, temp_ptr, temp_stride, topk_ptr, topk_stride, topp_ptr, topp_stride,
                    keys_ptr, keys_stride, table_ptr, out_ptr, vocab, BLOCK: tl.constexpr, KEY_SHIFT: tl.constexpr,
                    RADIX: tl.constexpr):
        row = tl.program_id(0)
        ids = tl.arange(0, BLOCK)
        valid = ids < vocab
        x = tl.load(logits_ptr + row * logits_stride + ids, mask=valid, other=float("-inf")).to(tl.float32)
        temp = tl.load(temp_ptr + row * temp_stride)
        greedy = temp <= 0
        scaled = tl.math.div_rn(x, tl.where(greedy, 1.0, temp))  # IEEE division, as PyTorch's
        scaled = tl.where(valid, scaled, float("-inf"))
        # order-preserving int32 keys: negative floats get their lower 31 bits flipped. 16-bit logits
        # (KEY_SHIFT > 0) rank by their own bits, which scaling keeps in the same order with the same
        # ties, so the keys need only 16 (bf16) or 19 (fp16) bits and the searches fewer passes
        if KEY_SHIFT > 0:
            bits = x.to(tl.int32, bitcast=True)
        else:
            bits = scaled.to(tl.int32, bitcast=True)
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> KEY_SHIFT

        # top-k: tau = the k-th largest key
        k = tl.load(topk_ptr + row * topk_stride).to(tl.int64)
        k = tl.where((k <= 0) | (k > vocab), vocab, k)
        lo = tl.min(tl.where(valid, key, 0x7FFFFFFF), axis=0).to(tl.int64)
        hi = tl.max(key, axis=0).to(tl.int64)
        hi = tl.where(k >= vocab, lo, hi)  # every token kept: no search
        tau = _kth_key(key, valid, k, lo, hi, RADIX).to(tl.int32)
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
            hi = tl.max(key, axis=0).to(tl.int64)
            kept = kept & (key >= _top_p_key(key, kept, probs, top_p, lo, hi, RADIX).to(tl.int32))
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


_KEY_SHIFT = {torch.bfloat16: 16, torch.float16: 13}  # float32 bits that are always 0 in such a logit


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 keys: torch.Tensor, k_max: int | None = None, token_table: torch.Tensor | None = None,
                 segments: int = 1, num_warps: int | None = None, radix: int | None = None,
                 key_bits: str = "auto") -> torch.Tensor:
    """`sampling.sample`'s contract (k_max and segments are not needed here and are ignored):
    logits [B, V] (any float dtype, last dim contiguous), temperature [B] float32, top_k [B] int,
    top_p [B] float32, keys [B] int64; returns ids [B] int64. One kernel launch, no host sync.
    num_warps, radix (thresholds per search pass, a power of 2) and key_bits ("auto": 16-bit keys for
    16-bit logits; "32": always the scaled float32's keys) are for benchmarks and tests."""
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
                       BLOCK=block, KEY_SHIFT=_KEY_SHIFT.get(logits.dtype, 0) if key_bits == "auto" else 0,
                       RADIX=radix or RADIX, num_warps=num_warps or WARPS)
    return out
