#!/usr/bin/env python3
"""Engine benchmark: the naive reference-style loop vs our engine (eager and CUDA graphs), in one run.

    python scripts/bench_engine.py --model /data/chroma-full --device cuda --concurrency 1,8,64,256 \
        --frames 100 --out results.json

Without --model it writes a random checkpoint (--preset, default full) to --make-dir first.
Measures, per concurrency level: time to first audio chunk (p50/p90/p99, from submit), per-stream
steady-state ms per 80 ms frame (-> RTF and real-time margin), playback underruns (a chunk arriving
after the audio before it would have finished playing), aggregate audio seconds per second, and GPU
memory. Mimi decoding is timed separately (in the server it runs in codec_decoder, concurrently).
Prints a markdown table last; the JSON has every number.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chroma_triton.bench.conversation import conversation  # noqa: E402
from chroma_triton.engine import AudioChunk, ChromaEngine, EngineOptions, Finished, SamplingParams  # noqa: E402
from chroma_triton.model.loading import load_parts  # noqa: E402
from chroma_triton.pipeline import ChromaPipeline  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "assets"
FRAME_S = 0.08


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_request(pipe, seed: int, frames: int, turns: int = 0):
    """The README request; with ``turns``, a conversation's next turn after that many earlier
    exchanges (chroma_triton/bench/conversation.py)."""
    messages = conversation([{"type": "audio", "audio": (ASSETS / "question_audio.wav").read_bytes()}] * (turns + 1))
    return pipe.prepare(messages, (ASSETS / "ref_audio.wav").read_bytes(), (ASSETS / "ref_audio.txt").read_text().strip(),
                        SamplingParams(seed=seed, max_tokens=frames, temperature=1.0, top_p=1.0))


def run_level(engine: ChromaEngine, template, concurrency: int, frames: int) -> dict:
    """Submit `concurrency` requests at once; time every chunk as it arrives."""
    results = [None] * concurrency
    t_submit = time.perf_counter()

    def consume(i, stream):
        first, arrivals, underruns, n = None, [], 0, 0
        for ev in stream:
            now = time.perf_counter()
            if isinstance(ev, AudioChunk):
                new = len(ev.codes) - ev.context_frames
                if first is None:
                    first = now
                elif now > first + ev.start_frame * FRAME_S:
                    underruns += 1
                arrivals.append((now, ev.start_frame + new))
                n = ev.start_frame + new
            elif isinstance(ev, Finished):
                results[i] = {"ttfa": first - t_submit if first else None, "frames": n, "reason": ev.reason,
                              "arrivals": arrivals, "underruns": underruns}

    before = dict(engine.counters)
    streams = []
    for i in range(concurrency):
        req = copy.deepcopy(template)
        req.sampling = SamplingParams(seed=1000 + i, max_tokens=frames)
        streams.append(engine.submit(req))
    threads = [threading.Thread(target=consume, args=(i, s)) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_submit
    per_frame = []
    for r in results:
        (t0, f0), (t1, f1) = r["arrivals"][0], r["arrivals"][-1]
        if f1 > f0:
            per_frame.append((t1 - t0) / (f1 - f0) * 1000)
    total_frames = sum(r["frames"] for r in results)
    delta = {k: engine.counters[k] - before[k] for k in ("steps", "gpu_step_s", "gpu_idle_s", "host_wait_s",
                                                          "host_step_s", "host_cpu_s")}
    steps = max(delta["steps"], 1)
    ttfa = [r["ttfa"] * 1000 for r in results]
    return {
        "concurrency": concurrency, "frames_per_stream": frames, "wall_s": wall,
        "ttfa_ms_p50": pct(ttfa, 50), "ttfa_ms_p90": pct(ttfa, 90), "ttfa_ms_p99": pct(ttfa, 99),
        "ms_per_frame_p50": pct(per_frame, 50), "ms_per_frame_p99": pct(per_frame, 99),
        "rtf_p50": pct(per_frame, 50) / (FRAME_S * 1000), "rtf_worst": max(per_frame) / (FRAME_S * 1000),
        "realtime_margin_min": (FRAME_S * 1000) / max(per_frame),
        "underrun_streams": sum(1 for r in results if r["underruns"]),
        "audio_s_per_s": total_frames * FRAME_S / wall,
        "finish": sorted({r["reason"] for r in results}),
        # where a step's wall time goes (CUDA): the GPU on it, the GPU idle before it (waiting for
        # the host), the host blocked on its codes (waiting for the GPU)
        "steps": delta["steps"], "gpu_ms_per_step": delta["gpu_step_s"] * 1000 / steps,
        "gpu_idle_ms_per_step": delta["gpu_idle_s"] * 1000 / steps,
        "host_wait_ms_per_step": delta["host_wait_s"] * 1000 / steps,
        # the engine thread: wall and CPU time per step (the gap: waiting for the GIL or a core)
        "host_ms_per_step": delta["host_step_s"] * 1000 / steps,
        "host_cpu_ms_per_step": delta["host_cpu_s"] * 1000 / steps,
    }


def time_reference(path, device, dtype, template, frames: int) -> dict:
    from chroma_triton.reference import ReferenceChroma

    ref = ReferenceChroma.from_checkpoint(path, device=device, dtype=dtype)
    req = copy.deepcopy(template)
    req.sampling = SamplingParams(seed=1, max_tokens=frames).validated(50, 10**6)
    ref.generate(copy.deepcopy(req))  # warm-up
    sync(device)
    t = time.perf_counter()
    _, codes, _ = ref.generate(req)
    sync(device)
    dt = time.perf_counter() - t
    del ref
    return {"frames": len(codes), "ms_per_frame": dt / len(codes) * 1000, "rtf": dt / len(codes) / FRAME_S}


def compare_codes(parts, template, frames: int, a: dict, b: dict) -> dict:
    """One request's codes under engine options `a` and `b` (same seed): equal, or where they part."""
    out = []
    for extra in (a, b):
        eng = ChromaEngine(parts, EngineOptions(**{"max_batch": 4, "thinker_max_len": 1024, "backbone_max_len": 1024,
                                                   **extra})).start()
        req = copy.deepcopy(template)
        req.sampling = SamplingParams(seed=42, max_tokens=frames)
        chunks = [ev for ev in eng.submit(req) if isinstance(ev, AudioChunk)]
        out.append(np.concatenate([c.codes[c.context_frames:] for c in chunks]))
        eng.shutdown()
    same = out[0].shape == out[1].shape and bool((out[0] == out[1]).all())
    n = min(len(out[0]), len(out[1]))
    first_diff = None if same else int(np.argmax((out[0][:n] != out[1][:n]).any(axis=1)))
    return {"frames": len(out[1]), "bitwise_equal": same, "first_differing_frame": first_diff,
            "equal_code_fraction": float((out[0][:n] == out[1][:n]).mean())}


def graph_vs_eager(parts, template, frames: int) -> dict:
    return compare_codes(parts, template, frames, {"cuda_graphs": False}, {"cuda_graphs": True})


def time_codec(parts, device, chunk=10, context=12, reps=20) -> dict:
    codec = parts.codec
    codes = np.random.default_rng(0).integers(0, parts.config.codebook_size, (chunk + context, parts.config.num_codebooks))
    codec.decode_chunk(codes, context)
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        codec.decode_chunk(codes, context)
    sync(device)
    return {"chunk_frames": chunk, "context_frames": context, "ms_per_chunk": (time.perf_counter() - t) / reps * 1000}


def profile_kernels(parts, template, frames: int, top: int = 25, compile: bool = False,
                    overrides: dict | None = None) -> dict:
    """Kernels of `frames` eager batch-1 frames (the same kernels a CUDA graph replays), grouped by name."""
    from torch.profiler import ProfilerActivity, profile

    eng = ChromaEngine(parts, EngineOptions(**{"max_batch": 1, "thinker_max_len": 512, "backbone_max_len": 768,
                                               "cuda_graphs": False, "compile": compile, **(overrides or {})})).start()
    req = copy.deepcopy(template)
    req.sampling = SamplingParams(seed=5, max_tokens=frames + 8)
    stream = eng.submit(req)
    got = 0
    for ev in stream:  # let it start (prefill, first frames) before profiling steady decoding
        if isinstance(ev, AudioChunk):
            got += len(ev.codes) - ev.context_frames
            if got >= 4:
                break
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        before = eng.counters["frames"]
        for ev in stream:
            pass
        sync(parts.device)
        done = eng.counters["frames"] - before
    eng.shutdown()
    rows = [(e.key, e.count, e.device_time_total) for e in prof.key_averages()
            if e.device_time_total > 0 and e.count > 0]
    total_n = sum(r[1] for r in rows)
    total_us = sum(r[2] for r in rows)
    rows.sort(key=lambda r: -r[2])
    return {"frames": done, "kernels_per_frame": total_n / max(done, 1), "gpu_us_per_frame": total_us / max(done, 1),
            "top": [{"kernel": k[:120], "per_frame": n / max(done, 1), "us_per_frame": us / max(done, 1)}
                    for k, n, us in rows[:top]]}


def run_compiled(report: dict, parts, template, args, levels: list[int]) -> None:
    """The same levels on an engine whose layers and sampler run through torch.compile."""
    report["compile_vs_plain"] = compare_codes(parts, template, 24, {}, {"compile": True})
    print("compile_vs_plain", report["compile_vs_plain"], flush=True)
    t = time.perf_counter()
    engine = ChromaEngine(parts, EngineOptions(max_batch=max(levels), thinker_max_len=args.thinker_max_len,
                                               backbone_max_len=args.backbone_max_len, compile=True)).start()
    report["levels_compiled"] = []
    for c in levels:
        run_level(engine, template, c, args.frames)  # warm-up: compiles, then captures
        if c == levels[0]:
            report["compile_warmup_s"] = time.perf_counter() - t
        for overlap in args.overlap.split(","):
            engine.opts.overlap = overlap == "on"
            r = run_level(engine, template, c, args.frames)
            r["pacing"], r["compile"], r["overlap"] = "on", True, overlap
            r["speedup_vs_naive_per_stream"] = report["baseline_naive"]["ms_per_frame"] / r["ms_per_frame_p50"]
            report["levels_compiled"].append(r)
            print(json.dumps(r), flush=True)
    engine.shutdown()  # the next engine over these parts sets the compile switch from its own options


def parse_variant(spec: str) -> dict:
    """"name=value;name=value" -> EngineOptions overrides, each value parsed as its field's type."""
    types = {f.name: f.type for f in dataclasses.fields(EngineOptions)}
    out = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        name, eq, value = item.partition("=")
        kind = types.get(name)
        if not eq:
            raise SystemExit(f"--variants: {item!r} is not name=value")
        if kind is None:
            raise SystemExit(f"--variants: EngineOptions has no field {name!r}")
        kind = kind if isinstance(kind, str) else kind.__name__
        out[name] = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "on", "yes")}.get(kind, str)(value)
    return out


def run_variants(report: dict, parts, template, args) -> None:
    """Each --variants entry on an engine of its own (compiled per --variant-compile), at
    --variant-levels, --variant-repeats timed passes each after a warm-up; with --profile-frames,
    also its batch-1 kernel profile."""
    levels = [int(c) for c in args.variant_levels.split(",")]
    compiled = args.variant_compile == "on" or (args.variant_compile == "auto" and parts.device.type == "cuda")
    report["variants"] = []
    switch_interval = sys.getswitchinterval()
    for spec in args.variants:
        overrides = parse_variant(spec)
        sys.setswitchinterval(switch_interval)  # process-wide: undo an earlier variant's
        if overrides:  # one seeded request, plain engines (graphs, no compile): same codes as the defaults?
            report["variants"].append({"variant": spec, "vs_defaults": compare_codes(parts, template, 24, {}, overrides)})
            print(spec, "vs defaults:", report["variants"][-1]["vs_defaults"], flush=True)
        engine = ChromaEngine(parts, EngineOptions(**{"max_batch": max(levels), "thinker_max_len": args.thinker_max_len,
                                                      "backbone_max_len": args.backbone_max_len, "compile": compiled,
                                                      **overrides})).start()
        for c in levels:
            run_level(engine, template, c, args.frames)  # warm-up: compiles, then captures
            for _ in range(args.variant_repeats):
                r = run_level(engine, template, c, args.frames)
                r["variant"], r["compile"] = spec or "baseline", compiled
                report["variants"].append(r)
                print(json.dumps(r), flush=True)
        engine.shutdown()
        if args.profile_frames:
            prof = profile_kernels(parts, template, args.profile_frames, compile=compiled, overrides=overrides)
            report["variants"].append({"variant": spec or "baseline", "profile_batch1": prof})
            print(spec or "baseline", "profile: %.1f kernels, %.0f us GPU per frame"
                  % (prof["kernels_per_frame"], prof["gpu_us_per_frame"]), flush=True)
    sys.setswitchinterval(switch_interval)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--make-dir", default="/tmp/chroma-bench-ckpt")
    ap.add_argument("--preset", default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--concurrency", default="1,8,64,256")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--baseline-frames", type=int, default=30)
    ap.add_argument("--thinker-max-len", type=int, default=512)
    ap.add_argument("--backbone-max-len", type=int, default=768)
    ap.add_argument("--pacing", default="on,off", help="admission pacing modes to run each level with")
    ap.add_argument("--overlap", default="on",
                    help="overlap modes (on,off) to run each level with: launch step n+1 before reading step n")
    ap.add_argument("--profile-frames", type=int, default=0, help="profile N eager batch-1 frames (CUDA kernels)")
    ap.add_argument("--compile-levels", default="",
                    help="also run these levels on an engine with compile=True (torch.compile), after the plain one")
    ap.add_argument("--variants", nargs="*", default=[],
                    help='engines with EngineOptions overrides to compare, e.g. "" (defaults) '
                         '"math_attention=thinker,backbone,decoder" "topk_segments=8;switch_interval_ms=0.5"')
    ap.add_argument("--variant-levels", default="1", help="levels each variant runs")
    ap.add_argument("--variant-repeats", type=int, default=3, help="timed passes per variant and level")
    ap.add_argument("--variant-compile", choices=("auto", "on", "off"), default="auto",
                    help="variants' engines with compile (auto: on a GPU)")
    ap.add_argument("--best-params-out", help="write the launcher flags (--param=chroma_lm.K=V ...) of the "
                    "variant fastest at the first variant level and no slower (3 %%) than the defaults at the others")
    ap.add_argument("--variants-only", action="store_true",
                    help="skip the naive baseline, eager engine and plain/compiled level sweeps")
    ap.add_argument("--out", default="bench_engine.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    path = args.model
    if path is None:
        from chroma_triton.checkpoint.factory import make_checkpoint

        t = time.perf_counter()
        path = str(make_checkpoint(args.make_dir, args.preset, 0, with_visual=False))
        print(f"made {args.preset} checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    parts = load_parts(path, device=device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(parts.dtype), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    pipe = ChromaPipeline(parts, EngineOptions(max_batch=1, thinker_max_len=args.thinker_max_len,
                                               backbone_max_len=args.backbone_max_len))
    template = make_request(pipe, 0, args.frames)
    pipe.close()
    report["prompt_tokens"] = len(template.thinker_ids)
    if args.variants_only:
        run_variants(report, parts, template, args)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print_variants(report)
        if args.best_params_out:
            write_best_params(report, args.best_params_out)
        return
    report["baseline_naive"] = time_reference(path, device, parts.dtype, template, args.baseline_frames)
    print("baseline", report["baseline_naive"], flush=True)
    eager = ChromaEngine(parts, EngineOptions(max_batch=1, thinker_max_len=args.thinker_max_len,
                                              backbone_max_len=args.backbone_max_len, cuda_graphs=False)).start()
    run_level(eager, template, 1, args.frames)
    report["engine_eager_c1"] = run_level(eager, template, 1, args.frames)
    eager.shutdown()
    del eager
    print("eager", report["engine_eager_c1"], flush=True)
    if device.type == "cuda":
        report["graph_vs_eager"] = graph_vs_eager(parts, template, 24)
        print("graph_vs_eager", report["graph_vs_eager"], flush=True)
    engine = ChromaEngine(parts, EngineOptions(max_batch=max(levels), thinker_max_len=args.thinker_max_len,
                                               backbone_max_len=args.backbone_max_len)).start()
    report["capacity"] = engine.capacity.describe()
    report["levels"] = []
    for c in levels:
        run_level(engine, template, c, args.frames)  # warm-up: captures this level's graphs
        for mode, overlap in [(m, o) for m in args.pacing.split(",") for o in args.overlap.split(",")]:
            engine.opts.admission_pacing, engine.opts.overlap = mode == "on", overlap == "on"
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            r = run_level(engine, template, c, args.frames)
            r["pacing"], r["overlap"] = mode, overlap
            if device.type == "cuda":
                r["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                r["gpu_mem_reserved_gib"] = torch.cuda.memory_reserved(device) / 2**30
            r["speedup_vs_naive_per_stream"] = report["baseline_naive"]["ms_per_frame"] / r["ms_per_frame_p50"]
            report["levels"].append(r)
            print(json.dumps(r), flush=True)
    report["graphs_captured"] = engine.stats()["graphs"]
    engine.shutdown()
    if args.compile_levels and device.type == "cuda":
        run_compiled(report, parts, template, args, [int(c) for c in args.compile_levels.split(",")])
    if args.variants:
        run_variants(report, parts, template, args)
    report["kv_cache_gib"] = (engine.thinker.cache.nbytes() + parts.frame_model.backbone_cache.nbytes()) / 2**30
    report["codec"] = time_codec(parts, device)
    if args.profile_frames and device.type == "cuda":
        report["profile_batch1"] = profile_kernels(parts, template, args.profile_frames)
        print("profile", json.dumps(report["profile_batch1"], indent=1), flush=True)
        if args.compile_levels:
            report["profile_batch1_compiled"] = profile_kernels(parts, template, args.profile_frames, compile=True)
            print("profile compiled", json.dumps(report["profile_batch1_compiled"], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    b = report["baseline_naive"]
    print(f"\n{report['device']} {report['dtype']} prompt {report['prompt_tokens']} tokens, {args.frames} frames/stream")
    print(f"naive reference loop (batch 1): {b['ms_per_frame']:.1f} ms/frame, RTF {b['rtf']:.3f}")
    e = report["engine_eager_c1"]
    print(f"engine eager (batch 1): {e['ms_per_frame_p50']:.1f} ms/frame, RTF {e['rtf_p50']:.3f}, TTFA {e['ttfa_ms_p50']:.0f} ms")
    print("| streams | pacing, overlap | TTFA p50/p90/p99 ms | ms/frame p50 (worst) | RTF p50 | min real-time margin | underrun streams | audio s/s | x naive | GPU peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["levels"] + report.get("levels_compiled", []):
        print(f"| {r['concurrency']} | {r['pacing']}, {r.get('overlap', 'on')}{' compiled' if r.get('compile') else ''} | {r['ttfa_ms_p50']:.0f}/{r['ttfa_ms_p90']:.0f}/{r['ttfa_ms_p99']:.0f} | "
              f"{r['ms_per_frame_p50']:.2f} ({r['ms_per_frame_p99']:.2f}) | {r['rtf_p50']:.3f} | {r['realtime_margin_min']:.1f}x | "
              f"{r['underrun_streams']} | {r['audio_s_per_s']:.1f} | {r['speedup_vs_naive_per_stream']:.1f} | {r.get('gpu_mem_peak_gib', 0):.1f} |")
    print(f"codec: {report['codec']}; graphs captured: {report['graphs_captured']}; "
          f"graph vs eager: {report.get('graph_vs_eager')}; compile vs plain: {report.get('compile_vs_plain')}")
    print_variants(report)


def best_variant(report: dict) -> str:
    """The variant with the lowest median ms per frame at the first level, among those within 3 %
    of the defaults ("" / "baseline") at every other level; "" when none beats the defaults."""
    runs: dict[str, dict[int, list[float]]] = {}
    for r in report.get("variants", []):
        if "concurrency" in r:
            runs.setdefault(r["variant"], {}).setdefault(r["concurrency"], []).append(r["ms_per_frame_p50"])
    med = {v: {c: float(np.median(x)) for c, x in by.items()} for v, by in runs.items()}
    base = med.get("baseline")
    if not base:
        return ""
    first = next(iter(base))
    ok = [v for v, by in med.items() if v != "baseline" and all(by.get(c, 1e9) <= 1.03 * b for c, b in base.items())]
    best = min(ok, key=lambda v: med[v][first], default="")
    return best if best and med[best][first] < base[first] else ""


def write_best_params(report: dict, path: str) -> None:
    best = best_variant(report)
    flags = [f"--param=chroma_lm.{item.strip()}" for item in best.split(";") if item.strip()]
    Path(path).write_text(" ".join(flags) + "\n")
    print(f"best variant: {best or 'the defaults'} -> {path}: {' '.join(flags)}", flush=True)


def print_variants(report: dict) -> None:
    rows = [r for r in report.get("variants", []) if "concurrency" in r]
    if not rows:
        return
    print("\n| variant | streams | ms/frame p50 | GPU ms/step | GPU idle ms/step | host wait ms/step | TTFA ms | audio s/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['concurrency']} | {r['ms_per_frame_p50']:.2f} | {r['gpu_ms_per_step']:.2f} | "
              f"{r['gpu_idle_ms_per_step']:.2f} | {r['host_wait_ms_per_step']:.2f} | {r['ttfa_ms_p50']:.0f} | "
              f"{r['audio_s_per_s']:.1f} |")
    for r in report["variants"]:
        if "profile_batch1" in r:
            prof = r["profile_batch1"]
            print(f"{r['variant']}: {prof['kernels_per_frame']:.0f} kernels, {prof['gpu_us_per_frame']:.0f} us GPU per frame (batch-1 profile)")


if __name__ == "__main__":
    main()
