"""Mimi's SEANet decoder run chunk by chunk, each row carrying its stream's state.

Every convolution of the decoder is causal: a stride-1 ``MimiConv1d`` sees its input's last
``kernel - 1`` steps before the chunk (zeros at the stream's start, which is exactly the zero
padding of the one-shot decode), and a causal ``MimiConvTranspose1d`` (its right padding trimmed)
needs only its last ``ceil((kernel - stride) / stride)`` input steps to finish the chunk's first
outputs. ELUs are pointwise and the residual shortcuts identities or 1-wide convolutions. So
with those few steps kept per layer, a chunk decodes to the same samples as the one-shot decode
of the stream, without decoding any earlier frame again.

The state of one stream is one flat row (``state_size`` values, about 7k for Mimi): a batch of
chunks of different streams takes ``state [B, state_size]`` and gives the states after each
row's true end (``lengths``; a row padded on the right keeps the state at its own end).
Everything is computed from shapes and tensors on the device, so a CUDA graph can hold a call.
``tests/test_codec_streams.py`` checks chunked decoding against the one-shot SEANet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class _Carry:
    """One convolution's carried input: ``width`` steps of ``channels`` at ``offset`` in the row."""

    offset: int
    channels: int
    width: int


class StreamingSeanet:
    def __init__(self, decoder: nn.Module, config) -> None:
        from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiConvTranspose1d, MimiResnetBlock

        if not config.use_causal_conv or config.pad_mode != "constant":
            raise ValueError("streaming decode needs Mimi's causal, zero-padded convolutions")
        self.decoder = decoder
        self._types = (MimiConv1d, MimiConvTranspose1d, MimiResnetBlock)
        self._carries: dict[int, _Carry] = {}
        self.state_size = 0
        self.upsampling = 1  # output samples per input step
        for conv in self._convs(decoder.layers):
            c = conv.conv
            if isinstance(conv, MimiConvTranspose1d):
                stride, kernel = c.stride[0], c.kernel_size[0]
                if conv.padding_left != 0:
                    raise ValueError("streaming decode needs transposed convolutions trimmed on the right")
                width = -(-(kernel - stride) // stride)
                self.upsampling *= stride
            else:
                if c.stride[0] != 1 or c.padding[0] != 0:
                    raise ValueError("streaming decode needs the decoder's convolutions to have stride 1")
                width = (c.kernel_size[0] - 1) * c.dilation[0]
            self._carries[id(conv)] = _Carry(self.state_size, c.in_channels, width)
            self.state_size += c.in_channels * width

    def _convs(self, layers):
        conv1d, conv_t, resnet = self._types
        for layer in layers:
            if isinstance(layer, (conv1d, conv_t)):
                yield layer
            elif isinstance(layer, resnet):
                yield from self._convs(layer.block)
                if isinstance(layer.shortcut, conv1d):
                    yield layer.shortcut

    def __call__(self, x: torch.Tensor, lengths: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, hidden, steps]`` (row ``i`` valid up to ``lengths[i]``), ``state [B, state_size]``
        -> (audio ``[B, 1, steps * upsampling]``, the state after each row's ``lengths[i]`` steps)."""
        pieces: list[torch.Tensor] = []
        lengths = lengths.to(torch.long)
        for layer in self.decoder.layers:
            x, lengths = self._layer(layer, x, lengths, state, pieces)
        new_state = torch.cat(pieces, dim=1) if pieces else state[:, :0]
        return x, new_state

    def _layer(self, layer, x, lengths, state, pieces):
        conv1d, conv_t, resnet = self._types
        if isinstance(layer, resnet):
            h = x
            for sub in layer.block:
                h, _ = self._layer(sub, h, lengths, state, pieces)
            residual = x
            if isinstance(layer.shortcut, conv1d):
                residual, _ = self._layer(layer.shortcut, x, lengths, state, pieces)
            elif not isinstance(layer.shortcut, nn.Identity):
                residual = layer.shortcut(x)
            return residual + h, lengths
        if not isinstance(layer, (conv1d, conv_t)):
            return layer(x), lengths  # ELU
        carry = self._carries[id(layer)]
        rows, steps = x.shape[0], x.shape[-1]
        before = state[:, carry.offset: carry.offset + carry.channels * carry.width]
        xin = torch.cat([before.reshape(rows, carry.channels, carry.width).to(x.dtype), x], dim=2)
        if carry.width:  # the last `width` true steps of this row's input, for its next chunk
            index = lengths[:, None] + torch.arange(carry.width, device=x.device)[None]
            kept = xin.gather(2, index[:, None, :].expand(rows, carry.channels, carry.width))
            pieces.append(kept.reshape(rows, -1).to(state.dtype))
        y = layer.conv(xin)
        if isinstance(layer, conv_t):
            stride = layer.conv.stride[0]
            return y[..., carry.width * stride: (carry.width + steps) * stride], lengths * stride
        return y, lengths
