"""GPU-only checks (skipped on CPU machines, where CI runs)."""

from __future__ import annotations

import copy
import faulthandler

import numpy as np
import pytest
import torch

from chroma_triton.engine import AudioChunk, ChromaEngine, EngineOptions, SamplingParams
from chroma_triton.pipeline import ChromaPipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def _no_silent_hang():
    """A GPU test blocked for 5 minutes prints every thread's stack and ends the run (a lent GPU
    machine's command limit would otherwise end it without a word)."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    p = ChromaPipeline.from_pretrained(tiny_checkpoint, device="cuda", options=EngineOptions(max_batch=1))
    p.engine.shutdown()
    yield p


def _codes(engine, req):
    chunks = [ev for ev in engine.submit(copy.deepcopy(req)) if isinstance(ev, AudioChunk)]
    return np.concatenate([c.codes[c.context_frames:] for c in chunks])


def test_cuda_graphs_give_the_eager_codes(pipe, question_wav, ref_voice):
    """Same bucketed shapes, same kernels: graph replay must reproduce eager codes bitwise, with and
    without overlap (step n+1 launched before step n's codes are read through pinned memory), and
    with the thinker running ahead on its own stream."""
    reqs = [pipe.prepare([{"role": "user", "content": [{"type": "audio", "audio": question_wav}]}], ref_voice[0],
                         ref_voice[1], SamplingParams(seed=s, max_tokens=20 + 5 * s)) for s in range(3)]
    results = {}
    for graphs, overlap, ahead in ((False, False, False), (True, False, False), (True, True, False), (True, True, True)):
        engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=4, cuda_graphs=graphs, overlap=overlap,
                                                        thinker_ahead=ahead)).start()
        try:
            streams = [engine.submit(copy.deepcopy(r)) for r in reqs]
            results[graphs, overlap, ahead] = [
                np.concatenate([c.codes[c.context_frames:] for c in s if isinstance(c, AudioChunk)]) for s in streams]
            if graphs:
                assert engine.stats()["graphs"] > 0
            if ahead:
                assert engine.stats()["thinker_ahead_used"] > 0
        finally:
            engine.shutdown()
    for variant in ((True, False, False), (True, True, False), (True, True, True)):
        for eager, graph in zip(results[False, False, False], results[variant]):
            np.testing.assert_array_equal(graph, eager)


def test_compiled_layers_match_the_plain_ones(pipe):
    """torch.compile fuses norms, rope and residual adds: not bitwise, but the same states to
    bf16 accuracy (cosine >= 0.999 per row, max |diff| <= 2 % of the largest |state|)."""
    parts = pipe.parts
    engine = ChromaEngine(parts, EngineOptions(max_batch=4, compile=False))  # allocates the caches
    thinker = engine.thinker
    tokens = torch.tensor([11, 22, 33, 44], device="cuda")
    positions = torch.tensor([0, 3, 5, 9], device="cuda")
    trunk = parts.thinker_lm.model
    outs = []
    with torch.inference_mode():
        for compiled in (False, True):
            trunk.set_compiled(compiled)
            # same inputs at the same positions: the KV writes are identical, so the two calls agree
            outs.append(thinker.decode(tokens, positions, key_len=16)[0].float())
    trunk.set_compiled(False)
    plain, fused = outs
    cos = torch.nn.functional.cosine_similarity(plain, fused, dim=-1)
    assert float(cos.min()) >= 0.999
    assert float((plain - fused).abs().max()) <= 0.02 * float(plain.abs().max())


def test_codec_instances_on_two_gpus_continue_each_others_streams(tiny_checkpoint, tmp_path):
    """Two codec instances (one per GPU where there are two) sharing their stream states through
    host memory: a stream whose chunks alternate between them decodes to the samples one instance
    gives alone (the same GPU's graphs), every chunk after the first adopted."""
    from chroma_triton.model.loading import load_parts
    from chroma_triton.serving.peer_states import PeerStates
    from chroma_triton.serving.triton_codec import CodecChunk, CodecService, chunk_plan

    devices = [f"cuda:{i % torch.cuda.device_count()}" for i in range(2)]
    codecs = [load_parts(tiny_checkpoint, parts={"codec"}, device=d).codec for d in devices]
    codes = np.random.default_rng(4).integers(0, codecs[0].codebook_size, size=(83, codecs[0].num_codebooks))
    chunks = [CodecChunk(codes[a:e], s - a, "s", s) for a, s, e in chunk_plan(len(codes), 2, 10, 12)]
    alone = CodecService(codecs[0], graph_frames=24, stream_states=64)
    expected = [alone.decode_many([c])[0] for c in chunks]
    pair = [CodecService(c, graph_frames=24, stream_states=64,
                         peers=PeerStates(tmp_path, f"codec_{i}", 64, c.state_size)) for i, c in enumerate(codecs)]
    got = [pair[i % 2].decode_many([c])[0] for i, c in enumerate(chunks)]
    assert sum(s.counts()["adopted"] for s in pair) == len(chunks) - 1
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)  # another GPU's kernels may round differently
    for s in pair:
        s.streams.peers.close()


_PREFIX_OWNER = """
import sys, time, torch
from pathlib import Path
from chroma_triton.engine.thinker_prefix import BLOCK, ThinkerPrefixCache
folder = Path(sys.argv[1])
g = torch.Generator().manual_seed(5)
k, v = (torch.randn(4, 2, 6 * BLOCK, 16, generator=g).bfloat16() for _ in range(2))
cache = ThinkerPrefixCache(max_bytes=64 << 20, min_tokens=BLOCK)
cache.reserve(4, 2, 16, torch.bfloat16, "cuda:0", peers_folder=folder, name="owner")
cache.put([bytes([i]) * 32 for i in range(6)], k.cuda(), v.cuda())
torch.cuda.synchronize()
cache.peers.flush()
(folder / "ready").touch()
while not (folder / "done").exists():
    time.sleep(0.05)
cache.close()
"""


def test_thinker_prefixes_copy_from_another_process_on_another_gpu(tmp_path):
    """An engine's thinker prefix cache copies a prompt that another process's cache (on GPU 0)
    holds, through CUDA IPC, into its own pool on the last GPU: the same bits."""
    import subprocess
    import sys
    import time

    from chroma_triton.engine.thinker_prefix import BLOCK, ThinkerPrefixCache

    owner = subprocess.Popen([sys.executable, "-c", _PREFIX_OWNER, str(tmp_path)])
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():
            assert owner.poll() is None and time.monotonic() < deadline, "the owner process failed"
            time.sleep(0.05)
        device = f"cuda:{torch.cuda.device_count() - 1}"
        cache = ThinkerPrefixCache(max_bytes=64 << 20, min_tokens=BLOCK)
        cache.reserve(4, 2, 16, torch.bfloat16, device, peers_folder=tmp_path, name="reader")
        keys = [bytes([i]) * 32 for i in range(8)]  # the next turn: 8 blocks, the first 6 held by the owner
        assert cache.peer_length(keys, 8 * BLOCK + 1) == 6 * BLOCK
        assert cache.import_from_peers([(keys, 8 * BLOCK + 1)]) == (1, 6 * BLOCK, 0)
        m = cache.match(keys, 8 * BLOCK + 1)
        g = torch.Generator().manual_seed(5)
        k, v = (torch.randn(4, 2, 6 * BLOCK, 16, generator=g).bfloat16() for _ in range(2))
        assert m.length == 6 * BLOCK and m.k.device == torch.device(device)
        assert torch.equal(m.k.cpu(), k) and torch.equal(m.v.cpu(), v)
        cache.close()
    finally:
        (tmp_path / "done").touch()
        owner.wait(timeout=60)
    assert owner.returncode == 0


def test_codec_graphs_give_the_eager_samples(tiny_checkpoint):
    """codec_decoder's CUDA graphs (captured for every bucket at load) replay what the eager,
    sync-free decode computes, for ragged batches of every row bucket, stateless and carried."""
    from chroma_triton.model.loading import load_parts
    from chroma_triton.serving.triton_codec import CodecChunk, CodecService, chunk_plan

    codec = load_parts(tiny_checkpoint, parts={"codec"}, device="cuda").codec
    rng = np.random.default_rng(0)
    batches = [[(rng.integers(0, codec.codebook_size, size=(n, codec.num_codebooks)), ctx) for n, ctx in plan]
               for plan in ([(2, 0)], [(22, 12), (9, 1), (12, 12)], [(16, 4)] * 5, [(3, 0)] * 17)]
    eager = [codec.decode_batch(b) for b in batches]
    streams = [[CodecChunk(c[a:e], s - a, f"s{i}", s) for a, s, e in chunk_plan(len(c), 2, 10, 12)]
               for i, c in enumerate(rng.integers(0, codec.codebook_size, size=(n, codec.num_codebooks)) for n in (45, 70, 9))]

    def carried():  # three streams' chunks, a step of each per batch, each continuing its state
        service = CodecService(codec, stream_states=64)
        out = []
        for step in range(max(map(len, streams))):
            if step == 3:  # stream 1's state lost: its chunk restarts beside carried ones (two SEANet calls)
                service.forget("s1")
            batch = [s[step] for s in streams if step < len(s) and not (s is streams[1] and step == 6)]
            if step == 5:  # stream 1's chunks 5 and 6 queued together: 6 follows 5 in its SEANet row
                batch.append(streams[1][6])
            out.append(service.decode_many(batch))
        assert service.counts()["carried"] == sum(map(len, streams)) - len(streams) - 1
        assert service.counts()["restarted"] == 1
        return out

    eager_carried = carried()
    # rows 1..64 x (the transformer's frames 8, 16, 24 + the SEANet decoder's frames 2, 4, ..., 24)
    assert codec.use_cuda_graphs(24, 64) == 7 * (3 + 12)
    # captured without autograd: outputs that required grad kept every graph's activations alive
    # (90 GiB at Mimi's sizes on an H200 before the fix, 1.25 GiB allocated after)
    outputs = [t for _, _, out in codec._graphs._graphs.values() for t in (out if isinstance(out, tuple) else (out,))]
    assert outputs and not any(t.requires_grad for t in outputs)
    for batch, expected in zip(batches, eager):
        for got, want in zip(codec.decode_batch(batch), expected):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    for got_step, want_step in zip(carried(), eager_carried):
        for got, want in zip(got_step, want_step):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_codec_tf32_transformer_stays_near_float32(tiny_checkpoint):
    """matmul_tf32: the decoder transformer's products on TF32 tensor cores, captured into the
    graphs; the samples stay near the float32 ones, and the process's own setting is untouched."""
    from chroma_triton.model.loading import load_parts

    codec = load_parts(tiny_checkpoint, parts={"codec"}, device="cuda").codec
    rng = np.random.default_rng(2)
    batch = [(rng.integers(0, codec.codebook_size, size=(22, codec.num_codebooks)), 12) for _ in range(5)]
    want = np.concatenate(codec.decode_batch(batch))
    codec.matmul_tf32 = True
    before = torch.backends.cuda.matmul.allow_tf32
    eager = np.concatenate(codec.decode_batch(batch))
    codec.use_cuda_graphs(24, 8)
    graphs = np.concatenate(codec.decode_batch(batch))
    assert torch.backends.cuda.matmul.allow_tf32 == before
    scale = float(np.sqrt(np.mean(want ** 2)))
    for got in (eager, graphs):
        rms = float(np.sqrt(np.mean((got - want) ** 2)))
        assert rms <= 1e-2 * scale, (rms, scale)  # TF32 keeps 10 mantissa bits: about 1e-3 relative per product


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_audio_tower_graphs_give_the_eager_embeddings(tiny_checkpoint, device):
    """audio_encoder's CUDA graphs (one per window-count bucket, captured at load) give the eager
    windowed forward's embeddings, on the current GPU and on another one (dp 2's second instance)."""
    from chroma_triton.model.loading import load_parts

    if torch.device(device).index >= torch.cuda.device_count():
        pytest.skip("needs two CUDA devices")
    tower = load_parts(tiny_checkpoint, parts={"audio_tower"}, device=device).audio_tower
    torch.manual_seed(0)
    mels = tower.module.config.num_mel_bins
    batches = [[torch.randn(mels, n) for n in plan] for plan in ([389], [57, 1000, 4], [200] * 9)]
    eager = [tower.embed_many(b) for b in batches]
    assert tower.use_cuda_graphs(64) == 7
    for _ in range(2):  # the first use of a bucket after others, then again
        for batch, expected in zip(batches, eager):
            for got, want in zip(tower.embed_many(batch), expected):
                # graphs pad the window count to a bucket: other GEMM shapes, bf16 rounding
                torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02 * float(want.abs().max()))


def test_log_mel_features_on_the_gpu_match_the_cpu(tiny_checkpoint, question_wav):
    """audio_encoder's features_device=auto: the feature extractor's torch path on the GPU gives the
    CPU's log-mels (float32 FFTs of another library: about 1e-5) and the same frame count."""
    from chroma_triton.audio_io import decode_audio
    from chroma_triton.model.loading import load_parts

    tower = load_parts(tiny_checkpoint, parts={"audio_tower"}, device="cuda").audio_tower
    for wav in (decode_audio(question_wav, tower.sampling_rate), np.random.default_rng(0).standard_normal(777).astype(np.float32)):
        cpu = tower.features(wav)
        assert tower.use_device_features(True).startswith("cuda")
        gpu = tower.features(wav)
        tower.use_device_features(False)
        assert gpu.shape == cpu.shape and gpu.device.type == "cpu"
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graphs_on_a_second_gpu_while_the_first_is_current(tiny_checkpoint, question_wav, ref_voice):
    """dp 2 runs an instance on cuda:1 from threads whose current device is cuda:0: its engine
    and codec graphs must still capture and replay their own device's work (a capture on cuda:0's
    stream records none of it: replays would then do nothing)."""
    from chroma_triton.model.loading import load_parts

    assert torch.cuda.current_device() == 0
    codec = load_parts(tiny_checkpoint, parts={"codec"}, device="cuda:1").codec
    rng = np.random.default_rng(1)
    batch = [(rng.integers(0, codec.codebook_size, size=(n, codec.num_codebooks)), ctx) for n, ctx in [(22, 12), (2, 0)]]
    eager = codec.decode_batch(batch)
    codec.use_cuda_graphs(24, 2)
    for _ in range(2):  # the capture, then a replay
        for got, want in zip(codec.decode_batch(batch), eager):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    p = ChromaPipeline.from_pretrained(tiny_checkpoint, device="cuda:1", options=EngineOptions(max_batch=1))
    p.engine.shutdown()
    req = p.prepare([{"role": "user", "content": [{"type": "audio", "audio": question_wav}]}], ref_voice[0],
                    ref_voice[1], SamplingParams(seed=3, max_tokens=24))
    results = {}
    for graphs in (False, True):
        engine = ChromaEngine(p.parts, EngineOptions(max_batch=2, cuda_graphs=graphs)).start()
        try:
            results[graphs] = [_codes(engine, req) for _ in range(2)]  # capture, then replay
        finally:
            engine.shutdown()
    for got in results[True]:
        np.testing.assert_array_equal(got, results[False][0])


def test_math_attention_steps_match_sdpa_in_bf16():
    """`math_attention` on the GPU in bf16: a decoding step's states agree with SDPA's within bf16
    tolerance (the matmuls accumulate in another order; the softmax runs in float32 in both)."""
    from test_trunk_attention import _trunk

    outs = []
    for math_on in (False, True):
        trunk = _trunk("cuda", torch.bfloat16).set_math_attention(math_on)
        cache, rotary = trunk.new_cache(4, 300, "cuda", torch.bfloat16)
        g = torch.Generator(device="cuda").manual_seed(0)
        with torch.no_grad():
            trunk(torch.randn(4, 200, 64, device="cuda", dtype=torch.bfloat16, generator=g), cache, rotary,
                  torch.arange(200, device="cuda")[None].repeat(4, 1), key_len=200)
            pos = torch.tensor([[200, 201, 202]], device="cuda").repeat(4, 1)
            outs.append(trunk(torch.randn(4, 3, 64, device="cuda", dtype=torch.bfloat16, generator=g), cache, rotary,
                              pos, key_len=256).float())
    cos = torch.nn.functional.cosine_similarity(outs[0].flatten(1), outs[1].flatten(1)).min()
    assert cos > 0.999, cos
    assert (outs[0] - outs[1]).abs().max() <= 0.02 * outs[0].abs().max()


@pytest.mark.parametrize("compiled", [False, True])
def test_prefill_from_start_matches_the_masked_prefill_in_bf16(compiled):
    """A prompt's prefill by causal SDPA without a mask (`from_start`, a flash kernel on the GPU)
    against the masked kernel, in bf16, eager and through torch.compile: states and written keys
    within bf16 tolerance (other kernels, other summation order), the same keys bitwise (they do
    not depend on attention in the first layer)."""
    from test_trunk_attention import _trunk

    outs = []
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 300, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    for from_start in (False, True):
        trunk = _trunk("cuda", torch.bfloat16).set_compiled(compiled)
        cache, rotary = trunk.new_cache(4, 512, "cuda", torch.bfloat16)
        with torch.no_grad():
            h = trunk(x, cache, rotary, torch.arange(300, device="cuda")[None].repeat(4, 1), key_len=300,
                      from_start=from_start)
        outs.append((h.float(), cache.k.clone()))
    (a, ka), (b, kb) = outs
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min()
    assert cos > 0.999, cos
    assert (a - b).abs().max() <= 0.02 * a.abs().max()
    assert torch.equal(ka[0], kb[0])
    assert (ka[1].float() - kb[1].float()).abs().max() <= 0.02 * ka[1].float().abs().max()


def test_decode_attention_matches_sdpa_and_serves_through_graphs(pipe, question_wav, ref_voice):
    """`decode_attention` on the GPU in bf16: a trunk's decoding steps (rows at different lengths,
    1 and 3 positions) agree with SDPA's within bf16 tolerance; an engine with it on every trunk,
    compiled, serves through its graphs the codes its eager run gives."""
    import kernel_checks as checks

    sdpa, kernel = checks.trunk_step_outputs("cuda", torch.bfloat16)
    assert torch.nn.functional.cosine_similarity(sdpa.flatten(), kernel.flatten(), dim=0).item() > 0.999
    assert (kernel - sdpa).abs().max() <= 0.02 * sdpa.abs().max()
    reqs = [pipe.prepare([{"role": "user", "content": [{"type": "audio", "audio": question_wav}]}], ref_voice[0],
                         ref_voice[1], SamplingParams(seed=s, max_tokens=16 + 4 * s)) for s in range(3)]
    results = {}
    for graphs, compiled in ((False, False), (True, False), (True, True)):
        engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=4, cuda_graphs=graphs, compile=compiled,
                                                        decode_attention="thinker,backbone,decoder")).start()
        try:
            results[graphs, compiled] = [_codes(engine, r) for r in reqs]
        finally:
            engine.shutdown()
    for eager, graph, fused in zip(results[False, False], results[True, False], results[True, True]):
        np.testing.assert_array_equal(graph, eager)  # the same kernels replayed
        assert fused.shape[1] == eager.shape[1] and len(fused) > 0  # compiled (other fusions): it serves


def test_step_graphs_are_captured_before_serving(pipe, question_wav, ref_voice):
    """`capture_at_start` (the default): every step graph exists once the engine has started, and
    serving requests captures none (a capture mid-stream stops every running stream)."""
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=4, thinker_max_len=512, backbone_max_len=512)).start()
    try:
        captured = engine.stats()["graphs"]
        # batch buckets 1, 2, 4 x (thinker, silent and talking backbone steps at 2 key lengths each
        # + the sampler at the default top-k bound)
        assert captured == 3 * (3 * 2 + 1)
        reqs = [pipe.prepare([{"role": "user", "content": [{"type": "audio", "audio": question_wav}]}], ref_voice[0],
                             ref_voice[1], SamplingParams(seed=s, max_tokens=12 + 4 * s)) for s in range(3)]
        streams = [engine.submit(copy.deepcopy(r)) for r in reqs]
        for s in streams:
            assert any(isinstance(ev, AudioChunk) for ev in s)
        assert engine.stats()["graphs"] == captured
    finally:
        engine.shutdown()


def test_prefill_graphs_replay_the_padded_eager_prefill(pipe, question_wav, ref_voice):
    """`prefill_graphs`: graphs captured at start (dummy prompts) and replayed for other prompts, two
    keys in turn, give what the same padded prefill gives eagerly, bitwise (same shapes, same
    kernels), touch no other rows, and match the unpadded eager prefill within bf16 tolerance
    (other matrix shapes, other rounding)."""
    from chroma_triton.engine.prefill_graphs import PrefillGraphs

    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=8, capture_at_start=False))
    thinker = engine.thinker

    def prompts(*texts):
        reqs = [pipe.prepare([{"role": "user", "content": [{"type": "audio", "audio": question_wav},
                                                           {"type": "text", "text": t}]}], ref_voice[0], ref_voice[1],
                             SamplingParams(seed=1, max_tokens=8)) for t in texts]
        return [(torch.tensor(r.thinker_ids), r.audio_embeds) for r in reqs]

    eager = PrefillGraphs(thinker, 4, 256, torch.device("cpu"))  # a CPU device: no graphs, tensors on the GPU
    graphs = PrefillGraphs(thinker, 4, 256, torch.device("cuda", torch.cuda.current_device()))
    assert graphs.capture_all() and len(graphs) == len(graphs.buckets)
    with torch.no_grad():
        for batch in (prompts("Hi.", "Tell me a long story about the sea."), prompts("Why?"),
                      prompts("What is the time?", "Sing.")):
            h_pad, t_pad = (x.clone() for x in eager.prefill(0, batch))
            untouched = thinker.cache.k[:, 4 + len(batch):].clone()
            h_graph, t_graph = graphs.prefill(4, batch)
            assert torch.equal(h_graph, h_pad) and torch.equal(t_graph, t_pad)
            n = len(batch)
            for i, (ids, _) in enumerate(batch):  # each prompt's positions, as the padded eager prefill wrote them
                assert torch.equal(thinker.cache.k[:, 4 + i, :, :ids.shape[0]], thinker.cache.k[:, i, :, :ids.shape[0]])
            assert torch.equal(thinker.cache.k[:, 4 + n:], untouched)
            h_plain, _ = thinker.prefill(0, batch)
            torch.testing.assert_close(h_graph.float(), h_plain.float(), atol=3e-2, rtol=3e-2)
    assert len(graphs) == len(graphs.buckets)  # nothing captured while prefilling


def test_backbone_tail_graphs_replay_the_padded_eager_step(pipe, question_wav, ref_voice):
    """`prefill_graphs`' backbone tails: graphs captured at start and replayed for rows of cached
    voices give what the same padded step gives eagerly, bitwise, touch no other rows, and match the
    unpadded eager step within bf16 tolerance."""
    from chroma_triton.engine.prefill_graphs import BackboneTailGraphs

    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=8, capture_at_start=False))
    frames, cache = engine.frames, engine.frames.backbone_cache
    reqs = [pipe.prepare([{"role": "user", "content": [{"type": "audio", "audio": question_wav}]}], *voice,
                         SamplingParams(seed=1, max_tokens=8)) for voice in (ref_voice, (question_wav, "Hello."))]
    with torch.no_grad():
        voices = [engine._voice_prefixes_of(0, [r])[0] for r in reqs]
    eager = BackboneTailGraphs(frames, 4, 512, torch.device("cpu"))  # a CPU device: no graphs, tensors on the GPU
    graphs = BackboneTailGraphs(frames, 4, 512, torch.device("cuda", torch.cuda.current_device()))
    assert graphs.capture_all() and len(graphs) == len(graphs.buckets)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for prefixes in ([voices[0], voices[0], voices[1]], [voices[1]], [voices[0]] * 4):
            n = len(prefixes)
            tails = torch.randn(n, 2, frames.backbone.model.cfg.hidden_size, device="cuda", generator=gen,
                                dtype=cache.k.dtype)
            padded = eager.run(0, prefixes, tails)
            written = cache.k[:, :n].clone()
            untouched = cache.k[:, 4 + n:].clone()
            graphed = graphs.run(4, prefixes, tails)
            assert torch.equal(graphed, padded)
            for i, (pk, _) in enumerate(prefixes):
                m = pk.shape[2] + 2
                assert torch.equal(cache.k[:, 4 + i, :, :m], written[:, i, :, :m])
            assert torch.equal(cache.k[:, 4 + n:], untouched)
            lengths = [pk.shape[2] for pk, _ in prefixes]
            positions = torch.tensor(lengths, device="cuda")[:, None] + torch.arange(2, device="cuda")
            plain = frames.backbone_step(tails, positions, torch.ones(n, dtype=torch.long, device="cuda"),
                                         max(lengths) + 2, row_start=0)
            torch.testing.assert_close(graphed.float(), plain.float(), atol=3e-2, rtol=3e-2)
    assert len(graphs) == len(graphs.buckets)  # nothing captured while serving


def test_long_prompt_buckets_replay_the_padded_eager_prefill(pipe, question_wav, ref_voice):
    """Buckets bounded by positions (`prefill_graph_tokens`): a conversation's long prompt replays
    a one-row 512 graph over the shared scratch, bitwise what the same padded prefill gives
    eagerly, after and before replays of other buckets that use the same scratch memory; an
    engine admitting long and short prompts streams through them without capturing anything new."""
    from chroma_triton.engine.prefill_graphs import PrefillGraphs

    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=8, capture_at_start=False))
    thinker = engine.thinker
    reply = "Sure, the weather today is sunny with a light breeze from the west."

    def prompt(turns, text="Hi."):
        earlier = [{"role": "user", "content": [{"type": "audio", "audio": question_wav}]},
                   {"role": "assistant", "content": reply}] * turns
        r = pipe.prepare(earlier + [{"role": "user", "content": [{"type": "audio", "audio": question_wav},
                                                                {"type": "text", "text": text}]}],
                         ref_voice[0], ref_voice[1], SamplingParams(seed=1, max_tokens=8))
        return [(torch.tensor(r.thinker_ids), r.audio_embeds)]

    gpu = torch.device("cuda", torch.cuda.current_device())
    eager = PrefillGraphs(thinker, 4, 512, torch.device("cpu"), max_tokens=512)  # no graphs, tensors on the GPU
    graphs = PrefillGraphs(thinker, 4, 512, gpu, max_tokens=512)
    assert graphs.scratch.positions == 512 and graphs.capture_all() and len(graphs) == len(graphs.buckets)
    long = prompt(3)
    assert 256 < long[0][0].numel() <= 512
    with torch.no_grad():
        for batch in (long, prompt(0) + prompt(0, "Why?"), long):
            h_pad, t_pad = (x.clone() for x in eager.prefill(0, batch))
            h_graph, t_graph = graphs.prefill(4, batch)
            assert torch.equal(h_graph, h_pad) and torch.equal(t_graph, t_pad)
            for i, (ids, _) in enumerate(batch):
                assert torch.equal(thinker.cache.k[:, 4 + i, :, :ids.numel()], thinker.cache.k[:, i, :, :ids.numel()])
            h_plain, _ = thinker.prefill(0, batch)
            torch.testing.assert_close(h_graph.float(), h_plain.float(), atol=3e-2, rtol=3e-2)
    assert len(graphs) == len(graphs.buckets)
    engine.shutdown()
    served = ChromaEngine(pipe.parts, EngineOptions(max_batch=4, prefill_graphs=True, prefill_graph_max_len=512,
                                                    prefill_graph_tokens=512)).start()
    try:
        captured = served.stats()["prefill_graphs"]
        reqs = [pipe.prepare([{"role": "user", "content": [{"type": "audio", "audio": question_wav}]},
                              {"role": "assistant", "content": reply}] * turns
                             + [{"role": "user", "content": [{"type": "audio", "audio": question_wav}]}],
                             ref_voice[0], ref_voice[1], SamplingParams(seed=turns, max_tokens=8)) for turns in (3, 0, 1)]
        codes = [_codes(served, r) for r in reqs]
        stats = served.stats()
        assert all(len(c) > 0 for c in codes)
        assert stats["prefill_graph_prompts"] == 3 and stats["prefill_eager_prompts"] == 0
        assert stats["prefill_graphs"] == captured  # every bucket captured at start
    finally:
        served.shutdown()


def test_compiled_prefill_graphs_match_the_eager_admission(pipe, question_wav, ref_voice, monkeypatch):
    """`compiled_prefill_graphs`: the admission graphs, captured through a compiled trunk's layers
    (inductor's fused kernels, other rounding), match the eager prefill and the eager backbone step
    within bf16 tolerance, and an engine with `compile` and the option serves through them."""
    from chroma_triton.engine.prefill_graphs import LENGTH_STEP, BackboneTailGraphs, PrefillGraphs
    from chroma_triton.engine.voice_prefix import copy_prefixes
    from chroma_triton.model import trunk

    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=8, capture_at_start=False))
    thinker, frames = engine.thinker, engine.frames
    reqs = [pipe.prepare([{"role": "user", "content": [{"type": "audio", "audio": question_wav},
                                                       {"type": "text", "text": t}]}], *voice,
                         SamplingParams(seed=1, max_tokens=8))
            for t, voice in (("Hi.", ref_voice), ("Tell me a long story about the sea.", (question_wav, "Hello.")))]
    prompts = [(torch.tensor(r.thinker_ids), r.audio_embeds) for r in reqs]
    gpu = torch.device("cuda", torch.cuda.current_device())
    lengths = []  # positions of every compiled layer call while capturing
    real = trunk.compiled_layer

    def counting():
        fn = real()
        return lambda layer, x, *rest: lengths.append(x.shape[1]) or fn(layer, x, *rest)
    thinker.lm.model.set_compiled(True)
    frames.set_compiled(True)
    try:
        prefill = PrefillGraphs(thinker, 4, 256, gpu, compiled=True)
        tails = BackboneTailGraphs(frames, 4, 512, gpu, compiled=True)
        with monkeypatch.context() as m:
            m.setattr(trunk, "compiled_layer", counting)
            assert prefill.capture_all()
            assert lengths and min(lengths) >= LENGTH_STEP  # captured through the compiled layers
            del lengths[:]
            assert tails.capture_all()
            assert lengths and set(lengths) == {2}
        with torch.no_grad():
            voices = [engine._voice_prefixes_of(0, [r])[0] for r in reqs]
            assert voices[0][0].shape[2] != voices[1][0].shape[2]
            h_graph, _ = prefill.prefill(4, prompts)
            with trunk.eager_layers():
                h_plain, _ = thinker.prefill(0, prompts)
            torch.testing.assert_close(h_graph.float(), h_plain.float(), atol=3e-2, rtol=3e-2)
            x = torch.randn(2, 2, frames.backbone.model.cfg.hidden_size, device=gpu,
                            generator=torch.Generator(device=gpu).manual_seed(0), dtype=h_plain.dtype)
            graphed = tails.run(4, voices, x)
            copy_prefixes(frames.backbone_cache, 0, voices)  # the plain step reads each row's own voice
            starts = [pk.shape[2] for pk, _ in voices]
            positions = torch.tensor(starts, device=gpu)[:, None] + torch.arange(2, device=gpu)
            with trunk.eager_layers():
                plain = frames.backbone_step(x, positions, torch.ones(2, dtype=torch.long, device=gpu),
                                             max(starts) + 2, row_start=0)
            torch.testing.assert_close(graphed.float(), plain.float(), atol=3e-2, rtol=3e-2)
    finally:
        thinker.lm.model.set_compiled(False)
        frames.set_compiled(False)
    engine.shutdown()
    served = ChromaEngine(pipe.parts, EngineOptions(max_batch=4, compile=True, prefill_graphs=True,
                                                    compiled_prefill_graphs=True)).start()
    try:
        codes = [_codes(served, r) for r in reqs]
        assert served.prefill_graphs.calls >= 1 and served.backbone_tails.calls >= 1
        assert all(len(c) > 0 for c in codes)
    finally:
        served.shutdown()
        pipe.parts.frame_model.set_compiled(False)
        pipe.parts.thinker_lm.model.set_compiled(False)


def test_prefix_cached_turns_prefill_what_the_admission_graphs_do(pipe, question_wav, ref_voice):
    """`thinker_prefix_cache_mib` on the GPU: conversations' later turns take their start from the
    cache and prefill the rest through a prefix rest graph, or eagerly (`prefill_after`: masked
    attention over the copied keys, SDPA's memory-efficient kernel); their states, greedy tokens
    and keys agree with the admission graphs' whole-prompt prefill within bf16 tolerance."""
    from test_engine import history_request
    from chroma_triton.engine.thinker_prefix import BLOCK, prompt_block_keys

    pipe.engine.shutdown()
    engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=8, prefill_graphs=True, thinker_prefix_cache_mib=64,
                                                    thinker_prefix_min_tokens=BLOCK))
    earlier = [history_request(pipe, question_wav, ref_voice, turns=t) for t in (0, 1)]
    later = [history_request(pipe, question_wav, ref_voice, turns=t) for t in (2, 3)]
    for r in earlier + later:
        r.prefix_keys = prompt_block_keys(r.thinker_ids, r.audio_embeds, pipe.parts.special.audio)
    thinker = engine.thinker
    with torch.no_grad():
        engine._prefill_thinker(0, [(r, None) for r in earlier], {})
        engine._store_prefixes(0, [(r, None) for r in earlier])
        items = [(r, None) for r in later]
        matches = engine._prefix_matches(items)
        assert len(matches) == 2
        h, t, counts = engine._prefill_thinker(2, items, matches)
        h = h.clone()  # the graphs' memory
        h_graph, t_graph, _ = engine._prefill_thinker(4, items, {})
        h_graph = h_graph.clone()
        h_eager, _ = thinker.prefill_after(6, [(torch.tensor(r.thinker_ids), r.audio_embeds) for r in later],
                                           [(m.length, m.k, m.v) for m in (matches[id(r)] for r in later)])
    assert counts["prefill_prefix_prompts"] == 2 and counts["prefill_prefix_graph_prompts"] == 2
    assert engine.prefill_graphs.calls >= 2 and len(engine.prefix_rest_graphs) >= 1
    for states in (h, h_eager):
        cos = torch.nn.functional.cosine_similarity(states.float(), h_graph.float()).min()
        assert cos > 0.999, cos
    for i, r in enumerate(later):
        n = len(r.thinker_ids)
        for row in (2 + i, 6 + i):
            a, b = thinker.cache.k[:, row, :, :n].float(), thinker.cache.k[:, 4 + i, :, :n].float()
            assert (a - b).abs().max() <= 0.05 * b.abs().max()


def test_fused_sampler_matches_pytorch_on_the_gpu():
    """The Triton sampler compiled: the token sampling.sample picks for float32 logits (but where
    exp/log round differently in the last bits), nothing top-k, top-p or greedy rule out for bf16
    logits with ties, as many tied tokens kept at a top-p cut as PyTorch keeps, and token
    frequencies within 0.03 of the allowed probabilities."""
    import kernel_checks as checks

    assert checks.agreement_with_pytorch("cuda", rows=512) >= 0.99
    assert checks.violations("cuda", rows=256) == []
    want, got = checks.top_p_ties("cuda")
    assert len(got) == len(want) == 3
    assert checks.follows_the_distribution("cuda", draws=8000) < 0.03


def test_gemv_matches_cublas_and_compiles(pipe):
    """gemv: F.linear within bf16 rounding for the model's single-row shapes (q/k/v with a bias);
    and a batch-1 thinker step through it, eager and inside torch.compile'd layers, gives the
    cuBLAS step's states to bf16 accuracy."""
    import kernel_checks as checks

    from chroma_triton.model import gemv

    shapes = ((1, 3072, 2048, False), (1, 2560, 2048, True), (1, 16384, 1024, False), (1, 2051, 2048, False),
              (2, 96, 200, True))
    assert max(checks.gemv_errors("cuda", torch.bfloat16, shapes)) <= 0.01
    parts = pipe.parts
    outs = []
    try:
        for on, compiled in ((False, False), (True, False), (True, True)):
            engine = ChromaEngine(parts, EngineOptions(max_batch=1, gemv=on))
            assert gemv.ENABLED is on
            parts.thinker_lm.model.set_compiled(compiled)
            with torch.inference_mode():
                outs.append(engine.thinker.decode(torch.tensor([11], device="cuda"), torch.tensor([3], device="cuda"),
                                                  key_len=16)[0].float())
    finally:
        parts.thinker_lm.model.set_compiled(False)
        gemv.ENABLED = False
    for other in outs[1:]:
        assert float(torch.nn.functional.cosine_similarity(outs[0], other, dim=-1).min()) >= 0.999
        assert float((outs[0] - other).abs().max()) <= 0.02 * float(outs[0].abs().max())


def test_fused_sampling_graphs_give_the_eager_codes(pipe, question_wav, ref_voice):
    """`fused_sampling` and `gemv`: graph replay reproduces the eager steps bitwise with the
    Triton sampler and single-row products too."""
    reqs = [pipe.prepare([{"role": "user", "content": [{"type": "audio", "audio": question_wav}]}], ref_voice[0],
                         ref_voice[1], SamplingParams(seed=s, max_tokens=20 + 5 * s, top_p=0.9 if s else 1.0))
            for s in range(3)]
    from chroma_triton.model import gemv

    results = {}
    try:
        for graphs in (False, True):
            engine = ChromaEngine(pipe.parts, EngineOptions(max_batch=4, cuda_graphs=graphs, fused_sampling=True,
                                                            gemv=True)).start()
            try:
                assert engine.frames.fused_sampling
                streams = [engine.submit(copy.deepcopy(r)) for r in reqs]
                results[graphs] = [np.concatenate([c.codes[c.context_frames:] for c in s if isinstance(c, AudioChunk)])
                                   for s in streams]
            finally:
                engine.shutdown()
    finally:  # the shared modules back to the defaults, for tests that reuse `pipe`
        pipe.parts.frame_model.fused_sampling = False
        gemv.ENABLED = False
    for eager, graph in zip(results[False], results[True]):
        np.testing.assert_array_equal(graph, eager)
