"""A Llama/Qwen2-style decoder stack over preallocated, fixed-shape KV caches.

One module serves three parts of Chroma: the thinker's Qwen2.5 LM (q/k/v biases, plain rope),
the backbone and the depth decoder (Llama-3 rope). Parameter names follow transformers'
`LlamaModel` / `Qwen2Model` (`layers.N.self_attn.q_proj.weight`, ...), so checkpoint tensors load
directly.

Every forward works on a batch of *cache rows* with per-row positions, so requests of different
lengths share one call (continuous batching) and shapes stay fixed for CUDA graphs later.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RopeConfig, TrunkConfig
from .decode_attention import decode_attention_op, supports
from .gemv import linear


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3's long-context rescaling when asked."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        mid = (1 - smooth) * inv / rope.factor + smooth * inv
        is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = torch.where(is_mid, mid, scaled)
    return inv.float()


class RotaryTable:
    """cos/sin for positions 0..max_len-1, computed once (gpt-fast's `setup_caches` habit)."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_len: int, device, dtype):
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(rope, head_dim))
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, L] -> cos, sin [B, 1, L, D] (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Static K/V buffers [layers, rows, kv_heads, max_len, head_dim] for one trunk.

    A row belongs to one request for its lifetime; positions are absolute within the row.
    Nothing is ever freed or reallocated: releasing a row is the engine's bookkeeping only,
    since a new owner overwrites positions before any query can read them (causal mask).
    """

    def __init__(self, cfg: TrunkConfig, rows: int, max_len: int, device, dtype):
        shape = (cfg.num_layers, rows, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.rows = rows
        self.max_len = max_len

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """A cache over existing buffers [layers, rows, kv_heads, max_len, head_dim] (views of a
        larger allocation, say), allocating nothing."""
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        cache.rows, cache.max_len = k.shape[1], k.shape[3]
        return cache

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` over row `dst` (the engine compacts its batch when a request leaves)."""
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel where torch has it (statistics in float32 for half-precision inputs)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.math_steps = False  # steps (<= MATH_MAX_QUERIES positions) attend by explicit matmuls, not SDPA
        self.decode_kernel = False  # ...or by model/decode_attention.py's kernel (CUDA), each row to its own length

    def fuse(self) -> None:
        """One [q; k; v] matrix (one matmul per step instead of three). The q/k/v parameters become
        views into it, so weights are not duplicated and the state dict keeps its names."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight.detach() for p in projs])
        bias = torch.cat([p.bias.detach() for p in projs]) if self.q_proj.bias is not None else None
        start = 0
        for p in projs:
            n = p.weight.shape[0]
            p.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
            if bias is not None:
                p.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
            start += n
        self.qkv = (weight, bias)

    def _project(self, x):
        """-> ([q; k] [B, L, (H + kvh) * D], v [B, L, kvh * D])."""
        if self.qkv is None:
            return torch.cat([self.q_proj(x), self.k_proj(x)], dim=-1), self.v_proj(x)
        nkv = self.num_kv_heads * self.head_dim
        qkv = linear(x, *self.qkv)
        return qkv[..., :-nkv], qkv[..., -nkv:]

    def forward(self, x, cos, sin, k_cache, v_cache, positions, mask, key_len):
        """x [B, L, H]; k_cache/v_cache [B, kvh, T, D]: this layer's cache rows of the batch (a view);
        positions [B, L]; mask [B, 1, G*L, key_len] additive (0 or -inf), G = heads per kv head,
        or None for a prefill from position 0 (positions 0..L-1 in every row, key_len L): then the
        queries attend causally to this call's own keys and values (`Trunk.forward`'s `from_start`)."""
        b, length, _ = x.shape
        qk, v = self._project(x)
        # rope on q and k together: one set of kernels for both
        qk = qk.reshape(b, length, self.num_heads + self.num_kv_heads, self.head_dim)
        qk = apply_rope(qk.transpose(1, 2), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.reshape(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # write this step's keys/values at each row's positions; advanced indices go first: [B, L, kvh, D]
        batch = torch.arange(b, device=x.device)[:, None]
        k_cache[batch, :, positions] = k.transpose(1, 2)
        v_cache[batch, :, positions] = v.transpose(1, 2)
        if mask is None:  # from position 0: causal over these keys, no mask to build or read
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return linear(out.transpose(1, 2).reshape(b, length, -1), self.o_proj.weight)
        # Grouped-query attention without copying the cache: the query heads that share a kv head
        # become extra query rows of that head ([B, kvh, G*L, D]); `mask` is already repeated G times.
        group = self.num_heads // self.num_kv_heads
        q = q.reshape(b, self.num_kv_heads, group * length, self.head_dim)
        if self.decode_kernel and length <= MATH_MAX_QUERIES:
            out = decode_attention_op(q, k_cache, v_cache, positions)
        else:
            attend = attend_math if self.math_steps and length <= MATH_MAX_QUERIES else F.scaled_dot_product_attention
            out = attend(q, k_cache[:, :, :key_len], v_cache[:, :, :key_len], attn_mask=mask)
        out = out.reshape(b, self.num_heads, length, self.head_dim)
        return linear(out.transpose(1, 2).reshape(b, length, -1), self.o_proj.weight)


MATH_MAX_QUERIES = 4  # decoding steps feed 1-3 positions per row; prefills more


def attend_math(q, k, v, attn_mask):
    """Attention as two batched matmuls around a float32 softmax: what SDPA computes, in kernels
    that torch.compile can fuse with their neighbours. For steps: a few queries against a short
    or mid-length cache, where a flash-attention launch costs more than the work. The scores are
    rounded to the inputs' dtype before the softmax (SDPA keeps them in float32): in bf16 that
    is a larger error than SDPA's, which is one reason this is not the default.
    q [B, h, M, D], k/v [B, h, T, D], attn_mask [B, 1, M, T] additive."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5) + attn_mask.float()
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


class MLP(nn.Module):
    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: torch.Tensor | None = None

    def fuse(self) -> None:
        """One [gate; up] matrix; gate/up become views into it (see Attention.fuse)."""
        weight = torch.cat([self.gate_proj.weight.detach(), self.up_proj.weight.detach()])
        n = self.gate_proj.weight.shape[0]
        self.gate_proj.weight = nn.Parameter(weight[:n], requires_grad=False)
        self.up_proj.weight = nn.Parameter(weight[n:], requires_grad=False)
        self.gate_up = weight

    def forward(self, x):
        if self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = linear(x, self.gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, positions, mask, key_len):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, positions, mask, key_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """layers + final norm; input and output are hidden states [B, L, H]."""

    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.compiled = False  # run each layer through torch.compile (fused kernels); see set_compiled

    def set_compiled(self, on: bool) -> "Trunk":
        """Run every layer through one `torch.compile`d function (inductor fuses the norms, rope,
        residual adds and activation into a few kernels per layer). All layers of all trunks share
        the compiled code (parameters are inputs), so compiling costs one graph per layer shape.
        Numerics change slightly (fused reductions), so this is an explicit choice."""
        self.compiled = on
        return self

    def set_math_attention(self, on: bool) -> "Trunk":
        """Calls of at most MATH_MAX_QUERIES positions (decoding steps, and a cached voice's
        2-position prefill) attend with `attend_math` instead of SDPA; longer prefills keep SDPA."""
        for layer in self.layers:
            layer.self_attn.math_steps = on
        return self

    def set_decode_attention(self, on: bool) -> "Trunk":
        """Calls of at most MATH_MAX_QUERIES positions attend with model/decode_attention.py's
        Triton kernel (CUDA; each row's keys up to its own last position) instead of SDPA. Heads
        the kernel does not handle (decode_attention.supports) keep SDPA."""
        for layer in self.layers:
            layer.self_attn.decode_kernel = on and supports(self.cfg.head_dim)
        return self

    def fuse(self) -> "Trunk":
        """Fuse q/k/v and gate/up projections of every layer (after the weights are loaded)."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def new_cache(self, rows: int, max_len: int, device, dtype) -> tuple[KVCache, RotaryTable]:
        return KVCache(self.cfg, rows, max_len, device, dtype), RotaryTable(
            self.cfg.rope, self.cfg.head_dim, max_len, device, dtype
        )

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache,
        rotary: RotaryTable,
        positions: torch.Tensor,
        key_len: int,
        row_start: int = 0,
        from_start: bool = False,
    ) -> torch.Tensor:
        """x [B, L, H] at `positions` [B, L] of cache rows row_start..row_start+B-1; returns post-norm
        states [B, L, H].

        Rows of a batch are contiguous (the engine keeps them so), so each layer works on a view
        of the cache. `key_len` bounds the keys read; the engine passes a host-side bucket at or
        above max position + 1 (no device sync), so a captured graph fits many steps.

        `from_start`: the caller's promise that every row's positions are 0..L-1 and key_len is L
        (a prompt's prefill). Attention is then SDPA's causal kind over the call's own keys and
        values, with no additive mask: that mask has rows x heads-per-kv-head x L^2 values (half a
        GiB for 2 prompts of 4096 positions) and forces a masked kernel that computes every key block.
        """
        b = x.shape[0]
        cos, sin = rotary.lookup(positions)
        if from_start and (key_len != x.shape[1] or positions.shape[1] != key_len):
            raise ValueError("from_start: positions must be 0..L-1 and key_len L")
        if from_start and not (x.is_cuda and x.dtype == torch.float32):
            mask = None
        else:  # made once per call for every layer (float32 on CUDA has no flash kernel: SDPA's
            #    math one would hold B x H x L^2 scores where the masked kernel does not)
            mask = causal_mask(positions, key_len, self.cfg.num_heads // self.cfg.num_kv_heads, x.dtype)
        rows = slice(row_start, row_start + b)
        run = compiled_layer() if self.compiled and not getattr(_EAGER, "on", False) else _run_layer
        masked_prefill = mask is not None and x.is_cuda and x.shape[1] > MATH_MAX_QUERIES and run is _run_layer
        with masked_prefill_kernels() if masked_prefill else contextlib.nullcontext():
            for i, layer in enumerate(self.layers):
                x = run(layer, x, cos, sin, cache.k[i, rows], cache.v[i, rows], positions, mask, key_len)
        return self.norm(x)


def masked_prefill_kernels():
    """SDPA's memory-efficient kernel (its math one where that does not apply) for a masked prefill
    (positions after a stored prefix; a prompt's prefill from position 0 has no mask but in float32).
    SDPA's first choice for a masked bf16 call on Hopper is cuDNN's kernel, which cost about 0.5 ms
    of host time per call, every call (18 ms of a 36-layer prefill whose GPU time was 7 ms: run 65
    of docs/benchmarks.md); the memory-efficient kernel takes the same additive mask. The choice is
    torch's process-wide setting for the call's duration: SDPA calls of other threads meanwhile (the
    audio tower in an in-process `ChromaPipeline`, not under Triton, where it is another process)
    get the same kernels, the same results up to rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def causal_mask(positions: torch.Tensor, key_len: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask `Attention` passes SDPA: query position positions[b, l] sees keys
    0..positions[b, l] of key_len; repeated per query head of a kv group (`group` heads), as
    Attention lays the heads out: [B, 1, group * L, key_len]."""
    allowed = torch.arange(key_len, device=positions.device)[None, None, :] <= positions[:, :, None]  # [B, L, key_len]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill_(~allowed, float("-inf"))
    return mask.unsqueeze(1).repeat(1, 1, group, 1)


def _run_layer(layer: DecoderLayer, x, cos, sin, k_cache, v_cache, positions, mask, key_len):
    return layer(x, cos, sin, k_cache, v_cache, positions, mask, key_len)


_EAGER = threading.local()


@contextmanager
def eager_layers(on: bool = True):
    """Inside this block (this thread), compiled trunks run their layers eagerly (`on`), or compiled
    again (`on=False`, inside an eager block). For prefills: their shapes change with every prompt,
    and compiling for a new one would stall the engine; the admission graphs' bucketed shapes are
    the exception (engine/prefill_graphs.py, `compiled_prefill_graphs`)."""
    before = getattr(_EAGER, "on", False)
    _EAGER.on = on
    try:
        yield
    finally:
        _EAGER.on = before


@functools.cache
def compiled_layer():
    """`_run_layer` under torch.compile, made once per process."""
    return compile_function(_run_layer)


COMPILE_RECOMPILE_LIMIT = 64


def compile_function(fn):
    """torch.compile with dynamic shapes and room for one graph per (trunk, shape class) before
    shapes turn dynamic. Not `fullgraph`: should a recompile limit ever be hit, dynamo then runs
    the function eagerly instead of failing the step."""
    import inspect

    import torch._dynamo

    kwargs = {}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # torch >= 2.12
        kwargs["recompile_limit"] = COMPILE_RECOMPILE_LIMIT
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, COMPILE_RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)
    return torch.compile(fn, dynamic=True, **kwargs)
