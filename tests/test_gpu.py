"""GPU-only checks (skipped on CPU machines, where CI runs)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from chroma_triton.engine import AudioChunk, ChromaEngine, EngineOptions, SamplingParams
from chroma_triton.pipeline import ChromaPipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    p = ChromaPipeline.from_pretrained(tiny_checkpoint, device="cuda", options=EngineOptions(max_batch=1))
    p.engine.shutdown()
    yield p


def _codes(engine, req):
    chunks = [ev for ev in engine.submit(copy.deepcopy(req)) if isinstance(ev, AudioChunk)]
    return np.concatenate([c.codes[c.context_frames:] for c in chunks])


def test_cuda_graphs_give_the_eager_codes(pipe, question_wav, ref_voice):
    """Same bucketed shapes, same kernels: graph replay must reproduce eager codes bitwise."""
    reqs = [pipe.prepare([{"role": "user", "content": [{"type": "audio", "audio": question_wav}]}], ref_voice[0],
                         ref_voice[1], SamplingParams(seed=s, max_tokens=20 + 5 * s)) for s in range(3)]
    results = {}
    for graphs in (False, True):
        engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=4, cuda_graphs=graphs)).start()
        try:
            streams = [engine.submit(copy.deepcopy(r)) for r in reqs]
            results[graphs] = [np.concatenate([c.codes[c.context_frames:] for c in s if isinstance(c, AudioChunk)])
                               for s in streams]
            if graphs:
                assert engine.stats()["graphs"] > 0
        finally:
            engine.shutdown()
    for eager, graph in zip(results[False], results[True]):
        np.testing.assert_array_equal(graph, eager)
