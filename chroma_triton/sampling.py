"""Batched temperature / top-k / top-p sampling with per-request, counter-based randomness.

Each request's noise is a pure function of (seed, frame, codebook, token id): a murmur3-style
integer hash evaluated with tensor ops. So a request draws the same codes whatever else shares
its batch (batch invariance), on CPU and GPU alike, with no generator objects and no host sync
(the exponential-race trick: argmax(p / E) with E ~ Exp(1) samples from p).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without int64 overflow (16-bit split of c)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def stream_keys(seeds: torch.Tensor, frames: torch.Tensor, codebook: int | torch.Tensor) -> torch.Tensor:
    """32-bit keys for (seed, frame, codebook); seeds/frames are int64 [B]. An int codebook gives
    keys [B]; a tensor of codebooks [K] gives all of a frame's keys at once, [B, K]."""
    if isinstance(codebook, torch.Tensor):
        seeds, frames = seeds[:, None], frames[:, None]
    k = mix32((seeds & _MASK32) ^ 0x3C6EF372)
    k = mix32(k ^ ((seeds >> 32) & _MASK32))
    return mix32(k ^ ((frames * 64 + codebook) & _MASK32))


def token_hashes(ids: torch.Tensor) -> torch.Tensor:
    """The per-token half of the noise hash; a table of it over the vocabulary saves work per step."""
    return mix32(ids * 0x9E3779B1 & _MASK32)


def token_noise(keys: torch.Tensor, ids: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """Exp(1) noise for token ids [B, n] of rows with keys [B]: -log(u), u uniform on (0, 1), 24 bits.
    A token's noise depends on (key, token id) only, not on where it sits in a sorted list.
    `table` (optional) is `token_hashes(arange(vocab))`."""
    h = mix32(keys[:, None] ^ (table[ids] if table is not None else token_hashes(ids)))
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(u)


def exponential_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Noise [B, vocab] for every token id."""
    ids = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    return token_noise(keys, ids[None, :].expand(keys.shape[0], vocab))


def segmented_topk(x: torch.Tensor, k: int, segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.topk(k, dim=-1)` for x [B, V], computed as the top k of each of `segments` slices of the
    vocabulary (in parallel), then the top k of those candidates. Every one of the k largest lies
    among its slice's k largest, so the values are the same; only which of several equal values
    at the k-th place is taken may differ (as it may between topk implementations). On a GPU a
    top-k over a long row runs in one thread block; slices spread it over several."""
    b, vocab = x.shape
    width = -(-vocab // max(segments, 1))
    if segments <= 1 or width < k:
        return x.topk(k, dim=-1)
    padded = torch.nn.functional.pad(x, (0, width * segments - vocab), value=float("-inf"))
    values, ids = padded.view(b, segments, width).topk(k, dim=-1, sorted=False)
    ids = ids + torch.arange(segments, device=x.device)[None, :, None] * width
    best, pick = values.reshape(b, segments * k).topk(k, dim=-1)
    # a padding slot can be picked only if -inf logits tie with it (then its probability is 0):
    # keep its id a real one, which the noise table can index
    return best, ids.reshape(b, segments * k).gather(1, pick).clamp_(max=vocab - 1)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    keys: torch.Tensor,
    k_max: int | None = None,
    token_table: torch.Tensor | None = None,
    segments: int = 1,
) -> torch.Tensor:
    """Sample one id per row.

    logits [B, V]; temperature [B] float (<= 0 means greedy); top_k [B] int (<= 0 or >= V: off);
    top_p [B] float in (0, 1]; keys [B] from `stream_keys`. Order as in transformers:
    temperature, then top-k, then top-p over what is left. `k_max`, when given, is a bound on
    every row's top_k: only the k_max best candidates are ranked (`topk` instead of a full sort).
    `token_table` is an optional precomputed `token_hashes(arange(V))`. `segments` > 1 finds
    those k_max candidates in two rounds (`segmented_topk`).
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    if k_max is not None and k_max < vocab:
        sorted_logits, order = segmented_topk(scaled, k_max, segments)
    else:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(order.shape[-1], device=logits.device)[None, :]
    k = torch.where((top_k <= 0) | (top_k > vocab), torch.full_like(top_k, vocab), top_k)
    keep = ranks < k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep = keep & (mass_before < top_p[:, None])
    keep[:, 0] = True
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    noise = token_noise(keys, order, token_table)  # noise belongs to the token id, not the rank
    choice = torch.argmax(probs / noise, dim=-1)
    sampled = order.gather(1, choice[:, None]).squeeze(1)
    return torch.where(greedy, order[:, 0], sampled)
