"""The sync-free Mimi decode (what codec_decoder runs, and captures as CUDA graphs on a GPU):
the same samples as transformers' ``MimiModel.decode``, and no host read of any tensor value."""

from __future__ import annotations

import pytest
import torch
from transformers import MimiConfig, MimiModel

from chroma_triton.checkpoint.factory import PRESETS
from chroma_triton.model.mimi_decode import MimiDecode


def _config(**overrides) -> MimiConfig:
    return MimiConfig(**{"sampling_rate": 24000, "frame_rate": 12.5, **PRESETS["tiny"]["codec"], **overrides})


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [None, 7])  # 7 < the 2 x 20 upsampled steps: the window masks
def test_equals_transformers_decode(attention, window):
    torch.manual_seed(0)
    config = _config(**({"sliding_window": window} if window else {}))
    config._attn_implementation = attention
    mimi = MimiModel(config).eval()
    codes = torch.randint(0, config.codebook_size, (3, config.num_quantizers, 20))
    with torch.inference_mode():
        expected = mimi.decode(codes).audio_values
        got = MimiDecode(mimi)(codes)
    assert got.shape == expected.shape == (3, 1, 20 * 1920)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_reads_no_tensor_value_on_the_host():
    """On the meta device tensors have shapes but no values: any ``.item()``, ``int(tensor)`` or
    tensor-valued padding raises. transformers' own decode does (its conv paddings are tensors),
    which is what makes it uncapturable as a CUDA graph."""
    with torch.device("meta"):
        mimi = MimiModel(_config()).eval()
        codes = torch.zeros(2, 8, 5, dtype=torch.long)
    with torch.inference_mode():
        audio = MimiDecode(mimi)(codes)
    assert audio.shape == (2, 1, 5 * 1920) and audio.device.type == "meta"
