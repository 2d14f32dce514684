"""The thinker: Qwen2.5-Omni's language model, greedy, with post-norm hidden states.

`Thinker` is the small interface the engine talks to; `TorchThinker` implements it with plain
PyTorch over static caches (runs anywhere, CPU included). An SGLang-backed thinker can sit
beside it with the same three calls.

Why plain 1-D rope is exact here: Qwen2.5-Omni uses multimodal rope (three position streams
for time/height/width). For text and audio inputs (no image/video) transformers' `get_rope_index`
gives all three streams the same sequential positions, and mrope over equal streams is ordinary
rope. A test checks our outputs against transformers' own thinker.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..config import ThinkerConfig
from .gemv import linear
from .trunk import Trunk


class Thinker(Protocol):
    hidden_size: int

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (also the backbone's text embeddings)."""

    def prefill(self, row_start: int, prompts: list[tuple[torch.Tensor, torch.Tensor | None]],
                max_new_tokens: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run prompts (input ids, audio embeddings) into cache rows row_start.. in one batched call;
        return (each prompt's last post-norm state [P, H], greedy next ids [P]). `max_new_tokens`
        (optional, per prompt) bounds the reply tokens the engine will ask for; a thinker that
        generates ahead uses it, a lock-step one may ignore it."""

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, key_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row (rows 0..B-1) at its position; return (post-norm states [B, H],
        greedy ids [B]). `key_len` > every position. Pure tensor code: CUDA-graph capturable."""

    def move_row(self, src: int, dst: int) -> None:
        """Row `src`'s state now belongs at row `dst` (batch compaction)."""


def pad_batch(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[L_i, H] sequences -> right-padded [P, max L, H] and lengths [P]. Padding positions write
    keys/values past a row's end; they are overwritten before any query can attend to them."""
    lengths = torch.tensor([s.shape[0] for s in seqs], device=seqs[0].device)
    out = seqs[0].new_zeros(len(seqs), int(lengths.max()), seqs[0].shape[-1])
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out, lengths


class ThinkerLM(nn.Module):
    """Weights of the thinker's text model in transformers 4.5x naming (`model.*`, `lm_head`)."""

    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.model = Trunk(cfg.text)
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.text.hidden_size)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.vocab_size, bias=False)


class TorchThinker:
    def __init__(self, lm: ThinkerLM, cfg: ThinkerConfig, rows: int, max_len: int):
        self.lm, self.cfg = lm, cfg
        self.hidden_size = cfg.text.hidden_size
        self.max_len = max_len
        p = lm.lm_head.weight
        self.device = p.device
        self.cache, self.rotary = lm.model.new_cache(rows, max_len, p.device, p.dtype)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.model.embed_tokens(token_ids.to(self.device))

    def prompt_batch(self, prompts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (ids, audio embeddings) -> token embeddings with the audio tower's outputs in
        place of the <|AUDIO|> runs, right-padded [P, max L, H] (zeros past each
        prompt's end, as `pad_batch`) and lengths [P] on the device. Where the audio goes is
        worked out on the host, so this queues a handful of kernels for the whole batch and never
        waits for the device (it runs between steps the device is still computing, and every
        wait would also hand the GIL to the server's other threads)."""
        ids = [t.detach().reshape(-1).cpu() for t, _ in prompts]
        lengths = torch.tensor([t.shape[0] for t in ids])
        batch = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
        for i, t in enumerate(ids):
            batch[i, : t.shape[0]] = t
        valid = torch.arange(batch.shape[1])[None, :] < lengths[:, None]
        is_audio = (batch == self.cfg.audio_token_id) & valid
        pieces = []
        for i, (_ids, audio) in enumerate(prompts):
            n, got = int(is_audio[i].sum()), 0 if audio is None else audio.shape[0]
            if n != got:
                raise ValueError(f"prompt has {n} audio placeholder tokens but {got} audio embeddings")
            if n:
                pieces.append(audio.detach().reshape(n, -1))
        dev = self.device
        x = self.embed(batch.to(dev, non_blocking=True))
        x = x.masked_fill(~valid.to(dev, non_blocking=True)[..., None], 0)  # padding: zeros
        if pieces:  # flat positions of the audio tokens, in prompt order (each prompt's audio in order)
            where = is_audio.reshape(-1).nonzero().squeeze(1)
            if all(a.device.type == "cpu" for a in pieces):  # the served case: one copy for the batch
                audio = torch.cat([a.to(dtype=x.dtype) for a in pieces]).to(dev, non_blocking=True)
            else:
                audio = torch.cat([a.to(device=dev, dtype=x.dtype, non_blocking=True) for a in pieces])
            x.view(-1, x.shape[-1]).index_copy_(0, where.to(dev, non_blocking=True), audio)
        return x, lengths.to(dev, non_blocking=True)

    @torch.inference_mode()
    def prefill(self, row_start, prompts, max_new_tokens=None):
        x, lengths = self.prompt_batch(prompts)
        positions = torch.arange(x.shape[1], device=self.device).expand(x.shape[0], -1)
        h = self.lm.model(x, self.cache, self.rotary, positions, x.shape[1], row_start=row_start, from_start=True)
        last = h[torch.arange(len(prompts), device=self.device), lengths - 1]
        return last, self.greedy(last)

    @torch.inference_mode()
    def prefill_after(self, row_start, prompts, prefixes):
        """As `prefill`, for prompts whose first positions' keys and values are known:
        `prefixes[i]` (start, k, v), k and v [layers, kv_heads, >= start, head_dim], go into row
        row_start + i at positions 0..start-1, and only prompt i's positions from `start` on are
        embedded and computed, attending to them (engine/thinker_prefix.py). Rows are padded to
        the longest rest; padding writes keys past a prompt's end, as `pad_batch`'s does."""
        starts = [start for start, _, _ in prefixes]
        rests = self.rests(prompts, starts)
        for i, (start, k, v) in enumerate(prefixes):
            self.cache.k[:, row_start + i, :, :start].copy_(k[:, :, :start])
            self.cache.v[:, row_start + i, :, :start].copy_(v[:, :, :start])
        x, lengths = self.prompt_batch(rests)
        key_len = max(start + ids.numel() for start, (ids, _) in zip(starts, rests))
        positions = (torch.tensor(starts)[:, None] + torch.arange(x.shape[1])).clamp(max=self.max_len - 1)
        h = self.lm.model(x, self.cache, self.rotary, positions.to(self.device), key_len, row_start=row_start)
        last = h[torch.arange(len(prompts), device=self.device), lengths - 1]
        return last, self.greedy(last)

    def rests(self, prompts, starts: list[int]):
        """Each prompt's (ids, audio) from position `starts[i]` on: the part a prefill after a stored
        prefix computes (`prefill_after`, engine/prefix_rest_graphs.py)."""
        rests = []
        for (ids, audio), start in zip(prompts, starts):
            ids = ids.reshape(-1)
            if not 0 < start < ids.numel():
                raise ValueError("prefill_after: every prefix must leave at least one position of its prompt")
            if audio is not None:  # the audio rows of the positions from `start` on
                audio = audio.reshape(-1, audio.shape[-1])[int((ids[:start] == self.cfg.audio_token_id).sum()):]
            rests.append((ids[start:], audio))
        return rests

    def decode(self, tokens, positions, key_len):
        x = self.embed(tokens)[:, None]
        h = self.lm.model(x, self.cache, self.rotary, positions[:, None], key_len)[:, 0]
        return h, self.greedy(h)

    def move_row(self, src, dst):
        self.cache.move_row(src, dst)

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """Post-norm states [B, H] -> greedy next ids [B]."""
        return linear(h, self.lm.lm_head.weight).float().argmax(dim=-1)
