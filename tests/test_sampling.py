from __future__ import annotations

import torch

from chroma_triton.sampling import exponential_noise, sample, stream_keys


def _params(b, temperature=1.0, top_k=0, top_p=1.0):
    return (torch.full((b,), temperature), torch.full((b,), top_k, dtype=torch.long), torch.full((b,), top_p))


def test_samples_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    keys = stream_keys(torch.arange(20000), torch.zeros(20000, dtype=torch.long), 0)
    ids = sample(logits, *_params(20000), keys)
    freq = torch.bincount(ids, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.015, rtol=0)


def test_temperature_top_k_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    keys = stream_keys(torch.arange(4000), torch.zeros(4000, dtype=torch.long), 0)
    assert set(sample(logits, *_params(4000, top_k=2), keys).tolist()) == {0, 1}
    p = torch.softmax(logits[0], -1)  # [0.636, 0.234, 0.086, ...]
    assert set(sample(logits, *_params(4000, top_p=0.8), keys).tolist()) == {0, 1}
    assert set(sample(logits, *_params(4000, top_p=float(p[0]) - 0.01), keys).tolist()) == {0}
    assert set(sample(logits, *_params(4000, temperature=0.0), keys).tolist()) == {0}
    hot = torch.bincount(sample(logits, *_params(4000, temperature=5.0), keys), minlength=5)
    assert (hot > 300).all(), "high temperature flattens the distribution"


def test_noise_depends_only_on_seed_frame_codebook():
    seeds = torch.tensor([1, 2, 1, 2**62 + 5])
    frames = torch.tensor([0, 0, 0, 7])
    k = stream_keys(seeds, frames, 3)
    assert k[0] == k[2] and k[0] != k[1]
    assert stream_keys(seeds, frames, 4)[0] != k[0]
    assert stream_keys(seeds, frames + 1, 3)[0] != k[0]
    n = exponential_noise(k, 50)
    assert torch.equal(n[0], n[2]) and (n > 0).all()
    alone = exponential_noise(k[3:], 50)
    assert torch.equal(alone[0], n[3]), "a row's noise does not depend on its batch"


def _random_rows(seed: int, rows: int, vocab: int, max_top_k: int):
    """logits [rows, vocab], temperature, top_k, top_p, keys: varied per row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    keys = stream_keys(torch.arange(rows), torch.zeros(rows, dtype=torch.long), seed)
    top_k = torch.randint(1, max_top_k, (rows,), generator=g)
    top_p = torch.rand(rows, generator=g).clamp_min(0.05)
    temperature = torch.rand(rows, generator=g) + 0.2
    return logits, temperature, top_k, top_p, keys


def test_topk_bound_gives_the_full_sort_result():
    logits, temperature, top_k, top_p, keys = _random_rows(1, 512, 300, 50)
    full = sample(logits, temperature, top_k, top_p, keys)
    bounded = sample(logits, temperature, top_k, top_p, keys, k_max=64)
    assert torch.equal(full, bounded)


def test_all_codebook_keys_at_once_match_one_by_one():
    seeds, frames = torch.tensor([3, 2**40 + 1]), torch.tensor([0, 99])
    together = stream_keys(seeds, frames, torch.arange(8))
    for k in range(8):
        assert torch.equal(together[:, k], stream_keys(seeds, frames, k))


def test_segmented_topk_finds_the_same_candidates():
    from chroma_triton.sampling import segmented_topk

    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 2051, generator=g) * 4  # the audio vocabulary's width: slices padded at the end
    for segments in (1, 2, 8, 32, 100):  # 100 slices of 21 < k: falls back to one topk
        values, ids = segmented_topk(x, 64, segments)
        ref_values, ref_ids = x.topk(64, dim=-1)
        assert torch.equal(values, ref_values) and torch.equal(ids, ref_ids), segments
    x[:, -3:] = 100.0  # the best candidates in the padded last slice
    assert set(segmented_topk(x, 5, 8)[1][0, :3].tolist()) == {2048, 2049, 2050}


def test_sampling_with_segmented_topk_draws_the_same_ids():
    logits, temperature, top_k, top_p, keys = _random_rows(2, 256, 2051, 60)
    plain = sample(logits, temperature, top_k, top_p, keys, k_max=64)
    assert torch.equal(sample(logits, temperature, top_k, top_p, keys, k_max=64, segments=8), plain)


def test_segmented_topk_never_returns_a_padding_id():
    """-inf logits (e.g. a vanishing temperature) tie with the padding: ids stay in the vocabulary."""
    from chroma_triton.sampling import segmented_topk

    x = torch.full((2, 39), float("-inf"))
    x[:, :3] = torch.tensor([3.0, 2.0, 1.0])
    values, ids = segmented_topk(x, 4, 5)  # slices of 8: one padding slot
    assert ids.max() < 39 and values[:, :3].tolist() == [[3.0, 2.0, 1.0]] * 2
