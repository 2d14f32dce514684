"""Checks of the project's Triton kernels against PyTorch: the fused sampler
(chroma_triton/sampling_kernel.py) against sampling.sample, and the single-row product
(chroma_triton/model/gemv.py) against F.linear. Shared by tests/test_triton_kernels.py (CPU: run as
a script under Triton's interpreter, which must be switched on before the kernels are defined)
and tests/test_gpu.py (compiled, on a GPU)."""

from __future__ import annotations

import sys

import torch

from chroma_triton.model.decode_attention import decode_attention_op
from chroma_triton.model.gemv import gemv_op
from chroma_triton.model.trunk import causal_mask
from chroma_triton.sampling import sample, stream_keys, token_hashes
from chroma_triton.sampling_kernel import fused_sample

VOCAB = 2051  # the audio vocabulary of Chroma's codebooks


def _params(rows: int, seed: int):
    """Every kind of row: greedy, top-k off / 1 / V-1 / V / beyond V, top-p on and off."""
    g = torch.Generator().manual_seed(seed)
    temperature = torch.rand(rows, generator=g) * 1.5 + 0.05
    temperature[:4] = 0.0
    temperature[4:12] = 1.0
    top_k = torch.randint(1, 100, (rows,), generator=g)
    top_k[12:16], top_k[16:20], top_k[20:24], top_k[24:28], top_k[28:32] = 0, 1, VOCAB - 1, VOCAB, VOCAB + 7
    top_p = torch.rand(rows, generator=g) * 0.9 + 0.05
    top_p[::2] = 1.0
    keys = stream_keys(torch.arange(rows) + 1000 * seed, torch.full((rows,), 3), 5)
    return temperature, top_k, top_p, keys


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


def agreement_with_pytorch(device: str, rows: int = 128, seed: int = 0) -> float:
    """Share of rows where both samplers pick the same token, for float32 logits (no ties)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=g) * torch.linspace(0.05, 8.0, rows)[:, None]
    temperature, top_k, top_p, keys = _params(rows, seed)
    args = _to(device, logits, temperature, top_k, top_p, keys)
    table = token_hashes(torch.arange(VOCAB, device=device))
    want = sample(*args, None, table)
    got = fused_sample(*args, token_table=table)
    return (want == got).float().mean().item()


def violations(device: str, rows: int = 128, seed: int = 1) -> list[str]:
    """Rows whose token lies outside what sampling allows, for bf16 logits (many ties): a greedy row
    not on a maximum, a token below the k-th largest scaled logit, or one with as much mass ranked
    above it as top_p (tied tokens ranked by id, as the kernel ranks them)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, VOCAB, generator=g) * torch.linspace(0.05, 8.0, rows)[:, None]).bfloat16()
    temperature, top_k, top_p, keys = _params(rows, seed)
    got = fused_sample(*_to(device, logits, temperature, top_k, top_p, keys)).cpu()
    bad = []
    for r in range(rows):
        scaled = logits[r].float() / (temperature[r] if temperature[r] > 0 else 1.0)
        x = scaled[got[r]]
        if temperature[r] <= 0:
            if x != scaled.max():
                bad.append(f"row {r}: greedy token {int(got[r])} is not a maximum")
            continue
        k = int(top_k[r]) if 0 < top_k[r] <= VOCAB else VOCAB
        kth = scaled.sort(descending=True).values[k - 1]
        if x < kth:
            bad.append(f"row {r}: token {int(got[r])} below the {k}-th largest logit")
        kept = scaled >= kth
        probs = torch.softmax(scaled.masked_fill(~kept, float("-inf")), dim=0)
        # ranked above: every larger logit, and the tied ones with lower ids (the kernel's rank order)
        tied_before = int((kept & (scaled == x) & (torch.arange(VOCAB) < got[r])).sum())
        above = probs[kept & (scaled > x)].sum() + tied_before * probs[got[r]]
        if above >= top_p[r] and top_p[r] < 1:
            bad.append(f"row {r}: mass {float(above):.4f} ranked above token {int(got[r])} >= top_p {float(top_p[r]):.4f}")
    return bad


def top_p_ties(device: str, draws: int = 400) -> tuple[list[int], list[int]]:
    """Tokens drawn (sorted, distinct) by sampling.sample and by the kernel for one row whose top_p
    cut falls inside a group of tied logits (four equal ones, each about a quarter of the mass,
    top_p 0.5): both keep the tied tokens one by one in rank order, so both draw 3 distinct tokens
    (PyTorch's order among the tied ones is unspecified, the kernel's is lowest ids first)."""
    vocab = 8
    logits = torch.tensor([2.0, 2.0, 2.0, 2.0] + [-10.0] * (vocab - 4)).expand(draws, vocab).contiguous()
    temperature, top_k, top_p = torch.ones(draws), torch.zeros(draws, dtype=torch.long), torch.full((draws,), 0.5)
    keys = stream_keys(torch.arange(draws), torch.zeros(draws, dtype=torch.long), 0)
    want = sample(logits, temperature, top_k, top_p, keys)
    got = fused_sample(*_to(device, logits, temperature, top_k, top_p, keys)).cpu()
    return sorted(set(want.tolist())), sorted(set(got.tolist()))


def follows_the_distribution(device: str, draws: int = 4000) -> float:
    """Largest gap between the kernel's token frequencies and the probabilities sampling allows,
    for one row (temperature 0.8, top_k 6, top_p 0.9) drawn with `draws` different keys."""
    logits = torch.tensor([3.0, 2.5, 2.4, 1.0, 0.5, 0.4, 0.3] + [-1.0] * (VOCAB - 7))
    temperature, top_k, top_p = torch.full((draws,), 0.8), torch.full((draws,), 6), torch.full((draws,), 0.9)
    keys = stream_keys(torch.arange(draws), torch.zeros(draws, dtype=torch.long), 0)
    got = fused_sample(*_to(device, logits.expand(draws, VOCAB).contiguous(), temperature, top_k, top_p, keys)).cpu()
    probs = torch.softmax(logits[:6] / 0.8, dim=0)
    keep = (probs.cumsum(0) - probs) < 0.9
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum()
    freq = torch.bincount(got, minlength=VOCAB)[:6].float() / draws
    assert int(torch.bincount(got, minlength=VOCAB)[6:].sum()) == 0, "a token outside the top k"
    return float((freq - probs).abs().max())


def gemv_errors(device: str, dtype=torch.float32, shapes=((1, 96, 200, True), (1, 1024, 512, False),
                                                         (3, 40, 700, True), (1, 5, 4096, False))) -> list[float]:
    """Largest |gemv - F.linear| relative to the largest |F.linear| for (rows, out, in, bias) shapes:
    uneven sizes (masks), a bias, several rows."""
    g = torch.Generator().manual_seed(2)
    errors = []
    for rows, n, k, bias in shapes:
        x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5
        b = torch.randn(n, generator=g) if bias else None
        x, w, b = (t.to(device, dtype) if t is not None else None for t in (x, w, b))
        want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
        got = gemv_op(x, w, b).float()
        errors.append(float((got - want).abs().max() / want.abs().max()))
    return errors


def decode_attention_errors(device: str, dtype=torch.float32,
                            cases=((3, 2, 4, 1, 64, 300), (2, 8, 4, 3, 64, 200), (1, 2, 8, 1, 128, 70),
                                   (2, 2, 4, 2, 128, 9))) -> list[float]:
    """Largest |decode_attention - masked SDPA| relative to the largest |SDPA| for (rows, kv heads,
    heads per kv head, new positions, head dim, cache length) cases, as trunk.Attention lays them
    out: rows of different lengths (one shorter than a key slice, one not a multiple of it),
    several new positions per row (causal among them), grouped query heads."""
    g = torch.Generator().manual_seed(3)
    errors = []
    for b, kvh, group, length, d, t in cases:
        q = torch.randn(b, kvh, group * length, d, generator=g)
        k, v = torch.randn(b, kvh, t, d, generator=g), torch.randn(b, kvh, t, d, generator=g)
        last = torch.randint(length - 1, t, (b,), generator=g)
        last[0] = min(t - 1, length + 5)
        positions = last[:, None] - length + 1 + torch.arange(length)  # [b, L], ascending
        mask = causal_mask(positions, t, group, torch.float32)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        q, k, v = (x.to(device, dtype) for x in (q, k, v))
        got = decode_attention_op(q, k, v, positions.to(device)).float().cpu()
        errors.append(float((got - want).abs().max() / want.abs().max()))
    return errors


def trunk_step_outputs(device: str, dtype=torch.float32) -> list[torch.Tensor]:
    """A small trunk's outputs for decoding steps of 1 and 3 positions with its rows at different
    lengths, attending by SDPA and by decode_attention (trunk.set_decode_attention)."""
    from test_trunk_attention import _trunk

    outs = []
    for kernel in (False, True):
        trunk = _trunk(device, dtype).set_decode_attention(kernel)
        cache, rotary = trunk.new_cache(4, 300, device, dtype)
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            trunk(torch.randn(4, 200, 64, device=device, dtype=dtype, generator=g), cache, rotary,
                  torch.arange(200, device=device)[None].repeat(4, 1), key_len=200)
            got = []
            for width, starts in ((3, (120, 150, 197, 200)), (1, (123, 153, 200, 203))):
                pos = torch.tensor(starts, device=device)[:, None] + torch.arange(width, device=device)
                x = torch.randn(4, width, 64, device=device, dtype=dtype, generator=g)
                got.append(trunk(x, cache, rotary, pos, key_len=256).float())
        outs.append(torch.cat([o.flatten(1) for o in got], dim=1))
    return outs


def trunk_step_error(device: str, dtype=torch.float32) -> float:
    sdpa, kernel = trunk_step_outputs(device, dtype)
    return float((kernel - sdpa).abs().max() / sdpa.abs().max())


if __name__ == "__main__":  # the CPU test: python tests/kernel_checks.py under TRITON_INTERPRET=1
    rate = agreement_with_pytorch("cpu")
    bad = violations("cpu")
    worst = max(gemv_errors("cpu"))
    want, got = top_p_ties("cpu")
    attention = max(decode_attention_errors("cpu"))
    attention_bf16 = max(decode_attention_errors("cpu", torch.bfloat16))
    trunk_error = trunk_step_error("cpu")
    print(f"agreement {rate:.4f}; violations {len(bad)}; gemv error {worst:.2e}; "
          f"top-p tie tokens {want} / {got}; decode attention error {attention:.2e} (bf16 {attention_bf16:.2e}, "
          f"trunk steps {trunk_error:.2e})")  # (distribution: GPU only)
    for line in bad[:10]:
        print(line)
    sys.exit(0 if rate == 1.0 and not bad and worst < 1e-5 and len(want) == len(got) == 3 and got == [0, 1, 2]
             and attention < 1e-5 and attention_bf16 < 2e-2 and trunk_error < 1e-5 else 1)
