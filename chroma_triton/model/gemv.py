"""`F.linear` for a single row (batch-1 decode steps) as a Triton kernel that reads the weight once.

At batch 1 every step is a chain of matrix-vector products: cuBLAS reaches about 2.1 TB/s on
them on an H100 (one frame's 248 products, 6.3 GB of weights, took 2.99 ms in
scripts/bench_launch.py), and the small ones are launch-bound (0.5-0.7 TB/s). Here each program
owns BLOCK_N output features, walks the whole input dimension in BLOCK_K slices with every row
of x at once, accumulates in float32 and writes x's dtype: one kernel per product, no split-K
reduction. Measured per shape against cuBLAS in docs/benchmarks.md (session 11): faster on every
product with at most 4096 inputs, slower on the down projections and at 4 rows, hence `linear`'s
rule.
"""

from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

MAX_IN_FEATURES = 4096  # longer rows (the down projections, 8192 and 11008): cuBLAS's split-K kernels were faster
ENABLED = False  # set by the engine (EngineOptions.gemv): `linear` takes the kernel for single rows on CUDA


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_xm, stride_wn, stride_om,
                     ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
        pid = tl.program_id(0)
        rm = tl.arange(0, BLOCK_M)
        rn = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: row offsets of large weights
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < ROWS
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + rk) < K
            w = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 + rk)[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc += x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32)
        y = tl.sum(acc, axis=2)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, block_n: int = 8,
         block_k: int = 256, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """x [M, K] (a few rows; last dim contiguous) @ weight[N, K].T (+ bias) -> [M, N] in x's dtype."""
    rows, k = x.shape
    n = weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, n, k, x.stride(0), weight.stride(0), out.stride(0),
        ROWS=rows, BLOCK_M=max(1, triton.next_power_of_2(rows)), BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_BIAS=bias is not None, num_warps=num_warps, num_stages=num_stages)
    return out


@torch.library.custom_op("chroma_triton::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`gemv` as an operator torch.compile keeps as one opaque call. Blocks measured on an H100 for
    one row (scripts/bench_launch.py --gemv-rows 1): 4 output features per program, 8 for the
    wide gate/up and vocabulary matrices, 512-wide slices, 4 warps."""
    return gemv(x, weight, bias, block_n=8 if weight.shape[0] >= 8192 else 4, block_k=512, num_warps=4)


@gemv_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear; with ENABLED, for one row on CUDA, at most MAX_IN_FEATURES inputs and a weight
    whose rows are contiguous: `gemv_op`."""
    if ENABLED and x.is_cuda and x.numel() == x.shape[-1] and weight.shape[1] <= MAX_IN_FEATURES \
            and weight.stride(1) == 1:
        return gemv_op(x.reshape(1, -1), weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
