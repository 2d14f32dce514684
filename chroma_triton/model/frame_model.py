"""Backbone + depth decoder: one audio frame (all codebooks) per step, for a batch of requests.

Backbone (Llama-3 trunk over embeddings) predicts codebook 0 from its last state; the depth
decoder then predicts codebooks 1..K-1 from [projection(backbone state), projection(embed(c0)),
...], with a fresh short cache every frame ("the decoder cache is reset every frame").
The audio embedding table is shared: codebook k, code c is row k * audio_vocab + c.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..config import ChromaConfig
from ..sampling import sample, stream_keys, token_hashes
from ..sampling_kernel import fused_sample
from .gemv import linear
from .trunk import KVCache, RotaryTable, Trunk, compile_function


class AudioEmbedding(nn.Module):
    def __init__(self, num_codebooks: int, audio_vocab: int, dim: int):
        super().__init__()
        self.embed_audio_tokens = nn.Embedding(num_codebooks * audio_vocab, dim)
        self.audio_vocab = audio_vocab

    def codebook(self, codes: torch.Tensor, k: int) -> torch.Tensor:
        """codes [...] of codebook k -> [..., dim]."""
        return self.embed_audio_tokens(codes + k * self.audio_vocab)

    def frame(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., K] -> summed frame embedding [..., dim]."""
        offsets = torch.arange(codes.shape[-1], device=codes.device) * self.audio_vocab
        return self.embed_audio_tokens(codes + offsets).sum(dim=-2)


class Backbone(nn.Module):
    def __init__(self, cfg: ChromaConfig):
        super().__init__()
        bb = cfg.backbone
        self.model = Trunk(bb.trunk)
        self.codebook0_head = nn.Linear(bb.trunk.hidden_size, bb.audio_vocab_size, bias=False)
        self.audio_embedding = AudioEmbedding(cfg.num_codebooks, bb.audio_vocab_size, bb.trunk.hidden_size)


class DepthDecoder(nn.Module):
    def __init__(self, cfg: ChromaConfig):
        super().__init__()
        dec = cfg.decoder
        self.projection = nn.Linear(dec.audio_embedding_dim, dec.trunk.hidden_size, bias=False)
        self.model = Trunk(dec.trunk)
        self.codebook_head = CodebookHeads(cfg.num_codebooks - 1, dec.trunk.hidden_size, dec.audio_vocab_size)


class CodebookHeads(nn.Module):
    """weight [K-1, hidden, vocab]: codebook k (1..K-1) uses weight[k-1]."""

    def __init__(self, heads: int, hidden: int, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, hidden, vocab))


class SamplingTensors:
    """Per-row sampling settings as device tensors (shape [B]) for one batched step, and `k_max`,
    a host-side bound on every row's top_k (None: some row samples from the whole vocabulary)."""

    def __init__(self, temperature, top_k, top_p, seeds, frames, k_max: int | None = None):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.seeds, self.frames = seeds, frames
        self.k_max = k_max


class FrameModel(nn.Module):
    """Owns backbone and decoder weights and their static caches; does one frame per call."""

    def __init__(self, cfg: ChromaConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.decoder = DepthDecoder(cfg)
        self.num_codebooks = cfg.num_codebooks
        self.backbone_cache: KVCache | None = None
        self.backbone_rotary: RotaryTable | None = None
        self._sampler = sample
        self.topk_segments = 1  # > 1: sampling's top-k in two rounds over vocabulary slices (sampling.segmented_topk)
        self.fused_sampling = False  # True: sampling by one Triton kernel per call (sampling_kernel.py; CUDA)

    def set_compiled(self, on: bool) -> "FrameModel":
        """torch.compile the backbone's and decoder's layers and the sampling chain (see
        Trunk.set_compiled); off restores the eager code."""
        self.backbone.model.set_compiled(on)
        self.decoder.model.set_compiled(on)
        self._sampler = compiled_sample() if on else sample
        return self

    # -- caches -------------------------------------------------------------------------------
    def setup_caches(self, rows: int, backbone_len: int) -> None:
        p = self.backbone.codebook0_head.weight
        self.backbone_cache, self.backbone_rotary = self.backbone.model.new_cache(rows, backbone_len, p.device, p.dtype)
        # decoder positions: backbone state, then codebooks 0..K-2
        self.decoder_cache, self.decoder_rotary = self.decoder.model.new_cache(rows, self.num_codebooks, p.device, p.dtype)
        vocab = self.backbone.codebook0_head.weight.shape[0]
        self.token_table = token_hashes(torch.arange(vocab, device=p.device))
        self.codebook_ids = torch.arange(self.num_codebooks, device=p.device)

    # -- embeddings ---------------------------------------------------------------------------
    def frame_embedding(self, codes: torch.Tensor) -> torch.Tensor:
        return self.backbone.audio_embedding.frame(codes)

    # -- backbone -----------------------------------------------------------------------------
    def backbone_step(self, x: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, key_len: int, row_start: int = 0,
                      from_start: bool = False):
        """x [B, L, H] at positions [B, L] of rows row_start..; returns the state at index `last` [B]
        of each row: [B, H]. `from_start`: a prompt's prefill (see Trunk.forward)."""
        h = self.backbone.model(x, self.backbone_cache, self.backbone_rotary, positions, key_len, row_start,
                                from_start=from_start)
        return h[torch.arange(h.shape[0], device=h.device), last]

    def move_row(self, src: int, dst: int) -> None:
        self.backbone_cache.move_row(src, dst)

    # -- one frame ----------------------------------------------------------------------------
    def sample_frame(self, state: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
        """Backbone last states [B, H] of rows 0..B-1 -> codes [B, K] (codebook 0 by the backbone
        head, the rest by the depth decoder). Pure tensor code: CUDA-graph capturable."""
        b = state.shape[0]
        keys = stream_keys(params.seeds, params.frames, self.codebook_ids)  # [B, K]: the frame's noise keys
        codes = torch.empty(b, self.num_codebooks, dtype=torch.long, device=state.device)
        codes[:, 0] = self._sample(linear(state, self.backbone.codebook0_head.weight), params, keys[:, 0])
        emb = self.backbone.audio_embedding
        x = self.decoder.projection(torch.stack([state, emb.codebook(codes[:, 0], 0)], dim=1))  # [B, 2, Hd]
        positions = torch.arange(2, device=state.device).expand(b, 2)
        for k in range(1, self.num_codebooks):
            h = self.decoder.model(x, self.decoder_cache, self.decoder_rotary, positions, k + 1)
            logits = h[:, -1] @ self.decoder.codebook_head.weight[k - 1]
            codes[:, k] = self._sample(logits, params, keys[:, k])
            if k + 1 < self.num_codebooks:
                x = linear(emb.codebook(codes[:, k], k), self.decoder.projection.weight)[:, None]
                positions = positions[:, -1:] + 1
        return codes

    def _sample(self, logits: torch.Tensor, p: SamplingTensors, keys: torch.Tensor) -> torch.Tensor:
        if self.fused_sampling:
            return fused_sample(logits, p.temperature, p.top_k, p.top_p, keys, token_table=self.token_table)
        return self._sampler(logits, p.temperature, p.top_k, p.top_p, keys, p.k_max, self.token_table,
                             self.topk_segments)


@functools.cache
def compiled_sample():
    """`sample` under torch.compile, made once per process."""
    return compile_function(sample)
