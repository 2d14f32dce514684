"""The explicit-matmul attention of decoding steps (`math_attention`) against SDPA."""

from __future__ import annotations


import pytest
import torch

from chroma_triton.config import RopeConfig, TrunkConfig
from chroma_triton.model.trunk import Trunk, attend_math


def test_attend_math_is_sdpa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 8, 16, generator=g)
    k = torch.randn(3, 2, 40, 16, generator=g)
    v = torch.randn(3, 2, 40, 16, generator=g)
    allowed = torch.arange(40)[None, None, None, :] <= torch.tensor([5, 17, 39])[:, None, None, None]
    mask = torch.zeros(3, 1, 8, 40).masked_fill(~allowed, float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attend_math(q, k, v, mask), ref, rtol=1e-5, atol=1e-6)


def _trunk(device="cpu", dtype=torch.float32) -> Trunk:
    """A small fused trunk (q/k/v and gate/up fused after moving: the fused matrices are plain
    tensors, not parameters, so `.to()` would not move them)."""
    torch.manual_seed(0)
    cfg = TrunkConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=128, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
                      max_position_embeddings=64, qkv_bias=True)
    trunk = Trunk(cfg)
    for p in trunk.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return trunk.to(device, dtype).fuse()


def test_math_attention_steps_match_sdpa_and_prefills_keep_sdpa():
    """A prefill then three decoding steps (widths 1 and 3) on two rows: the same states and caches
    with and without math attention; prompts longer than a step still go through SDPA."""
    plain, math = _trunk(), _trunk()
    math.set_math_attention(True)
    outs = {}
    for name, trunk in (("plain", plain), ("math", math)):
        cache, rotary = trunk.new_cache(2, 32, "cpu", torch.float32)
        g = torch.Generator().manual_seed(1)
        pos = torch.arange(9)[None].repeat(2, 1)
        seen = [trunk(torch.randn(2, 9, 64, generator=g), cache, rotary, pos, key_len=9)]
        for step, width in enumerate((1, 3, 1)):
            start = 9 + step * 3
            pos = start + torch.arange(width)[None].repeat(2, 1)
            seen.append(trunk(torch.randn(2, width, 64, generator=g), cache, rotary, pos, key_len=start + width))
        outs[name] = (seen, cache.k.clone(), cache.v.clone())
    for a, b in zip(outs["plain"][0], outs["math"][0]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["math"][1], outs["plain"][1], rtol=1e-5, atol=1e-5)
    called = []
    orig = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        called.append(args[0].shape[2])
        return orig(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        cache, rotary = math.new_cache(1, 32, "cpu", torch.float32)
        math(torch.randn(1, 9, 64), cache, rotary, torch.arange(9)[None], key_len=9)  # a prefill: SDPA
        math(torch.randn(1, 1, 64), cache, rotary, torch.tensor([[9]]), key_len=10)  # a step: no SDPA
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    assert called == [2 * 9, 2 * 9], called  # each layer's prefill; the step used attend_math


def test_prefill_from_start_matches_the_masked_prefill():
    """`from_start` (a prompt's prefill: causal SDPA over the call's own keys, no mask) gives the
    masked prefill's states and cache rows, for rows of one padded length written at row_start;
    steps after it read those keys as before. Misuse (key_len not L) is refused."""
    trunk = _trunk()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 11, 64, generator=g)
    step = torch.randn(3, 1, 64, generator=g)
    pos = torch.arange(11)[None].repeat(3, 1)
    outs = {}
    for from_start in (False, True):
        cache, rotary = trunk.new_cache(5, 32, "cpu", torch.float32)
        h = trunk(x, cache, rotary, pos, key_len=11, row_start=1, from_start=from_start)
        after = trunk(step, cache, rotary, torch.full((3, 1), 11), key_len=12, row_start=1)
        outs[from_start] = (h, after, cache.k.clone(), cache.v.clone())
    for masked, causal in zip(outs[False], outs[True]):
        torch.testing.assert_close(causal, masked, rtol=1e-5, atol=1e-5)
    assert outs[True][2][:, 0].abs().sum() == 0 and outs[True][2][:, 4].abs().sum() == 0  # other rows untouched
    cache, rotary = trunk.new_cache(3, 32, "cpu", torch.float32)
    with pytest.raises(ValueError, match="from_start"):
        trunk(x, cache, rotary, pos, key_len=16, from_start=True)
