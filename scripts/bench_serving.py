#!/usr/bin/env python3
"""Serving benchmark: the whole stack, measured from outside, through the OpenAI frontend (HTTP SSE)
and through Triton gRPC streaming, with the naive reference loop as the baseline in the same run.

    # start the stack itself (launcher: tritonserver + frontend), a random checkpoint when no --model
    python scripts/bench_serving.py --start --model /data/chroma-full --dp-size 1 --out serving.json
    # or measure a running stack
    python scripts/bench_serving.py --frontend-url http://localhost:8000 --grpc-url localhost:8001 \
        --metrics-url http://localhost:8002/metrics --model /data/chroma-full

Every stream sends the README's example (question audio + the reference voice, which the server's
voice cache holds: it is the default voice, encoded at start-up, and the warm-up sends it too);
each level sends all its streams at once (or spread over --ramp-s). Per level and path: TTFA
p50/p90/p99, ms of wall time per 80 ms frame after the first chunk (-> RTF, real-time margin),
playback underruns, aggregate audio seconds per second, errors, GPU memory (nvidia-smi) and
Triton's metrics. Prints a markdown table last; --out has every number (docs/benchmarks.md
"How to measure" explains them).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from chroma_triton.bench.clients import Workload, parse_turns  # noqa: E402
from chroma_triton.bench.drive import DriveSettings, drive_level, warm_worker  # noqa: E402
from chroma_triton.bench.monitor import Monitor, per_request_us  # noqa: E402
from chroma_triton.bench.procs import PySpy, cpu_deltas, cpu_snapshot, server_processes  # noqa: E402
from chroma_triton.serving.repository import MODELS  # noqa: E402
from chroma_triton.bench.stack import LaunchedStack  # noqa: E402
from chroma_triton.bench.stats import FRAME_MS, summarize  # noqa: E402

PATHS = ("frontend", "grpc")


# -- the naive baseline (scripts/bench_engine.py's time_reference), in a child process so its
#    memory is gone before the stack is measured ----------------------------------------------
def naive_baseline(model: str, device: str, frames: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_engine
    from chroma_triton.engine import EngineOptions
    from chroma_triton.model.loading import load_parts
    from chroma_triton.pipeline import ChromaPipeline

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    parts = load_parts(model, device=torch.device(device))
    pipe = ChromaPipeline(parts, EngineOptions(max_batch=1, thinker_max_len=512, backbone_max_len=768))
    template = bench_engine.make_request(pipe, 0, frames)
    pipe.close()
    dtype = parts.dtype
    del pipe, parts
    out = bench_engine.time_reference(model, torch.device(device), dtype, template, frames)
    out.update(device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
               dtype=str(dtype), prompt_tokens=len(template.thinker_ids))
    return out


def run_baseline(args, model: str | None) -> dict | None:
    if args.baseline_frames <= 0:
        return None
    if not model:
        print("no --model: the naive baseline is skipped (ratios need it)", flush=True)
        return None
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        result = pool.submit(naive_baseline, model, args.baseline_device, args.baseline_frames).result()
    print("naive baseline", json.dumps(result), flush=True)
    return result


# -- one level ---------------------------------------------------------------------------------
async def run_level(path: str, streams: int, args, targets: dict, workload: Workload, *, monitor: bool,
                    workers=None) -> dict:
    settings = DriveSettings(seed=args.seed, ramp_s=args.ramp_s, request_timeout=args.request_timeout,
                             rounds=args.rounds if monitor else 1,  # warm-ups: one round
                             run=secrets.randbits(31))  # --conversations: this run's own conversations
    mon = Monitor(targets.get("metrics"), grpc_url=targets.get("grpc")) if monitor else None
    spies = []
    if mon:
        mon.start()
        server_procs = server_processes(args.server_match)
        cpu_before = cpu_snapshot(server_procs)
        if streams in args.spy_levels:
            spies = [PySpy(Path(args.out).parent, args.spy_s, role=role, match=args.server_match) for role in args.spy_roles]
            spy_files = [f for spy in spies for f in spy.start(f"{path}{streams}")]
    # started_unix: to read the server's traces (codec_decoder's trace_path) against the level
    started, started_unix = time.perf_counter(), time.time()
    records, lag = await drive_level(path, streams, settings, targets, workload, workers, args.client_procs)
    finished = time.perf_counter()
    procs = min(args.client_procs, streams) if workers is not None and streams > 1 else 1
    out = {"path": path, "concurrency": streams, "rounds": settings.rounds, "client_procs": procs,
           "started_unix": round(started_unix, 3), **summarize(records, started, finished), **lag}
    if mon:
        out["server_cpu"] = cpu_deltas(cpu_before, cpu_snapshot(server_procs), finished - started)
        if spies:
            out["pyspy"] = {"files": spy_files, "errors": [e for spy in spies for e in spy.wait()]}
        server = mon.finish(wall_s=finished - started)
        out.update(server)
        out["audio_encoder_compute_us_per_request"] = per_request_us(server["triton_counters_delta"], "audio_encoder")
        peak = server["gpu_mem_peak_mib"]
        out["gpu_mem_peak_gib_max"] = max(peak.values()) / 1024 if peak else None
    if args.keep_streams:
        out["per_stream"] = [{"ttfa_ms": None if r.ttfa_s is None else r.ttfa_s * 1000, "ms_per_frame": r.ms_per_frame(),
                              "underruns": r.underruns()[0], "samples": r.samples, "chunks": len(r.chunks),
                              "usage_frames": r.usage_frames, "finish": r.finish_reason, "error": r.error}
                             for r in records]
    return out


def add_ratios(level: dict, baseline: dict | None) -> None:
    if not baseline or not level.get("ms_per_frame_p50"):
        return
    naive = baseline["ms_per_frame"]
    level["x_naive_per_stream_p50"] = naive / level["ms_per_frame_p50"]
    level["x_naive_per_stream_worst"] = naive / level["ms_per_frame_worst"]
    naive_audio_s_per_s = FRAME_MS / naive  # one naive stream: 80 ms of audio every `naive` ms
    level["x_naive_aggregate"] = level["audio_s_per_s"] / naive_audio_s_per_s


async def measure(args, targets: dict, baseline: dict | None) -> list[dict]:
    workload = Workload(max_tokens=args.max_tokens, inline_audio=args.inline_audio, history_turns=args.history_turns,
                        conversations=args.conversations)
    workers = None
    if args.client_procs > 1:  # started (and their imports done) before any level is timed
        workers = ProcessPoolExecutor(args.client_procs, mp_context=get_context("spawn"))
        for f in [workers.submit(warm_worker) for _ in range(args.client_procs)]:
            f.result()
    try:
        return await _measure_levels(args, targets, baseline, workload, workers)
    finally:
        if workers is not None:
            workers.shutdown()


async def _measure_levels(args, targets, baseline, workload, workers) -> list[dict]:
    levels = []
    for path in args.via:
        warm = []
        for _ in range(args.warmup):  # also fills the voice cache (content hash of prompt_audio)
            warm.append(await run_level(path, 1, args, targets, workload, monitor=False, workers=workers))
        print(f"{path}: warm-up TTFA ms {[round(w['ttfa_ms_p50'] or -1) for w in warm]}, "
              f"errors {sum(w['errors'] for w in warm)}", flush=True)
        for c in args.concurrency:
            if args.level_warmup and c > 1:
                await run_level(path, c, args, targets, workload, monitor=False, workers=workers)
            level = await run_level(path, c, args, targets, workload, monitor=True, workers=workers)
            add_ratios(level, baseline)
            levels.append(level)
            print(f"{path} x{c}: TTFA p50 {fmt(level['ttfa_ms_p50'])} ms, {fmt(level['ms_per_frame_p50'], '.2f')} ms/frame "
                  f"p50, {level['underrun_streams']} underrun request(s) of {level['requests']}, "
                  f"{fmt(level['audio_s_per_s'], '.1f')} audio s/s ({fmt(level['audio_s_per_s_all_busy'], '.1f')} while "
                  f"all streams were busy), {level['errors']} error(s) {level['error_samples'] or ''}", flush=True)
            print("  engine: " + engine_summary(level), flush=True)
            print("  encoder and codec: " + encoder_codec_summary(level), flush=True)
            print("  server CPU cores: " + ", ".join(
                f"{role} {fmt(v['cores'], '.2f')} (hottest threads {v['hot_threads_cores']})"
                for role, v in level["server_cpu"].items()), flush=True)
    return levels


# -- report ------------------------------------------------------------------------------------
def family_sum(samples: dict, name: str) -> float:
    """A metric family's values in `samples` ("family{labels}" -> value, as the monitor keeps them)
    summed over its label sets (instances)."""
    return sum(v for k, v in samples.items() if k.split("{")[0] == name)


def engine_summary(level: dict) -> str:
    """The chroma_lm counters of a level that explain its late chunks: admissions (and those
    forced in past the pacer), chunks the engine itself put out late (the rest of the late
    chunks the client saw were delayed after the engine: codec, Triton, network, client), the
    garbage collections that stopped its process, and the admitted prompts by prefill path
    (admission graphs, eager, the rest after a stored prefix: thinker_prefix_cache_mib)."""
    deltas = level.get("triton_counters_delta")
    if not deltas:
        return "– (no chroma_lm counters: metrics not scraped)"

    def total(name: str) -> float:
        return family_sum(deltas, name)

    imports = ""
    if total("chroma_lm_prefix_imports_total") or total("chroma_lm_prefix_imports_lost_total"):  # shared_thinker_prefixes
        imports = (f"; {total('chroma_lm_prefix_imports_total'):.0f} copied from another instance, "
                   f"{total('chroma_lm_prefix_import_tokens_total'):.0f} positions in "
                   f"{total('chroma_lm_prefix_import_seconds_total'):.2f} s, "
                   f"{total('chroma_lm_prefix_imports_lost_total'):.0f} thrown away")
    return (f"{total('chroma_lm_prefills_total'):.0f} prefills ({total('chroma_lm_prefill_seconds_total'):.2f} s; "
            f"pacer's estimates {total('chroma_lm_prefill_estimate_seconds_total'):.2f} s, overrun "
            f"{total('chroma_lm_prefill_overrun_seconds_total'):.2f} s), "
            f"{total('chroma_lm_forced_admissions_total'):.0f} forced admissions, "
            f"{total('chroma_lm_late_chunks_total'):.0f} chunks late at the engine "
            f"({total('chroma_lm_late_chunk_seconds_total'):.2f} s in all); "
            f"client saw {level.get('underrun_chunks', 0)} late chunk(s); "
            f"{total('chroma_lm_gc_full_collections_total'):.0f} full garbage collections "
            f"({total('chroma_lm_gc_full_seconds_total'):.2f} s; all collections {total('chroma_lm_gc_seconds_total'):.2f} s); "
            f"prompts {total('chroma_lm_prefill_graph_prompts_total'):.0f} through graphs, "
            f"{total('chroma_lm_prefill_eager_prompts_total'):.0f} eager, "
            f"{total('chroma_lm_prefill_prefix_prompts_total'):.0f} after a stored prefix "
            f"({total('chroma_lm_prefill_prefix_graph_prompts_total'):.0f} of them through graphs; "
            f"{total('chroma_lm_prefill_prefix_tokens_total'):.0f} positions reused{imports})" + thinker_prefix_summary(level))


def thinker_prefix_summary(level: dict) -> str:
    """The thinker prefix cache over a level: the turns that came back to a stored and to a dropped
    prompt, and its peak fill against its bound (summed over instances); empty without it."""
    peaks, deltas = level.get("triton_gauges_peak") or {}, level.get("triton_counters_delta") or {}
    bound = family_sum(peaks, "chroma_lm_thinker_prefix_bound_bytes")
    if not bound:
        return ""
    return (f"; thinker prefix cache: {family_sum(deltas, 'chroma_lm_thinker_prefix_returns_held_total'):.0f} turns "
            f"came back to their stored prompt, {family_sum(deltas, 'chroma_lm_thinker_prefix_returns_dropped_total'):.0f} "
            f"to a dropped one, peak {family_sum(peaks, 'chroma_lm_thinker_prefix_bytes') / (1 << 30):.2f} of "
            f"{bound / (1 << 30):.2f} GiB")


def encoder_codec_summary(level: dict) -> str:
    """The level's user clips by how they got their embeddings (audio_encoder's clip cache) and its
    audio chunks by how codec_decoder decoded them."""
    deltas = level.get("triton_counters_delta") or {}

    def by_how(name: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, value in deltas.items():
            if key.split("{")[0] == name and "," in key:
                how = key.rstrip("}").rsplit(",", 1)[1]
                out[how] = out.get(how, 0.0) + value
        return out

    clips, chunks = by_how("chroma_audio_encoder_clips_total"), by_how("chroma_codec_chunks_total")
    stages, requests = by_how("chroma_audio_encoder_seconds_total"), deltas.get("nv_inference_count{audio_encoder}")
    per_request = ""
    if stages and requests:
        per_request = ("; audio_encoder ms per request: "
                       + ", ".join(f"{stage} {1e3 * stages[stage] / requests:.1f}"
                                   for stage in ("voice", "features", "tower", "output") if stage in stages))
    return (f"user clips {clips.get('embedded', 0):.0f} embedded, {clips.get('reused', 0):.0f} reused, "
            f"{clips.get('shared', 0):.0f} from another instance; "
            f"codec chunks " + ", ".join(f"{chunks.get(h, 0):.0f} {h}" for h in ("carried", "adopted", "restarted", "stateless"))
            + per_request)


def fmt(value, spec: str = ".0f", suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def print_table(report: dict, previous: dict | None) -> None:
    b = report["baseline_naive"]
    print(f"\n{report['max_tokens']} frames per reply; {report['dp_size'] or '?'} chroma_lm instance(s); "
          f"levels {report['concurrency']}")
    if b:
        print(f"naive reference loop (batch 1, {b['device']}, {b['frames']} frames): "
              f"{b['ms_per_frame']:.1f} ms/frame, RTF {b['rtf']:.3f}")
    else:
        print("naive reference loop: not run (no --model, or --baseline-frames 0)")
    print("| path | streams | TTFA p50/p90/p99 ms | ms/frame p50 (worst) | RTF p50 | min real-time margin | "
          "underrun requests | audio s/s (all busy) | x naive per stream (p50) | x naive aggregate | errors | GPU peak GiB |"
          + (" audio s/s (all busy) vs previous |" if previous else ""))
    print("|---" * (12 + bool(previous)) + "|")
    before = {(lv["path"], lv["concurrency"]): lv for lv in (previous or {}).get("levels", [])}
    for lv in report["levels"]:
        streams = f"{lv['concurrency']}" + (f" x {lv['rounds']}" if lv["rounds"] > 1 else "")
        row = (f"| {lv['path']} | {streams} | {fmt(lv['ttfa_ms_p50'])}/{fmt(lv['ttfa_ms_p90'])}/"
               f"{fmt(lv['ttfa_ms_p99'])} | {fmt(lv['ms_per_frame_p50'], '.2f')} ({fmt(lv['ms_per_frame_worst'], '.2f')}) | "
               f"{fmt(lv['rtf_p50'], '.3f')} | {fmt(lv['realtime_margin_min'], '.1f', 'x')} | "
               f"{lv['underrun_streams']}/{lv['requests']} | "
               f"{fmt(lv['audio_s_per_s'], '.1f')} ({fmt(lv.get('audio_s_per_s_all_busy'), '.1f')}) | "
               f"{fmt(lv.get('x_naive_per_stream_p50'), '.1f')} | "
               f"{fmt(lv.get('x_naive_aggregate'), '.1f')} | {lv['errors']} | {fmt(lv.get('gpu_mem_peak_gib_max'), '.1f')} |")
        if previous:
            old = before.get((lv["path"], lv["concurrency"]))
            ratio = lv["audio_s_per_s"] / old["audio_s_per_s"] if old and old.get("audio_s_per_s") else None
            busy = (lv["audio_s_per_s_all_busy"] / old["audio_s_per_s_all_busy"]
                    if old and old.get("audio_s_per_s_all_busy") and lv.get("audio_s_per_s_all_busy") else None)
            row += f" {fmt(ratio, '.2f', 'x')} ({fmt(busy, '.2f', 'x')}) |"
        print(row)
    print_executions(report)
    print_best_ratio(report, previous)
    lag = max((lv["client_loop_lag_ms_max"] for lv in report["levels"]), default=0)
    print(f"client event-loop lag, worst: {lag:.0f} ms (large values mean the client, not the server, set the pace)")


def best_throughput(report: dict, path: str, key: str) -> float | None:
    values = [lv.get(key) for lv in report.get("levels", []) if lv["path"] == path and lv.get(key)]
    return max(values) if values else None


def print_best_ratio(report: dict, previous: dict | None) -> None:
    """The best throughput over the levels of each run, per path (e.g. dp 2 vs dp 1, each at the
    load that suits it), overall and while all streams were busy."""
    if not previous:
        return
    for path in report["via"]:
        parts = []
        for key, name in (("audio_s_per_s", "level"), ("audio_s_per_s_all_busy", "all busy")):
            new, old = best_throughput(report, path, key), best_throughput(previous, path, key)
            if new and old:
                parts.append(f"{name} {new:.1f} vs {old:.1f} audio-s/s = {new / old:.2f}x")
        if parts:
            print(f"best throughput over the levels, {path}: " + "; ".join(parts))


def print_executions(report: dict) -> None:
    """Where the server spent its time per level: each model's executions (Triton statistics)."""
    rows = [(lv, name, e) for lv in report["levels"] for name, e in sorted((lv.get("model_executions") or {}).items())
            if name in ("audio_encoder", "chroma_lm", "stream_watch", "codec_decoder")]
    if not rows:
        return
    print("\n| path | streams | model | executions | requests per execution | ms per execution | busy s | busy share of wall |")
    print("|---" * 8 + "|")
    for lv, name, e in rows:
        print(f"| {lv['path']} | {lv['concurrency']} | {name} | {e['executions']} | {e['requests_per_execution']:.1f} | "
              f"{e['ms_per_execution']:.1f} | {e['busy_s']:.1f} | {fmt(e['busy_share'], '.2f')} |")


# -- main --------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", action="store_true", help="start the stack (scripts/chroma_server.sh's launcher) and stop it at the end")
    ap.add_argument("--model", help="checkpoint folder: served with --start, and the naive baseline's model")
    ap.add_argument("--preset", default=None, help="with --start and no --model: write a random checkpoint "
                    "(scripts/make_checkpoint.py presets; default full with a GPU, else tiny)")
    ap.add_argument("--make-dir", default=None, help="where that checkpoint goes (default /tmp/chroma-bench-<preset>; reused)")
    ap.add_argument("--dp-size", type=int, default=1, help="with --start: chroma_lm instances (GPUs)")
    ap.add_argument("--launcher-arg", action="append", default=[], metavar="ARG",
                    help="with --start: passed to the launcher, e.g. --launcher-arg=--max-batch=256 (repeatable)")
    ap.add_argument("--workdir", default=None, help="with --start: logs and the rendered repository")
    ap.add_argument("--frontend-url", default="http://localhost:8000")
    ap.add_argument("--grpc-url", default="localhost:8001")
    ap.add_argument("--metrics-url", default=None, help="Triton's /metrics (default with --start: its own; else none)")
    ap.add_argument("--via", default="frontend,grpc", help="paths to measure: frontend, grpc or both")
    ap.add_argument("--concurrency", default="1,8,64,256", help="streams per level, all sent at once")
    ap.add_argument("--max-tokens", type=int, default=100, help="audio frames (80 ms) per reply")
    ap.add_argument("--seed", type=int, default=1000, help="stream i of a level uses seed + i (same work on both paths)")
    ap.add_argument("--warmup", type=int, default=2, help="single requests per path before the levels")
    ap.add_argument("--no-level-warmup", dest="level_warmup", action="store_false",
                    help="skip the untimed run of each level before its timed run")
    ap.add_argument("--ramp-s", type=float, default=0.0, help="spread a level's request starts over this many seconds")
    ap.add_argument("--rounds", type=int, default=1,
                    help="requests each stream of a level sends one after another: keeps the server loaded "
                         "past the start-up burst ('all busy' throughput counts the time every stream was "
                         "streaming); at 1 stream, that many timed requests in turn")
    ap.add_argument("--server-match", default=None,
                    help="count CPU (and py-spy) only for server processes whose command line or an ancestor's "
                         "holds this text, e.g. the launcher's --workdir when two stacks run on one machine")
    ap.add_argument("--spy-levels", default="", help="levels (streams) whose timed run py-spy records in the "
                    "--spy-roles' processes (py-spy on PATH; files beside --out)")
    ap.add_argument("--spy-roles", default="chroma_lm",
                    help="comma-separated server roles py-spy records: chroma_lm, audio_encoder, codec_decoder, "
                         "frontend (each of its processes), tritonserver")
    ap.add_argument("--spy-s", type=float, default=5.0, help="seconds py-spy records from a level's start")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="client processes a level's streams are dealt over, each with its own event loop "
                         "(one loop fell 110-160 ms behind at 256 streams; see client_loop_lag_ms)")
    ap.add_argument("--inline-audio", action="store_true",
                    help="frontend: send the audio as base64 instead of the README's assets/ paths")
    ap.add_argument("--history-turns", type=parse_turns, default=(0, 0), metavar="N|LO-HI",
                    help="conversations with history: each request follows N earlier exchanges (the question clip, "
                         "a text reply; about 120 prompt tokens each), or LO + seed mod (HI - LO + 1) of them "
                         "(0: the README's request)")
    ap.add_argument("--conversations", action="store_true",
                    help="with --history-turns LO-HI: each stream is a conversation of its own, LO + stream mod "
                         "(HI - LO + 1) turns deep at the start and a turn deeper each round, resending at most HI "
                         "earlier turns (the latest), every user turn its own clip, sent inline on both paths; each "
                         "level run has new conversations")
    ap.add_argument("--request-timeout", type=float, default=900.0)
    ap.add_argument("--baseline-frames", type=int, default=30, help="frames of the naive loop (0: skip it)")
    ap.add_argument("--baseline-device", default="auto")
    ap.add_argument("--compare-with", default=None, help="an earlier --out JSON: print audio s/s ratios (e.g. dp 2 vs dp 1)")
    ap.add_argument("--keep-streams", action="store_true", help="put every stream's numbers in the JSON")
    ap.add_argument("--note", default="", help="free text kept in the JSON (e.g. the stack's settings)")
    ap.add_argument("--out", default="bench_serving.json")
    args = ap.parse_args(argv)
    args.via = [p.strip() for p in args.via.split(",") if p.strip()]
    if not args.via or any(p not in PATHS for p in args.via):
        ap.error(f"--via: choose from {', '.join(PATHS)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.spy_levels = {int(c) for c in args.spy_levels.split(",") if c.strip()}
    args.spy_roles = [r.strip() for r in args.spy_roles.split(",") if r.strip()]
    roles = ("tritonserver", "frontend", *MODELS)
    if unknown := [r for r in args.spy_roles if r not in roles]:
        ap.error(f"--spy-roles: unknown role(s) {', '.join(unknown)}; roles: {', '.join(roles)}")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    return args


def prepare_model(args) -> str | None:
    if args.model or not args.start:
        return args.model
    import torch

    preset = args.preset or ("full" if torch.cuda.is_available() else "tiny")
    target = Path(args.make_dir or f"/tmp/chroma-bench-{preset}")
    if (target / "config.json").is_file():
        print(f"using the random {preset} checkpoint already in {target}", flush=True)
        return str(target)
    from chroma_triton.checkpoint.factory import make_checkpoint

    t = time.perf_counter()
    path = str(make_checkpoint(target, preset, 0, with_visual=False))
    print(f"made a random {preset} checkpoint in {target} ({time.perf_counter() - t:.0f} s)", flush=True)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    model = prepare_model(args)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": model, "max_tokens": args.max_tokens,
              "concurrency": args.concurrency, "via": args.via, "seed": args.seed, "ramp_s": args.ramp_s,
              "rounds": args.rounds, "note": args.note, "history_turns": list(args.history_turns),
              "conversations": args.conversations,
              "dp_size": args.dp_size if args.start else None, "request": "README example: assets/question_audio.wav, "
              "reference voice assets/ref_audio.wav + transcript (cached by the server)"
              + (", after {}-{} earlier turns (by {})".format(*args.history_turns, "round" if args.conversations else "seed")
                 if any(args.history_turns) else "")}
    report["baseline_naive"] = run_baseline(args, model)
    stack = None
    if args.start:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-serving-"))
        stack = LaunchedStack(workdir, model=model, dp_size=args.dp_size, extra_args=args.launcher_arg)
        t = time.perf_counter()
        stack.start()
        report["stack_start_s"] = time.perf_counter() - t
        print(f"stack ready in {report['stack_start_s']:.0f} s (logs: {workdir})", flush=True)
        targets = {"frontend": stack.frontend_url, "grpc": stack.grpc_url, "metrics": args.metrics_url or stack.metrics_url}
    else:
        targets = {"frontend": args.frontend_url.rstrip("/"), "grpc": args.grpc_url, "metrics": args.metrics_url}
    report["targets"] = targets
    try:
        report["levels"] = asyncio.run(measure(args, targets, report["baseline_naive"]))
    finally:
        if stack is not None:
            stack.stop()
    Path(args.out).write_text(json.dumps(report, indent=2))
    previous = json.loads(Path(args.compare_with).read_text()) if args.compare_with else None
    print_table(report, previous)
    errors = sum(lv["errors"] for lv in report["levels"])
    print(f"raw numbers: {args.out}; {errors} failed stream(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
