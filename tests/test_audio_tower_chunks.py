"""The windowed audio tower forward (what audio_encoder runs, as CUDA graphs on a GPU): the same
embeddings as transformers' Qwen2.5-Omni module for clips of any length, batched or alone, and no
host read of a tensor value on the device side."""

from __future__ import annotations

import copy

import torch

from chroma_triton.model.audio_tower_chunks import ChunkedAudioTower, window_plan
from chroma_triton.model.loading import load_parts


def _module_embeddings(module, feats):
    lens = torch.tensor([feats.shape[-1]])
    return module(feats, feature_lens=lens, aftercnn_lens=(lens - 1) // 2 + 1).last_hidden_state


def test_window_plan():
    assert window_plan([450, 200, 3], 200) == [(0, 0, 200), (0, 200, 200), (0, 400, 50), (1, 0, 200), (2, 0, 3)]


def test_equals_the_module_for_any_length_batched_and_padded(tiny_checkpoint):
    tower = load_parts(tiny_checkpoint, parts={"audio_tower"}).audio_tower
    torch.manual_seed(0)
    # one window, just over one, odd and even lengths, the shortest accepted clip, several windows
    lengths = [389, 57, 200, 201, 4, 1000]
    feats = [torch.randn(tower.module.config.num_mel_bins, n) for n in lengths]
    with torch.inference_mode():
        expected = [_module_embeddings(tower.module, f) for f in feats]
        batched = tower.embed_many(feats)
        chunked = tower.chunked
        padded = chunked.unpack(chunked(*chunked.pack(feats, rows=32)), lengths)  # idle rows change nothing
    for want, got, pad in zip(expected, batched, padded):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pad, want, rtol=1e-5, atol=1e-5)


def test_reads_no_tensor_value_on_the_host(tiny_checkpoint):
    """On the meta device a host read of a value raises; the module's own forward does
    (``.tolist()`` / ``.item()`` of window lengths), this one does not."""
    tower = load_parts(tiny_checkpoint, parts={"audio_tower"}).audio_tower
    meta = ChunkedAudioTower(copy.deepcopy(tower.module).to("meta"))
    feats = [torch.randn(tower.module.config.num_mel_bins, n) for n in (389, 57)]
    with torch.inference_mode():
        out = meta(*meta.pack(feats, rows=4))
    assert out.device.type == "meta" and out.shape == (4, meta.pooled, tower.module.config.output_dim)
