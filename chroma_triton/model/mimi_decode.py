"""Mimi's decode path (codes -> waveform) without host synchronisation, so a CUDA graph can hold it.

transformers' ``MimiModel.decode`` computes every causal convolution's padding from tensors kept
on the model's device (``MimiConv1d._get_extra_padding_for_conv1d``), so each of the SEANet
decoder's convolutions reads a number back from the GPU: a dozen host syncs per decode. They make
the decode impossible to capture in a CUDA graph, and when another process keeps the GPU busy
each sync waits for a time slice of its own. Here the same modules run with their paddings
computed on the host from the shapes alone, and the decoder transformer gets its causal
sliding-window mask and rotary table from shapes too. The weights and the arithmetic are
transformers' own (the same submodules are called); only the bookkeeping moves to the host.

``tests/test_mimi_decode.py`` checks the result against ``MimiModel.decode`` and checks the
absence of host reads by running the whole decode on the ``meta`` device, where any read of a
tensor's value raises.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv1d_paddings(conv: nn.Module, length: int) -> tuple[int, int]:
    """(left, right) padding ``MimiConv1d.forward`` applies to an input of ``length`` steps."""
    c = conv.conv
    kernel = (c.kernel_size[0] - 1) * c.dilation[0] + 1
    stride = c.stride[0]
    total = kernel - stride
    frames = -(-(length - kernel + total) // stride)  # ceil((length - kernel + total) / stride + 1) - 1
    extra = frames * stride + kernel - total - length
    if conv.causal:
        return total, extra
    right = total // 2
    return total - right, right + extra


def _conv1d(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    left, right = _conv1d_paddings(conv, x.shape[-1])
    return conv.conv(conv._pad1d(x, (left, right), mode=conv.pad_mode))


class MimiDecode:
    """``codes [B, K, T] -> audio [B, 1, T * frame_size]``, numerically ``mimi.decode(codes)``."""

    def __init__(self, mimi: nn.Module):
        from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiResnetBlock

        self.mimi = mimi
        self._conv_type, self._resnet_type = MimiConv1d, MimiResnetBlock
        transformer = mimi.decoder_transformer
        self.window = getattr(transformer.config, "sliding_window", None)
        # the codebooks' dequantised tables are a lazily cached property: build them now, outside
        # any capture
        for rvq in (mimi.quantizer.semantic_residual_vector_quantizer, mimi.quantizer.acoustic_residual_vector_quantizer):
            for layer in rvq.layers:
                layer.codebook.embed  # noqa: B018

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        return self.seanet(self.embed(codes))

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, K, T] -> [B, hidden, steps]``: the quantizer, the upsampling and the decoder
        transformer, i.e. the SEANet decoder's input."""
        mimi = self.mimi
        x = mimi.quantizer.decode(codes)
        if mimi.upsample is not None:
            x = mimi.upsample(x)
        return self._transformer(x.transpose(1, 2)).transpose(1, 2)

    def seanet(self, x: torch.Tensor) -> torch.Tensor:
        """The SEANet decoder: ``[B, hidden, steps] -> audio [B, 1, samples]``."""
        for layer in self.mimi.decoder.layers:
            x = self._layer(layer, x)
        return x

    def _layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, self._conv_type):
            return _conv1d(layer, x)
        if isinstance(layer, self._resnet_type):
            h = x
            for sub in layer.block:
                h = self._layer(sub, h)
            shortcut = layer.shortcut
            residual = _conv1d(shortcut, x) if isinstance(shortcut, self._conv_type) else shortcut(x)
            return residual + h
        return layer(x)  # ELU, MimiConvTranspose1d: no tensor-valued bookkeeping

    def _transformer(self, h: torch.Tensor) -> torch.Tensor:
        transformer = self.mimi.decoder_transformer
        steps = h.shape[1]
        positions = torch.arange(steps, device=h.device)
        cos_sin = transformer.rotary_emb(h, positions[None])
        allowed = positions[None, :] <= positions[:, None]
        if self.window:
            allowed &= positions[:, None] - positions[None, :] < self.window
        # additive form: every attention implementation (eager, sdpa) takes it the same way
        mask = torch.zeros(steps, steps, device=h.device, dtype=h.dtype)
        mask = mask.masked_fill(~allowed, torch.finfo(h.dtype).min)[None, None]
        for layer in transformer.layers:
            out = layer(h, attention_mask=mask, position_embeddings=cos_sin)
            h = out[0] if isinstance(out, tuple) else out
        return h
