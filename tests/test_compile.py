"""The engine's `compile` option (torch.compile of every decoder layer and of the sampler), on the CPU.

Compiling happens in `start()`, for every shape class the step functions meet; serving afterwards
must compile nothing (a compilation mid-serving stalls every stream for seconds: seen on an H100
before the warm-up existed). Prefills stay eager, but for the admission graphs' buckets under
`compiled_prefill_graphs`, compiled at start too. On the CPU in float32 the compiled path gives
the plain path's codes and text exactly (on a GPU in bf16 it does not, see tests/test_gpu.py).
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest

from chroma_triton.engine import AudioChunk, ChromaEngine, EngineOptions, Finished, SamplingParams, TextDelta
from chroma_triton.engine.graphs import batch_buckets, length_buckets
from chroma_triton.pipeline import ChromaPipeline

pytestmark = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                                reason="torch.compile on the CPU needs a C++ compiler")

OPTIONS = dict(max_batch=8, thinker_max_len=256, backbone_max_len=384)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    p = ChromaPipeline.from_pretrained(tiny_checkpoint, options=EngineOptions(max_batch=1))
    p.engine.shutdown()
    yield p
    p.close()


def prepared(pipe, question_wav, ref_voice, text: str, **sampling):
    content = [{"type": "audio", "audio": question_wav}, {"type": "text", "text": text}]
    return pipe.prepare([{"role": "user", "content": content}], ref_voice[0], ref_voice[1],
                        SamplingParams(**{"seed": 3, "max_tokens": 14, **sampling}))


def serve(engine: ChromaEngine, reqs) -> list[dict]:
    """Submit all at once (one batch); collect each stream."""
    streams = [engine.submit(copy.deepcopy(r)) for r in reqs]
    out = []
    for s in streams:
        events = list(s)
        chunks = [e for e in events if isinstance(e, AudioChunk)]
        out.append({"text": "".join(e.text for e in events if isinstance(e, TextDelta)),
                    "codes": np.concatenate([c.codes[c.context_frames:] for c in chunks]),
                    "finished": [e for e in events if isinstance(e, Finished)]})
    return out


def waves_of(pipe, question_wav, ref_voice):
    """Batch sizes 1, 3 and 7, prompts of different lengths (one past 128 tokens), top_k 50 / 100 /
    30 / whole vocabulary."""
    return [
        [prepared(pipe, question_wav, ref_voice, "Hi.")],
        [prepared(pipe, question_wav, ref_voice, "Tell me a long story about the sea. " * 8, seed=4, max_tokens=20),
         prepared(pipe, question_wav, ref_voice, "Why?", seed=5, top_k=100),
         prepared(pipe, question_wav, ref_voice, "Go on.", seed=6, top_k=0)],
        [prepared(pipe, question_wav, ref_voice, "Again " * i, seed=10 + i, max_tokens=8 + i, top_k=30) for i in range(7)],
    ]


@pytest.mark.parametrize("admission_graphs", [{}, {"prefill_graphs": True, "compiled_prefill_graphs": True,
                                                  # buckets of 2 x 128 and 1 x 256: admissions split into groups
                                                  "prefill_graph_tokens": 256}],
                         ids=["eager_prefills", "compiled_prefill_graphs"])
def test_compile_happens_at_start_and_matches_the_plain_engine(pipe, question_wav, ref_voice, admission_graphs,
                                                               monkeypatch):
    from torch._dynamo.utils import counters

    from chroma_triton.engine.prefill_graphs import LENGTH_STEP
    from chroma_triton.model import trunk

    waves = waves_of(pipe, question_wav, ref_voice)
    plain = ChromaEngine(pipe.parts, EngineOptions(**OPTIONS, prefill_graphs=bool(admission_graphs))).start()
    try:
        expected = [serve(plain, wave) for wave in waves]
    finally:
        plain.shutdown()

    compiled = ChromaEngine(pipe.parts, EngineOptions(**OPTIONS, compile=True, **admission_graphs)).start()  # compiles here
    try:
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        lengths = []  # the positions of every compiled layer call while serving
        real = trunk.compiled_layer

        def counting():
            fn = real()
            return lambda layer, x, *rest: lengths.append(x.shape[1]) or fn(layer, x, *rest)
        monkeypatch.setattr(trunk, "compiled_layer", counting)
        got = [serve(compiled, wave) for wave in waves]
        monkeypatch.undo()
        assert counters["stats"]["unique_graphs"] == graphs, "serving compiled a new graph after start()"
        if admission_graphs:  # the admissions took the graph path, through the compiled layers
            assert compiled.prefill_graphs.compiled and compiled.prefill_graphs.calls >= 5  # 1 + 2 + 4 groups at least
            assert compiled.stats()["prefill_eager_prompts"] == 0
            assert compiled.backbone_tails.compiled and compiled.backbone_tails.calls >= 3
            assert max(lengths) >= LENGTH_STEP  # the thinker's prefill buckets
        else:  # prefills eager: only steps' few positions ran compiled
            assert 0 < max(lengths) <= trunk.MATH_MAX_QUERIES
    finally:
        compiled.shutdown()
        pipe.parts.frame_model.set_compiled(False)
        pipe.parts.thinker_lm.model.set_compiled(False)
    for wave_expected, wave_got in zip(expected, got):
        for e, g in zip(wave_expected, wave_got):
            assert len(g["finished"]) == 1 and g["finished"][0].reason == e["finished"][0].reason
            assert g["text"] == e["text"]
            np.testing.assert_array_equal(g["codes"], e["codes"])


class CopyingRunner:
    """Hands step functions copies of their inputs, as StepRunner does with CUDA graphs (the copies
    are a graph's static inputs), without capturing anything: the GPU path's inputs, on a CPU."""
    use_graphs = True

    def __len__(self) -> int:
        return 0

    def __call__(self, key, fn, *args):
        return fn(*[a.clone() for a in args])


def test_nothing_compiles_after_start_on_the_graph_path(pipe, question_wav, ref_voice):
    """As on a GPU: bucketed batch sizes and key lengths, inputs copied into static tensors."""
    from torch._dynamo.utils import counters

    engine = ChromaEngine(pipe.parts, EngineOptions(**OPTIONS, compile=True, key_bucket=80))
    engine.runner = CopyingRunner()
    engine._batch_sizes = batch_buckets(engine.opts.max_batch)
    engine._thinker_lens = length_buckets(engine.opts.thinker_max_len, 80)
    engine._backbone_lens = length_buckets(engine.opts.backbone_max_len, 80)
    engine.start()
    try:
        graphs = counters["stats"]["unique_graphs"]
        for wave in waves_of(pipe, question_wav, ref_voice):
            assert all(r["finished"] for r in serve(engine, wave))
        assert counters["stats"]["unique_graphs"] == graphs, "serving compiled a new graph after start()"
    finally:
        engine.shutdown()
        pipe.parts.frame_model.set_compiled(False)
        pipe.parts.thinker_lm.model.set_compiled(False)


def test_turns_after_a_stored_prefix_compile_nothing_after_start(pipe, question_wav, ref_voice):
    """`thinker_prefix_cache_mib` under `compile` with compiled admission graphs: a conversation's
    later turns prefill their rest eagerly (eager_layers), so serving compiles nothing new, and
    they stream the codes the compiled engine without the cache streams (float32 on the CPU)."""
    from torch._dynamo.utils import counters

    from chroma_triton.engine.thinker_prefix import BLOCK
    from test_thinker_prefix import conversation_turn

    opts = dict(OPTIONS, thinker_max_len=512, compile=True, prefill_graphs=True, compiled_prefill_graphs=True,
                prefill_graph_tokens=512)
    turns = [[conversation_turn(pipe, question_wav, ref_voice, c, t) for c in range(2)] for t in range(3)]
    codes, stats = {}, {}
    for mib in (0, 16):
        engine = ChromaEngine(pipe.parts, EngineOptions(**opts, thinker_prefix_cache_mib=mib,
                                                        thinker_prefix_min_tokens=BLOCK)).start()
        try:
            graphs = counters["stats"]["unique_graphs"]
            codes[mib] = [r["codes"] for pair in turns for r in serve(engine, pair)]
            assert counters["stats"]["unique_graphs"] == graphs, "serving compiled a new graph after start()"
            stats[mib] = engine.stats()
        finally:
            engine.shutdown()
            pipe.parts.frame_model.set_compiled(False)
            pipe.parts.thinker_lm.model.set_compiled(False)
    assert stats[16]["prefill_prefix_prompts"] == 4 and stats[0]["prefill_prefix_prompts"] == 0
    for a, b in zip(codes[0], codes[16]):
        np.testing.assert_array_equal(a, b)
