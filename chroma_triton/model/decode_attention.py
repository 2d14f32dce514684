"""Attention of a decoding step (a few new positions per row) as a Triton kernel that reads each
row's keys only up to that row's own last position.

A step's SDPA call over the engine's static caches reads, for every row, the keys up to the
batch's key bucket (the longest row rounded up to `key_bucket`) and an additive mask as long. At
256 rows the backbone's 16 attention calls took 4.1 ms of a 13.4 ms step on an H200, several
times what reading the keys takes (scripts/profile_engine.py, docs/benchmarks.md session 16):
rows admitted at different times have very different lengths, and cuDNN's kernel works in
64-query tiles for the 4-12 query rows a kv head has in a step.

Here one program handles one (row, kv head): its query rows (the heads that share the kv head,
times the row's new positions, as `trunk.Attention` lays them out) against the keys 0..p, where p
is the row's last new position, in BLOCK_N slices with an online softmax in float32. Query row r
(r = g * L + l) sees the keys up to positions[row, l], the causal rule the mask encodes. Nothing
depends on the host, so steps that use it still capture as CUDA graphs.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_N = 64  # keys per slice


def available() -> bool:
    return triton is not None


def supports(head_dim: int) -> bool:
    """Head sizes the kernel handles: powers of two from 16 (its products' inner size)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


if triton is not None:
    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr,
                                 s_qb, s_qh, s_qm, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_pb, s_ob, s_oh, s_om,
                                 M, L, scale,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        rm = tl.arange(0, BLOCK_M)
        rd = tl.arange(0, D)
        m_ok = rm < M
        pos = tl.load(pos_ptr + b * s_pb + rm % L, mask=m_ok, other=-1)  # each query row's position
        # float32 operands: their products run as tf32, which holds a bf16 or fp16 value exactly (and
        # Triton's interpreter, which the CPU tests use, mishandles bf16 dots)
        q = tl.load(q_ptr + b * s_qb + h * s_qh + rm[:, None] * s_qm + rd[None, :], mask=m_ok[:, None],
                    other=0.0).to(tl.float32)
        n_keys = tl.max(pos, axis=0) + 1
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        k_base = k_ptr + b * s_kb + h * s_kh
        v_base = v_ptr + b * s_vb + h * s_vh
        for start in range(0, n_keys, BLOCK_N):
            rn = start + tl.arange(0, BLOCK_N)
            n_ok = rn < n_keys
            k = tl.load(k_base + rn[:, None] * s_kt + rd[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(rn[None, :] <= pos[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding rows see no key at all
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + rn[:, None] * s_vt + rd[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + b * s_ob + h * s_oh + rm[:, None] * s_om + rd[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """q [B, kvh, G*L, D] (row g*L + l: head g of the kv group at new position l), k_cache/v_cache
    [B, kvh, T, D] holding this step's keys and values already, positions [B, L] (each row's new
    positions, ascending) -> [B, kvh, G*L, D]: softmax(q k^T / sqrt(D)) v over keys 0..positions[b, l]."""
    b, kvh, m, d = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if positions.stride(-1) != 1:
        positions = positions.contiguous()
    out = q.new_empty(q.shape)  # contiguous, as the fake below says (empty_like would copy q's strides)
    block_m = max(16, triton.next_power_of_2(m))  # tl.dot wants at least 16 rows
    _decode_attention_kernel[(b, kvh)](
        q, k_cache, v_cache, positions, out,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), positions.stride(0),
        out.stride(0), out.stride(1), out.stride(2), m, positions.shape[1], d ** -0.5,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, D=d, num_warps=4, num_stages=2)
    return out


@torch.library.custom_op("chroma_triton::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        positions: torch.Tensor) -> torch.Tensor:
    """`decode_attention` as an operator torch.compile keeps as one opaque call."""
    return decode_attention(q, k_cache, v_cache, positions)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, positions):
    return q.new_empty(q.shape)
