#!/usr/bin/env python3
"""GPU check of the SGLang thinker against the PyTorch thinker, on random checkpoints.

    python3 scripts/gpu_sglang_check.py --presets tiny --out sglang_check.json

Per preset (each phase is reported even when a later one fails):
1. equivalence: the same prompts (user speech + text, different lengths) through TorchThinker and
   SGLangThinker with the same protocol calls (batched prefill, then `--steps` decode steps over
   all rows): greedy tokens compared, post-norm hidden states compared over the positions where
   both fed the same tokens (max |diff|, max |diff| / max |ref|, cosine per position), both bf16.
2. thinker-only speed: PyTorch decode step (CUDA graph) at batch 1 and 64; SGLang greedy decode
   with 1 and 64 requests in flight (ms per step = wall / new tokens, EOS ignored).
3. the engine end to end with the SGLang thinker: one streaming request (text deltas, audio
   chunks, final event), compared with the same request on the PyTorch thinker.
4. engine benchmark at concurrency 1 and 64, PyTorch vs SGLang thinker (scripts/bench_engine.py's
   `run_level`: TTFA, ms per 80 ms frame, audio seconds per second).
Needs SGLang (0.5.17 with torch 2.11) importable and a CUDA device.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chroma_triton.engine import AudioChunk, ChromaEngine, EngineOptions, Finished, RequestFailed, SamplingParams, TextDelta  # noqa: E402
from chroma_triton.engine.graphs import StepRunner  # noqa: E402
from chroma_triton.model.loading import load_parts  # noqa: E402
from chroma_triton.model.sglang_thinker import SGLangThinker  # noqa: E402
from chroma_triton.model.thinker import TorchThinker  # noqa: E402
from chroma_triton.pipeline import ChromaPipeline  # noqa: E402

ASSETS = ROOT / "assets"
TEXTS = ("Hi.", "Tell me a long story about the sea, the ships and the people on them.", "Why?", None)


def log(*a):
    print(*a, flush=True)


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "scripts" / "bench_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_requests(pipe, frames=40):
    q = (ASSETS / "question_audio.wav").read_bytes()
    ref, ref_text = (ASSETS / "ref_audio.wav").read_bytes(), (ASSETS / "ref_audio.txt").read_text().strip()
    reqs = []
    for i, text in enumerate(TEXTS):
        content = [{"type": "audio", "audio": q}] + ([{"type": "text", "text": text}] if text else [])
        reqs.append(pipe.prepare([{"role": "user", "content": content}], ref, ref_text,
                                 SamplingParams(seed=100 + i, max_tokens=frames)))
    return reqs


def run_protocol(thinker, prompts, steps):
    """prefill rows 0..P-1, then `steps` decode steps over all rows: tokens [P, steps+1], states [P, steps+1, H]."""
    h, t = thinker.prefill(0, prompts)
    hs, ts = [h.float()], [t]
    pos = [len(ids) for ids, _ in prompts]
    for _ in range(steps):
        if hasattr(thinker, "prepare_decode"):
            thinker.prepare_decode(pos)
        h, t = thinker.decode(ts[-1], torch.tensor(pos, device=t.device), key_len=max(pos) + 1)
        hs.append(h[: len(pos)].float())
        ts.append(t[: len(pos)].clone())
        pos = [p + 1 for p in pos]
    return torch.stack(ts, 1).cpu(), torch.stack(hs, 1)


def run_forced(torch_thinker, prompts, tokens):
    """Teacher-forced PyTorch run: feed `tokens` [P, S+1] (SGLang's reply) instead of its own; returns
    states [P, S+1, H] and, per state, the PyTorch greedy id and the logit gap between that id and
    SGLang's token in PyTorch's logits (0 where they agree)."""
    lm = torch_thinker.lm
    h, _ = torch_thinker.prefill(0, prompts)
    dev = h.device
    tokens = tokens.to(dev)
    hs = [h.float()]
    pos = torch.tensor([len(ids) for ids, _ in prompts], device=dev)
    for k in range(tokens.shape[1] - 1):
        h, _ = torch_thinker.decode(tokens[:, k], pos, key_len=int(pos.max()) + 1)
        hs.append(h.float())
        pos = pos + 1
    hs = torch.stack(hs, 1)
    logits = lm.lm_head(hs.to(lm.lm_head.weight.dtype)).float()  # [P, S+1, V]
    mine = logits.argmax(-1)
    gap = logits.max(-1).values - logits.gather(-1, tokens[..., None])[..., 0]
    return hs, mine.cpu(), gap.cpu(), logits.max(-1).values.abs().cpu()


def compare_forced(ref_h, mine, gap, top, got_t, got_h) -> dict:
    agree = mine == got_t
    d = (ref_h - got_h).abs()
    cos = torch.nn.functional.cosine_similarity(ref_h, got_h, dim=-1)
    dis = [{"prompt": int(i), "state": int(k), "sglang_token": int(got_t[i, k]), "torch_token": int(mine[i, k]),
            "torch_logit_gap": float(gap[i, k]), "top_logit": float(top[i, k]),
            "bf16_ulp_at_top": float(2.0 ** (torch.floor(torch.log2(top[i, k])) - 7))}
           for i, k in (~agree).nonzero().tolist()]
    return {"states": int(agree.numel()), "token_agreement": float(agree.float().mean()), "disagreements": dis,
            "max_abs_diff": float(d.max()), "max_rel_diff": float(d.max() / ref_h.abs().max()),
            "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}


def compare(ref_t, ref_h, got_t, got_h) -> dict:
    per_prompt, diffs, rels, coss = [], [], [], []
    for i in range(ref_t.shape[0]):
        same = (ref_t[i] == got_t[i]).tolist()
        first_diff = same.index(False) if False in same else None
        # state k comes from feeding token k-1 (k >= 1); both fed the same tokens up to the first
        # differing one, so states 0..first_diff are comparable
        n = ref_t.shape[1] if first_diff is None else first_diff + 1
        a, b = ref_h[i, :n], got_h[i, :n]
        d = (a - b).abs()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        per_prompt.append({"first_differing_token": first_diff, "compared_states": n,
                           "max_abs_diff": float(d.max()), "max_rel_diff": float(d.max() / a.abs().max()),
                           "cosine_min": float(cos.min())})
        diffs.append(float(d.max()))
        rels.append(float(d.max() / a.abs().max()))
        coss.append(float(cos.min()))
    return {"tokens_equal": bool((ref_t == got_t).all()), "tokens_compared": int(ref_t.numel()),
            "max_abs_diff": max(diffs), "max_rel_diff": max(rels), "cosine_min": min(coss), "per_prompt": per_prompt,
            "ref_state_abs_max": float(ref_h.abs().max()), "ref_tokens": ref_t.tolist(), "sglang_tokens": got_t.tolist()}


def time_torch_decode(parts, prompt, rows, max_len, sizes=(1, 64), reps=50) -> dict:
    sizes = [b for b in sizes if b <= rows]
    th = TorchThinker(parts.thinker_lm, parts.config.thinker, rows, max_len)
    n = max(sizes)
    th.prefill(0, [prompt] * n)
    runner = StepRunner(use_graphs=True)
    out = {}
    plen = len(prompt[0])
    for b in sizes:
        tok = torch.full((b,), 9707, dtype=torch.long, device=parts.device)
        pos = torch.full((b,), plen, dtype=torch.long, device=parts.device)
        key_len = ((plen + 1 + 255) // 256) * 256

        def step(t, p):
            return th.decode(t, p, key_len=key_len)

        runner(("t", b), step, tok, pos)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            runner(("t", b), step, tok, pos)
        torch.cuda.synchronize()
        out[f"batch{b}_ms_per_step"] = (time.perf_counter() - t0) / reps * 1000
    del th
    return out


def time_sglang_decode(st: SGLangThinker, ids, sizes=(1, 64), new_tokens=128) -> dict:
    engine, loop = st.backend.engine, st.backend.loop
    out = {}

    def gen(n, k):
        sp = {"temperature": 0.0, "max_new_tokens": k, "ignore_eos": True}
        coro = engine.async_generate(input_ids=ids if n == 1 else [ids] * n, sampling_params=sp)
        return asyncio.run_coroutine_threadsafe(coro, loop).result(300)

    for n in sizes:
        gen(n, 8)  # warm-up
        t0 = time.perf_counter()
        res = gen(n, new_tokens)
        wall = time.perf_counter() - t0
        res = res if isinstance(res, list) else [res]
        toks = sum(r["meta_info"]["completion_tokens"] for r in res)
        out[f"requests{n}_ms_per_step"] = wall / new_tokens * 1000
        out[f"requests{n}_tok_per_s"] = toks / wall
    return out


def stream_one(engine, req) -> dict:
    t0 = time.perf_counter()
    out = {"text_deltas": 0, "audio_chunks": 0, "frames": 0, "text": "", "first_chunk_ms": None}
    codes = []
    for ev in engine.submit(copy.deepcopy(req)):
        if isinstance(ev, TextDelta):
            out["text_deltas"] += 1
            out["text"] += ev.text
        elif isinstance(ev, AudioChunk):
            if out["first_chunk_ms"] is None:
                out["first_chunk_ms"] = (time.perf_counter() - t0) * 1000
            out["audio_chunks"] += 1
            codes.append(ev.codes[ev.context_frames:])
        elif isinstance(ev, Finished):
            out.update(finish=ev.reason, text_tokens=ev.text_tokens, frames=ev.audio_frames)
        elif isinstance(ev, RequestFailed):
            out["failed"] = ev.message
    out["codes"] = np.concatenate(codes).tolist() if codes else []
    return out


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def check_preset(ckpt: str, *, rows=64, steps=32, max_len=512, backbone_len=768, frames=40, engine=True, bench=True,
                 engine_kwargs=None, report_path=None, device="cuda", make_sglang=None) -> dict:
    """`make_sglang(parts, rows, max_len)` replaces SGLangThinker.from_parts (a CPU dry run uses a stand-in)."""
    rep: dict = {"checkpoint": ckpt, "rows": rows, "steps": steps, "max_len": max_len}

    def save():
        if report_path:
            Path(report_path).write_text(json.dumps(rep, indent=1, default=str))

    t = time.perf_counter()
    parts = load_parts(ckpt, device=device)
    pipe = ChromaPipeline(parts, EngineOptions(max_batch=1, thinker_max_len=max_len, backbone_max_len=backbone_len))
    reqs = make_requests(pipe, frames)
    pipe.close()
    prompts = [(torch.tensor(r.thinker_ids, device=device), r.audio_embeds) for r in reqs]
    rep["prompt_tokens"] = [len(r.thinker_ids) for r in reqs]
    rep["load_s"] = time.perf_counter() - t
    log("loaded", rep["prompt_tokens"])

    with torch.inference_mode():
        ref_t, ref_h = run_protocol(TorchThinker(parts.thinker_lm, parts.config.thinker, len(prompts), max_len), prompts, steps)
    _sync(device)
    try:
        rep["torch_decode"] = time_torch_decode(parts, prompts[0], rows, max_len)
        log("torch decode", rep["torch_decode"])
    except Exception:
        rep["torch_decode_error"] = traceback.format_exc()
    save()

    t = time.perf_counter()
    st = (make_sglang(parts, rows, max_len) if make_sglang else
          SGLangThinker.from_parts(parts, rows, max_len, engine_kwargs=engine_kwargs, timeout_s=300))
    rep["sglang_start_s"] = time.perf_counter() - t
    log(f"sglang engine up in {rep['sglang_start_s']:.1f} s")
    try:
        with torch.inference_mode():
            got_t, got_h = run_protocol(st, prompts, steps)
        for r in range(len(prompts)):
            st.release_row(r)
        rep["equivalence"] = compare(ref_t, ref_h, got_t, got_h)
        rep.update({k: rep["equivalence"][k] for k in ("tokens_equal", "max_abs_diff", "max_rel_diff", "cosine_min")})
        log("equivalence", {k: rep[k] for k in ("tokens_equal", "max_abs_diff", "max_rel_diff", "cosine_min")})
        log("first differing token per prompt", [p["first_differing_token"] for p in rep["equivalence"]["per_prompt"]])
        save()
        try:
            with torch.inference_mode():
                f = run_forced(TorchThinker(parts.thinker_lm, parts.config.thinker, len(prompts), max_len), prompts, got_t)
            rep["teacher_forced"] = compare_forced(f[0], f[1], f[2], f[3], got_t, got_h)
            log("teacher forced", json.dumps(rep["teacher_forced"])[:1500])
        except Exception:
            rep["teacher_forced_error"] = traceback.format_exc()
        save()
        try:
            text_ids = [t for t in reqs[1].thinker_ids if t != parts.special.audio]  # a text-only prompt
            rep["sglang_decode"] = time_sglang_decode(st, text_ids)
            log("sglang decode", rep["sglang_decode"])
        except Exception:
            rep["sglang_decode_error"] = traceback.format_exc()
        save()
        opts = dict(max_batch=rows, thinker_max_len=max_len, backbone_max_len=backbone_len)
        if engine:
            try:
                e = {}
                for name in ("torch", "sglang"):
                    eng = ChromaEngine(parts, EngineOptions(**opts), thinker=st if name == "sglang" else None).start()
                    try:
                        e[name] = stream_one(eng, reqs[0])
                    finally:
                        eng.shutdown()
                    del eng
                    if torch.device(device).type == "cuda":
                        torch.cuda.empty_cache()
                e["same_text"] = e["torch"]["text"] == e["sglang"]["text"]
                e["same_codes"] = e["torch"]["codes"] == e["sglang"]["codes"]
                for name in ("torch", "sglang"):
                    e[name].pop("codes")
                rep["engine_stream"] = e
                log("engine stream", json.dumps(e)[:600])
            except Exception:
                rep["engine_stream_error"] = traceback.format_exc()
            save()
        if bench:
            try:
                bm = _bench_module()
                b = {}
                for name in ("torch", "sglang"):
                    eng = ChromaEngine(parts, EngineOptions(**opts), thinker=st if name == "sglang" else None).start()
                    try:
                        for c in (1, rows):
                            bm.run_level(eng, reqs[0], c, frames)  # warm-up (graph capture)
                            r = bm.run_level(eng, reqs[0], c, frames)
                            b[f"{name}_c{c}"] = {k: r[k] for k in ("ttfa_ms_p50", "ttfa_ms_p90", "ms_per_frame_p50", "ms_per_frame_p99",
                                                                   "rtf_p50", "audio_s_per_s", "underrun_streams", "finish")}
                            log(name, c, b[f"{name}_c{c}"])
                            rep["bench"] = b
                            save()
                    finally:
                        eng.shutdown()
                    del eng
                    if torch.device(device).type == "cuda":
                        torch.cuda.empty_cache()
                rep["thinker_counters"] = dict(st.counters)
            except Exception:
                rep["bench_error"] = traceback.format_exc()
            save()
    finally:
        st.close()
    return rep


def add_tiny_h64_preset():
    """`tiny` with a one-head thinker (head_dim 64 instead of 16): a fallback in case an SGLang
    kernel rejects the tiny preset's head_dim 16."""
    from chroma_triton.checkpoint import factory

    p = copy.deepcopy(factory.PRESETS["tiny"])
    th = p["thinker"]
    text = {k: th["text_config"][k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
    text.update(num_attention_heads=1, num_key_value_heads=1)
    p["thinker"] = factory._thinker_config(text, th["audio_config"], th["vision_config"])
    factory.PRESETS["tiny_h64"] = p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="tiny")
    ap.add_argument("--fallback", default="tiny_h64", help="preset to try when a preset's SGLang phase fails ('' = none)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--engine-kwargs", default="{}", help="JSON: extra sglang.Engine arguments")
    ap.add_argument("--work", default="/tmp/chroma-sglang-check")
    ap.add_argument("--out", default="sglang_check.json")
    args = ap.parse_args()
    from chroma_triton.checkpoint.factory import make_checkpoint

    import sglang

    report = {"torch": torch.__version__, "sglang": sglang.__version__, "device": torch.cuda.get_device_name(0),
              "date": time.strftime("%Y-%m-%d"), "presets": {}}
    out = Path(args.out)
    add_tiny_h64_preset()
    presets = args.presets.split(",")
    for preset in presets:
        t = time.perf_counter()
        ckpt = make_checkpoint(Path(args.work) / preset, preset, 0, with_visual=False)
        log(f"{preset} checkpoint made in {time.perf_counter() - t:.0f} s")
        part = out.with_name(f"{out.stem}_{preset}.json")
        try:
            report["presets"][preset] = check_preset(str(ckpt), rows=args.rows, steps=args.steps, max_len=args.max_len,
                                                     frames=args.frames, engine=not args.no_engine, bench=not args.no_bench,
                                                     engine_kwargs=json.loads(args.engine_kwargs), report_path=part)
        except Exception:
            report["presets"][preset] = {"error": traceback.format_exc()}
            if part.exists():
                report["presets"][preset]["partial"] = json.loads(part.read_text())
            log(report["presets"][preset]["error"])
        out.write_text(json.dumps(report, indent=1, default=str))
        r = report["presets"][preset]
        if args.fallback and "equivalence" not in r and "equivalence" not in r.get("partial", {}) \
                and args.fallback not in presets:
            log(f"{preset}: no SGLang result; trying fallback preset {args.fallback}")
            presets.append(args.fallback)
    log("REPORT " + json.dumps({p: {k: v for k, v in r.items() if k not in ("equivalence",)}
                               for p, r in report["presets"].items()}, default=str)[:6000])


if __name__ == "__main__":
    main()
