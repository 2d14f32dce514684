"""The project's Triton kernels on the CPU, under Triton's interpreter (the GPU runs them compiled:
tests/test_gpu.py), and the engine options that use them. Needs the `triton` package (the test
extra installs it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECKS = Path(__file__).resolve().parent / "kernel_checks.py"


def test_kernels_match_pytorch_under_the_interpreter():
    """Fused sampler, float32 logits: the same token as sampling.sample in every row (greedy,
    top-k off, 1, V-1, V and beyond, top-p on and off); bf16 logits (ties at the k-th place): no
    token that top-k, top-p or greedy rule out. gemv: F.linear within float32 rounding."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(CHECKS)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=CHECKS.parent.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "agreement 1.0000; violations 0" in done.stdout


@pytest.mark.parametrize("name", ["fused_sampling", "gemv"])
def test_kernel_options_are_refused_off_cuda(tiny_checkpoint, name):
    from chroma_triton.engine import ChromaEngine, EngineOptions
    from chroma_triton.model.loading import load_parts

    parts = load_parts(tiny_checkpoint, device="cpu")
    with pytest.raises(ValueError, match=f"{name} needs a CUDA device"):
        ChromaEngine(parts, EngineOptions(max_batch=1, **{name: True}))


def test_decode_attention_is_refused_off_cuda_and_for_unknown_trunks(tiny_checkpoint):
    from chroma_triton.engine import ChromaEngine, EngineOptions
    from chroma_triton.model.loading import load_parts

    parts = load_parts(tiny_checkpoint, device="cpu")
    with pytest.raises(ValueError, match="decode_attention needs a CUDA device"):
        ChromaEngine(parts, EngineOptions(max_batch=1, decode_attention="backbone"))
    with pytest.raises(ValueError, match=r"decode_attention: unknown trunk\(s\) \['talker'\]"):
        ChromaEngine(parts, EngineOptions(max_batch=1, decode_attention="backbone,talker"))
    engine = ChromaEngine(parts, EngineOptions(max_batch=1))  # off (the default): SDPA everywhere
    assert not any(layer.self_attn.decode_kernel for layer in engine.frames.backbone.model.layers)
