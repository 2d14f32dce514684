"""The SGLang thinker: backend selection, the SGLang model folder, the shared hidden-state buffer,
and SGLangThinker's ahead-generation bookkeeping inside the engine.

SGLang has no CPU wheel, so on CPU machines the generation backend is a PyTorch stand-in
(`TorchAheadBackend`) that writes hidden states exactly the way the SGLang model class does
(`scatter_hidden` at `position - base` in a slot parsed from the request id). Everything except
SGLang itself (the scheduler process, its kernels and CUDA graphs) runs here; the real thing is
checked by `test_real_sglang_matches_torch_thinker` (skipped without SGLang + CUDA) and by
`scripts/gpu_sglang_check.py` on a GPU machine.
"""

from __future__ import annotations

import copy
import json
import threading
import time

import numpy as np
import pytest
import torch

from chroma_triton.engine import AudioChunk, ChromaEngine, EngineOptions, Finished, RequestFailed, SamplingParams, TextDelta
from chroma_triton.model import loading
from chroma_triton.model.loading import make_thinker, resolve_thinker_backend, sglang_available
from chroma_triton.model.sglang_thinker import (ARCHITECTURE, SGLangThinker, ThinkerError, make_rid, parse_rid,
                                                prepare_model_dir, scatter_hidden)
from chroma_triton.model.thinker import TorchThinker
from chroma_triton.pipeline import ChromaPipeline

NEEDS_SGLANG = "needs SGLang and a CUDA device: SGLang ships no CPU wheel (run scripts/gpu_sglang_check.py on a GPU machine)"


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    p = ChromaPipeline.from_pretrained(tiny_checkpoint, options=EngineOptions(max_batch=4))
    p.engine.shutdown()
    yield p


@pytest.fixture(scope="module")
def parts(pipe):
    return pipe.parts


def make_request(pipe, question_wav, ref_voice, text="Tell me something.", seed=7, max_tokens=14):
    content = [{"type": "audio", "audio": question_wav}, {"type": "text", "text": text}]
    return pipe.prepare([{"role": "user", "content": content}], ref_voice[0], ref_voice[1],
                        SamplingParams(seed=seed, max_tokens=max_tokens))


class TorchAheadBackend:
    """Stand-in for SGLang: each request's greedy reply is generated ahead on its own thread by a
    batch-1 TorchThinker; hidden states land in the shared buffer via `scatter_hidden`."""

    def __init__(self, parts, delay_s: float = 0.0, fail_when=None):
        self.lm, self.cfg = parts.thinker_lm, parts.config.thinker
        self.delay_s, self.fail_when = delay_s, fail_when
        self.aborted: set[str] = set()
        self.submitted: list = []
        self.closed = False

    def start(self, thinker):
        self.thinker = thinker

    def submit(self, req):
        self.submitted.append(req)
        threading.Thread(target=self._run, args=(req,), daemon=True).start()

    def abort(self, req):
        self.aborted.add(req.rid)

    def close(self):
        self.closed = True

    def _write(self, req, h, pos):
        th = self.thinker
        scatter_hidden(th.hidden, h, torch.tensor([req.slot]), torch.tensor([req.base]), torch.tensor([pos]))

    def _run(self, req):
        th = self.thinker
        try:
            with torch.inference_mode():
                if self.fail_when is not None and self.fail_when(req):
                    raise RuntimeError("injected backend failure")
                tt = TorchThinker(self.lm, self.cfg, rows=1, max_len=th.max_len)
                audio = req.audio_embeds if req.audio_positions else None
                h, t = tt.prefill(0, [(torch.tensor(req.input_ids), audio)])
                pos = len(req.input_ids) - 1
                self._write(req, h, pos)
                out = [int(t)]
                th.on_output(req, out)
                while out[-1] != req.stop_token_id and len(out) < req.max_new_tokens:
                    if req.rid in self.aborted:
                        th.on_output(req, out, {"type": "abort", "message": "aborted"})
                        return
                    time.sleep(self.delay_s)
                    pos += 1
                    h, t = tt.decode(torch.tensor([out[-1]]), torch.tensor([pos]), key_len=pos + 1)
                    self._write(req, h, pos)
                    out.append(int(t))
                    th.on_output(req, out)
                th.on_output(req, out, {"type": "stop" if out[-1] == req.stop_token_id else "length"})
        except Exception as exc:
            th.on_error(req, f"{type(exc).__name__}: {exc}")
        finally:
            th.on_done(req)


def ahead_thinker(parts, rows, max_len, **backend_kw) -> SGLangThinker:
    return SGLangThinker(parts.thinker_lm.model.embed_tokens, parts.config.thinker, rows, max_len,
                         im_end_id=parts.special.im_end, backend=TorchAheadBackend(parts, **backend_kw),
                         hidden_dtype=torch.float32, timeout_s=30)


# -- backend selection ----------------------------------------------------------------------------
def test_backend_selection(monkeypatch):
    assert resolve_thinker_backend("torch", "cpu") == "torch"
    assert resolve_thinker_backend("auto", "cpu") == "torch"
    assert resolve_thinker_backend(None, "cpu") == "torch"
    assert resolve_thinker_backend(" Torch ", "cuda") == "torch"
    with pytest.raises(ValueError, match="auto, torch, sglang"):
        resolve_thinker_backend("vllm", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_thinker_backend("sglang", "cpu")
    monkeypatch.setattr(loading, "sglang_available", lambda: False)
    assert resolve_thinker_backend("auto", "cuda") == "torch"
    with pytest.raises(ImportError, match="chroma-triton\\[sglang\\]"):
        resolve_thinker_backend("sglang", "cuda:0")
    monkeypatch.setattr(loading, "sglang_available", lambda: True)
    assert resolve_thinker_backend("auto", "cuda:0") == "sglang"
    assert resolve_thinker_backend("sglang", "cuda") == "sglang"
    assert resolve_thinker_backend("auto", "cpu") == "torch"


def test_engine_default_backend_is_torch_and_sglang_on_cpu_fails_clearly(parts):
    assert EngineOptions().thinker_backend == "torch"
    assert isinstance(make_thinker(parts, "auto", 2, 64), TorchThinker)
    engine = ChromaEngine(parts, EngineOptions(max_batch=2, thinker_max_len=64, backbone_max_len=256))
    assert isinstance(engine.thinker, TorchThinker)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ChromaEngine(parts, EngineOptions(max_batch=2, thinker_backend="sglang"))


# -- the pieces shared with the SGLang model class ---------------------------------------------------
def test_request_ids():
    rid = make_rid("chromaabc", 7, 41)
    assert parse_rid(rid, "chromaabc") == (7, 41)
    assert parse_rid(rid, "chromaxyz") == (-1, 0)
    assert parse_rid("warmup-1", "chromaabc") == (-1, 0)
    assert parse_rid(None, "chromaabc") == (-1, 0)
    others = [make_rid("chromaabc", 7, 41) for _ in range(50)]
    assert not any(a != b and b.startswith(a) for a in others for b in others)  # SGLang aborts by prefix


def test_scatter_hidden_places_states_and_drops_the_rest():
    buf = torch.zeros(3 + 2, 6, 4)  # 3 slots, trash row 3, zero row 4
    hidden = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4) + 1
    slot = torch.tensor([0, 0, 0, 2, -1, 1])
    base = torch.tensor([2, 2, 2, 0, 0, 0])
    pos = torch.tensor([1, 2, 3, 5, 0, 9])  # before the prompt's last position, idx 0, idx 1, idx 5, not ours, out of range
    scatter_hidden(buf, hidden, slot, base, pos)
    assert torch.equal(buf[0, 0], hidden[1]) and torch.equal(buf[0, 1], hidden[2])
    assert torch.equal(buf[2, 5], hidden[3])
    assert buf[1].abs().sum() == 0 and buf[4].abs().sum() == 0
    assert buf[0, 2:].abs().sum() == 0


def test_model_folder_matches_the_torch_thinker(parts, tmp_path):
    """The folder SGLang loads: a Qwen2 config naming our class, links to the Chroma shards and an
    index of thinker LM keys only. transformers' Qwen2 built from that config and those tensors
    gives the TorchThinker's post-norm states and greedy tokens (so the config is right: rope theta,
    eps, head_dim, biases, untied head)."""
    from safetensors import safe_open
    from transformers import AutoConfig, Qwen2ForCausalLM

    cfg = parts.config.thinker
    out = prepare_model_dir(parts.folder, cfg, tmp_path / "m", eos_token_id=parts.special.im_end, context_length=513)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and config["model_type"] == "qwen2"
    assert config["eos_token_id"] == parts.special.im_end
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index and all(k.startswith(("thinker.model.", "thinker.lm_head.")) for k in index)
    assert any(k == "thinker.lm_head.weight" for k in index)
    assert all((out / f).is_symlink() for f in set(index.values()))

    hf = Qwen2ForCausalLM(AutoConfig.from_pretrained(out)).eval()
    state = {}
    for f in set(index.values()):
        with safe_open(str(out / f), framework="pt") as fh:
            state.update({k[len("thinker."):]: fh.get_tensor(k).float() for k in fh.keys() if k in index})
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 151644, 77091, 198]])
    with torch.inference_mode():
        out_hf = hf(ids, output_hidden_states=True)
        ours = TorchThinker(parts.thinker_lm, cfg, rows=1, max_len=64)
        h, t = ours.prefill(0, [(ids[0], None)])
    torch.testing.assert_close(out_hf.hidden_states[-1][0, -1], h[0], atol=1e-4, rtol=1e-4)
    assert int(out_hf.logits[0, -1].argmax()) == int(t[0])


# -- SGLangThinker's bookkeeping (PyTorch stand-in backend) ------------------------------------------
def test_ahead_thinker_gives_the_torch_thinker_tokens_and_states(pipe, parts, question_wav, ref_voice):
    """Same protocol calls on both: batched prefill of prompts of different lengths, decode steps
    over all rows, a row move (compaction) in between."""
    reqs = [make_request(pipe, question_wav, ref_voice, text=t) for t in ("Hi.", "Tell me a long story about the sea.", "Why?")]
    prompts = [(torch.tensor(r.thinker_ids), r.audio_embeds) for r in reqs]
    torch_t = TorchThinker(parts.thinker_lm, parts.config.thinker, rows=4, max_len=256)
    ahead = ahead_thinker(parts, rows=4, max_len=256, delay_s=0.001)
    try:
        with torch.inference_mode():
            outs = {}
            for name, th in (("torch", torch_t), ("ahead", ahead)):
                h, t = th.prefill(0, prompts)
                hs, ts = [h], [t]
                pos = [len(r.thinker_ids) for r in reqs]
                for step in range(6):
                    if step == 3:  # row 0 leaves, row 2 moves into it (engine compaction)
                        if hasattr(th, "release_row"):
                            th.release_row(0)
                        th.move_row(2, 0)
                        pos = [pos[2], pos[1]]
                        hs = [x[[2, 1]] for x in hs]
                        ts = [x[[2, 1]] for x in ts]
                    if hasattr(th, "prepare_decode"):
                        th.prepare_decode(pos)
                    h, t = th.decode(ts[-1], torch.tensor(pos), key_len=max(pos) + 1)
                    hs.append(h[: len(pos)])
                    ts.append(t[: len(pos)])
                    pos = [p + 1 for p in pos]
                outs[name] = (hs, ts)
        for (h1, t1), (h2, t2) in zip(zip(*outs["torch"]), zip(*outs["ahead"])):
            assert torch.equal(t1, t2)
            torch.testing.assert_close(h2.float(), h1.float(), atol=1e-4, rtol=1e-4)
    finally:
        ahead.close()


def _collect(stream):
    out = {"text": "", "codes": [], "finished": None, "failed": None}
    for ev in stream:
        if isinstance(ev, TextDelta):
            out["text"] += ev.text
        elif isinstance(ev, AudioChunk):
            out["codes"].append(ev.codes[ev.context_frames:])
        elif isinstance(ev, Finished):
            out["finished"] = ev
        elif isinstance(ev, RequestFailed):
            out["failed"] = ev
    out["codes"] = np.concatenate(out["codes"]) if out["codes"] else np.zeros((0, 8), int)
    return out


def test_engine_with_ahead_thinker_streams_what_the_torch_thinker_streams(pipe, parts, question_wav, ref_voice):
    opts = dict(max_batch=4, thinker_max_len=256, backbone_max_len=512)
    reqs = [make_request(pipe, question_wav, ref_voice, text=t, seed=s, max_tokens=12 + 3 * s)
            for s, t in enumerate(("Hi.", "Tell me a long story about the sea.", "Why?"))]
    results = {}
    for name in ("torch", "ahead"):
        thinker = ahead_thinker(parts, 4, 256, delay_s=0.002) if name == "ahead" else None
        engine = ChromaEngine(parts, EngineOptions(**opts), thinker=thinker).start()
        try:
            results[name] = [_collect(s) for s in [engine.submit(copy.deepcopy(r)) for r in reqs]]
            if thinker is not None:
                assert thinker.counters["submitted"] == 3
                # generating ahead stops at what the request can consume, not at the context limit
                budgets = sorted(r.max_new_tokens for r in thinker.backend.submitted)
                assert budgets == sorted(r.sampling.max_tokens // 2 + 2 for r in reqs)
        finally:
            engine.shutdown()
            if thinker is not None:
                thinker.close()
    for a, b in zip(results["torch"], results["ahead"]):
        assert b["failed"] is None and b["finished"].reason == a["finished"].reason
        assert b["text"] == a["text"] and b["finished"].text_tokens == a["finished"].text_tokens
        np.testing.assert_array_equal(b["codes"], a["codes"])


def test_capture_at_start_covers_the_ahead_thinkers_steps(pipe, parts, question_wav, ref_voice, recording_runner):
    """With a thinker that generates ahead (SGLang), the talking step still asks for a thinker graph
    (a gather from its buffers) per batch and key-length bucket: capture_at_start asks for those
    too, and served requests need nothing else (the CPU has no graphs: a runner records the keys
    with the GPU's buckets)."""
    from chroma_triton.engine.graphs import batch_buckets, length_buckets

    thinker = ahead_thinker(parts, 4, 512, delay_s=0.001)
    engine = ChromaEngine(parts, EngineOptions(max_batch=4, thinker_max_len=512, backbone_max_len=512),
                          thinker=thinker)
    engine._batch_sizes = batch_buckets(4)
    engine._thinker_lens = engine._backbone_lens = length_buckets(512, 256)
    engine.runner = engine.thinker_runner = recording_runner
    try:
        engine._capture_step_graphs()
        asked = set(recording_runner.keys)
        assert {key for key in asked if key[0] == "thinker"} == {("thinker", b, n) for b in (1, 2, 4) for n in (256, 512)}
        recording_runner.keys.clear()
        engine.start()
        reqs = [make_request(pipe, question_wav, ref_voice, seed=s, max_tokens=10 + 3 * s) for s in range(3)]
        results = [_collect(s) for s in [engine.submit(copy.deepcopy(r)) for r in reqs]]
    finally:
        engine.shutdown()
        thinker.close()
    assert all(r["failed"] is None and r["finished"] is not None for r in results)
    used = set(recording_runner.keys)
    assert any(key[0] == "thinker" for key in used) and used <= asked, used - asked


def test_cancel_aborts_the_backend_request_and_frees_its_slot(pipe, parts, question_wav, ref_voice):
    thinker = ahead_thinker(parts, 2, 256, delay_s=0.05)  # slow: still generating when cancelled
    engine = ChromaEngine(parts, EngineOptions(max_batch=2, thinker_max_len=256, backbone_max_len=512), thinker=thinker).start()
    try:
        stream = engine.submit(make_request(pipe, question_wav, ref_voice, max_tokens=400))
        for ev in stream:
            if isinstance(ev, AudioChunk):
                stream.cancel()
                break
        fin = [ev for ev in stream if isinstance(ev, Finished)]
        assert fin and fin[0].reason == "cancelled"
        req = thinker.backend.submitted[0]
        deadline = time.time() + 10
        while not req.done and time.time() < deadline:
            time.sleep(0.01)
        assert req.rid in thinker.backend.aborted and req.done and req.released
        assert sorted(thinker._free) == list(range(thinker.slots))  # the slot came back
        out = _collect(engine.submit(make_request(pipe, question_wav, ref_voice, max_tokens=6)))
        assert out["failed"] is None and out["finished"].reason in ("length", "stop")
    finally:
        engine.shutdown()
        thinker.close()
    assert thinker.backend.closed


def test_backend_errors_fail_only_their_request(pipe, parts, question_wav, ref_voice):
    bad_text = "Please fail."
    bad_ids = None

    def fail_when(req):
        return bad_ids is not None and req.input_ids == bad_ids

    thinker = ahead_thinker(parts, 4, 256, fail_when=fail_when)
    engine = ChromaEngine(parts, EngineOptions(max_batch=4, thinker_max_len=256, backbone_max_len=512), thinker=thinker).start()
    try:
        bad = make_request(pipe, question_wav, ref_voice, text=bad_text)
        bad_ids = list(bad.thinker_ids)
        good = make_request(pipe, question_wav, ref_voice, max_tokens=8)
        streams = [engine.submit(copy.deepcopy(r)) for r in (good, bad, good)]
        outs = [_collect(s) for s in streams]
        assert outs[1]["failed"] is not None and "injected backend failure" in outs[1]["failed"].message
        for o in (outs[0], outs[2]):
            assert o["failed"] is None and o["finished"].reason in ("length", "stop")
    finally:
        engine.shutdown()
        thinker.close()


def test_decode_errors_surface_instead_of_hanging(parts):
    th = ahead_thinker(parts, 2, 64)
    try:
        with pytest.raises(ThinkerError, match="holds no thinker request"):
            th.prepare_decode([10])
    finally:
        th.close()


# -- the real thing ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and sglang_available()), reason=NEEDS_SGLANG)
def test_real_sglang_matches_torch_thinker(tiny_checkpoint):
    """Against the PyTorch thinker on the tiny checkpoint, fed SGLang's own reply (teacher forcing):
    post-norm states within bf16 tolerance (cosine >= 0.999, max |diff| <= 5% of max |state|) and the
    same greedy ids except at bf16 near-ties. The full report: scripts/gpu_sglang_check.py."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "gpu_sglang_check.py"
    spec = importlib.util.spec_from_file_location("gpu_sglang_check", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_sglang_check"] = mod
    spec.loader.exec_module(mod)
    report = mod.check_preset(str(tiny_checkpoint), rows=8, steps=16, engine=False, bench=False)
    forced = report["teacher_forced"]
    assert forced["cosine_min"] >= 0.999 and forced["max_rel_diff"] <= 0.05, report
    # greedy ids agree wherever PyTorch's top two logits are more than four bf16 steps apart
    assert all(d["torch_logit_gap"] <= 4 * d["bf16_ulp_at_top"] for d in forced["disagreements"]), forced
