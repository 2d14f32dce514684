"""The Qwen2.5-Omni audio tower as one batched, fixed-shape computation over windows.

The tower cuts each clip's log-mel into windows of ``2 * n_window`` frames (the last one shorter);
its convolutions, positional embedding and attention all stay inside a window, and its final
pairwise average pooling never straddles two windows (a full window holds an even number of
tokens). transformers' module processes the windows as one ragged sequence: per layer it splits
the attention window by window with lengths read back from the GPU, a few dozen host syncs and
hundreds of small launches per forward. Here every window is a row of a padded batch
``[windows, 2 * n_window frames]``: padded frames are zeroed after the first convolution (as the
module does), attention masks padded keys, pooling runs per row, and the valid pooled rows are
gathered at the end. The arithmetic uses the module's own weights; the shapes depend only on the
number of windows, so a CUDA graph per window-count bucket can hold the whole forward.

``tests/test_audio_tower_chunks.py`` checks the embeddings against the module's forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def window_plan(frame_counts: list[int], window: int) -> list[tuple[int, int, int]]:
    """(clip index, first frame, frames) of every window of every clip, in order."""
    plan = []
    for clip, frames in enumerate(frame_counts):
        for start in range(0, frames, window):
            plan.append((clip, start, min(window, frames - start)))
    return plan


class ChunkedAudioTower:
    """``__call__(feats [W, mels, window], frame_mask [W, window], token_mask [W, window // 2])``
    -> pooled embeddings ``[W, window // 4, output_dim]`` for every window row (valid or not);
    :meth:`pack` builds those inputs from clips and :meth:`unpack` keeps each clip's valid rows."""

    def __init__(self, module: nn.Module):
        self.m = module
        if int(module.n_window) % 2:
            # a full window then holds an odd number of tokens and the module's pooling pairs
            # straddle windows: per-window pooling would not match
            raise ValueError(f"the windowed audio tower needs an even n_window, got {module.n_window}")
        self.window = 2 * int(module.n_window)
        self.tokens = (self.window - 1) // 2 + 1  # after the stride-2 convolution
        self.pooled = self.tokens // 2
        self.heads = module.layers[0].self_attn.num_heads
        p = next(module.parameters())
        self.device, self.dtype = p.device, p.dtype

    # -- host side: clips <-> window rows ------------------------------------------------------------
    def pack(self, feats: list[torch.Tensor], rows: int | None = None):
        """Clips' log-mels ``[mels, frames]`` -> the three inputs, padded to ``rows`` windows."""
        plan = window_plan([f.shape[-1] for f in feats], self.window)
        rows = rows or len(plan)
        mels = feats[0].shape[0]
        x = torch.zeros(rows, mels, self.window, dtype=self.dtype)
        frame_mask = torch.zeros(rows, self.window, dtype=torch.bool)
        token_mask = torch.zeros(rows, self.tokens, dtype=torch.bool)
        for row, (clip, start, frames) in enumerate(plan):
            x[row, :, :frames] = feats[clip][:, start:start + frames]
            frame_mask[row, :frames] = True
            token_mask[row, :(frames - 1) // 2 + 1] = True
        dev = self.device
        return x.to(dev, non_blocking=True), frame_mask.to(dev, non_blocking=True), token_mask.to(dev, non_blocking=True)

    def unpack(self, pooled: torch.Tensor, frame_counts: list[int]) -> list[torch.Tensor]:
        """Each clip's embeddings ``[tokens, output_dim]`` from the per-window rows."""
        plan = window_plan(frame_counts, self.window)
        index = []
        for row, (_, _, frames) in enumerate(plan):
            index.extend(range(row * self.pooled, row * self.pooled + ((frames - 1) // 2 + 1) // 2))
        flat = pooled.reshape(-1, pooled.shape[-1])
        out = flat.index_select(0, torch.tensor(index, dtype=torch.long).to(flat.device, non_blocking=True))
        counts = [0] * len(frame_counts)
        for clip, _, frames in plan:
            counts[clip] += ((frames - 1) // 2 + 1) // 2
        return list(torch.split(out, counts))

    # -- device side: fixed shapes, no host reads -----------------------------------------------------
    def __call__(self, x: torch.Tensor, frame_mask: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        m = self.m
        h = F.gelu(m.conv1(x)) * frame_mask[:, None, :].to(x.dtype)
        h = F.gelu(m.conv2(h)).transpose(1, 2)  # [W, tokens, d]
        h = h + m.positional_embedding.positional_embedding[: h.shape[1]].to(h.dtype)
        keys = token_mask[:, None, None, :]  # attend to a window's real tokens only
        for layer in m.layers:
            h = self._layer(layer, h, keys)
        rows, tokens, dim = h.shape
        h = h[:, : 2 * self.pooled].reshape(rows, self.pooled, 2, dim).mean(dim=2)
        return m.proj(m.ln_post(h))

    def _layer(self, layer: nn.Module, h: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        rows, tokens, dim = h.shape
        y = layer.self_attn_layer_norm(h)

        def heads(t):
            return t.view(rows, tokens, self.heads, -1).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(attn.q_proj(y)), heads(attn.k_proj(y)), heads(attn.v_proj(y)),
                                           attn_mask=keys, scale=attn.scaling)
        h = h + attn.out_proj(o.transpose(1, 2).reshape(rows, tokens, dim))
        y = layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(h))))
        h = h + y
        if h.dtype == torch.float16:  # the module clamps fp16 activations the same way
            bound = torch.finfo(h.dtype).max - 1000
            h = h.clamp(-bound, bound)
        return h
