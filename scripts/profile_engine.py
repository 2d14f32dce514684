#!/usr/bin/env python3
"""Where the engine's time goes at a given batch: a batched step's kernels, GPU time and host work,
and a batched prefill's, under torch.profiler, with the options `chroma_lm` serves with.

    python scripts/profile_engine.py --model /root/chroma-full --rows 256 --prefills 1,16 --out profile.json

Two phases, each on the same engine (the served defaults: `chroma_lm`'s config parameters as the
launcher renders them for this kind of device, with `--rows` rows and `--set name=value` changes):

* **steady**: `--rows` requests run together (admitted first, then `--steady-s` seconds profiled,
  then cancelled). Per step: wall time, GPU kernel time, the GPU's busy share of the window (the
  union of its kernels), kernels and launches, the host's CPU ops (self time) and its time blocked
  on the device.
* **prefill**: one request runs while `--prefill-rounds` groups of N requests (each N of
  `--prefills`) are submitted together and admitted in one batched prefill (pacing off). Per
  prefill: the same numbers, grouped by how many requests it held.

The engine marks its steps and prefills as profiler ranges (`engine.PROFILE_RANGES`); kernels are
tied to a range through the launches made inside it (CUPTI correlation ids), so a CUDA graph's
kernels count for the range that replayed it. With `--spy-s S` (py-spy on PATH or `$PY_SPY`) the
steady window is also sampled by py-spy (every thread, Python frames) for `pyspy_summary.py`.
Prints a summary; the JSON holds every table. On a CPU the same runs (CPU ops only).
"""
from __future__ import annotations

import argparse
import bisect
import collections
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_engine import make_request  # noqa: E402
from chroma_triton.engine import ChromaEngine, EngineOptions, SamplingParams  # noqa: E402
from chroma_triton.model.loading import load_parts  # noqa: E402
from chroma_triton.pipeline import ChromaPipeline  # noqa: E402
from chroma_triton.serving.model_args import ModelArgs  # noqa: E402
from chroma_triton.serving.repository import RenderSpec, parse_config, render_configs  # noqa: E402
from chroma_triton.serving.triton_lm import engine_options  # noqa: E402

KERNEL_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")


def served_options(device: str, rows: int, thinker_len: int, backbone_len: int, changes: dict[str, str]) -> EngineOptions:
    """EngineOptions as `chroma_lm` builds them on `device` from its config parameters, rendered
    as the launcher renders the repository for that kind of device, with these changes (a name
    the config lacks is refused)."""
    changes = {"max_batch": str(rows), "thinker_max_len": str(thinker_len), "backbone_max_len": str(backbone_len),
               **changes}
    spec = RenderSpec(kind="gpu" if device.startswith("cuda") else "cpu", params={"chroma_lm": changes})
    config = parse_config(render_configs(spec)["chroma_lm"])
    params = {key: value.string_value for key, value in config.parameters.items()}
    return engine_options(ModelArgs("chroma_lm", {}, params, device, "chroma_lm"))


# -- reading a chrome trace ------------------------------------------------------------------------
def self_times(ops: list[dict]) -> dict[int, float]:
    """Self time (µs) of each op of one thread: its duration less its children's (nested ops)."""
    out, stack = {}, []
    for i, op in sorted(enumerate(ops), key=lambda p: (p[1]["ts"], -p[1]["dur"])):
        while stack and ops[stack[-1]]["ts"] + ops[stack[-1]]["dur"] <= op["ts"]:
            stack.pop()
        out[i] = op["dur"]
        if stack:
            out[stack[-1]] -= op["dur"]
        stack.append(i)
    return out


def union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarize_ranges(trace: dict, prefix: str, top: int = 15) -> dict[str, dict]:
    """Per range name starting with `prefix` (its kind: "chroma.step", "chroma.prefill[16]", ...):
    count, wall, the engine thread's CPU ops inside (self time), launches and synchronisations,
    and the kernels those launches ran."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    ranges = [e for e in events if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(prefix)]
    if not ranges:
        return {}
    by_tid = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver"):
            by_tid[e["tid"]].append(e)
    starts = {}
    for tid, evs in by_tid.items():
        evs.sort(key=lambda e: e["ts"])
        starts[tid] = [e["ts"] for e in evs]
    kernels = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in KERNEL_CATS:
            kernels[(e.get("args") or {}).get("correlation")].append(e)
    out = {}
    for name in sorted({r["name"] for r in ranges}):
        mine = [r for r in ranges if r["name"] == name]
        ops, calls, ran, cpu_self = [], collections.Counter(), [], collections.Counter()
        sync_us = 0.0
        for r in mine:
            lo, hi = r["ts"], r["ts"] + r["dur"]
            evs, ts = by_tid.get(r["tid"], []), starts.get(r["tid"], [])
            inside = evs[bisect.bisect_left(ts, lo):bisect.bisect_left(ts, hi)]
            cpu = [e for e in inside if e["cat"] == "cpu_op"]
            for i, us in self_times(cpu).items():
                cpu_self[cpu[i]["name"]] += us
            ops += cpu
            for e in inside:
                if e["cat"] != "cpu_op":
                    calls[e["name"]] += 1
                    if e["name"] in SYNC_CALLS:
                        sync_us += e["dur"]
                    ran += kernels.get((e.get("args") or {}).get("correlation"), [])
        n = len(mine)
        gpu = collections.Counter()
        count = collections.Counter()
        for k in ran:
            gpu[k["name"]] += k["dur"]
            count[k["name"]] += 1
        walls = [r["dur"] / 1000 for r in mine]
        out[name] = {
            "count": n, "wall_ms_mean": statistics.fmean(walls), "wall_ms_median": statistics.median(walls),
            "cpu_ops": len(ops) / n, "host_sync_ms": sync_us / 1000 / n,
            "launches": {k: v / n for k, v in calls.most_common(8)},
            "kernels": len(ran) / n, "gpu_ms": sum(gpu.values()) / 1000 / n,
            "gpu_busy_ms": union_us([(k["ts"], k["ts"] + k["dur"]) for k in ran]) / 1000 / n,
            "top_cpu_ops_ms": [{"op": k[:100], "ms": v / 1000 / n} for k, v in cpu_self.most_common(top)],
            "top_kernels": [{"kernel": k[:120], "per_range": count[k] / n, "ms": v / 1000 / n}
                            for k, v in gpu.most_common(top)],
        }
    return out


def window_busy(trace: dict, top: int = 25) -> dict:
    """The whole window: its span and the GPU's busy share (union of every kernel)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    steps = [e for e in events if e.get("cat") == "user_annotation" and e.get("name") == "chroma.step"]
    if not steps:
        return {}
    lo, hi = min(s["ts"] for s in steps), max(s["ts"] + s["dur"] for s in steps)
    inside = [e for e in events if e.get("cat") in KERNEL_CATS and e["ts"] + e["dur"] > lo and e["ts"] < hi]
    busy = union_us([(max(e["ts"], lo), min(e["ts"] + e["dur"], hi)) for e in inside])
    # every kernel of the window, whoever launched it (a check on the launch-tied tables)
    gpu, count = collections.Counter(), collections.Counter()
    for e in inside:
        gpu[e["name"]] += e["dur"]
        count[e["name"]] += 1
    n = len(steps)
    return {"span_ms": (hi - lo) / 1000, "steps": n, "gpu_busy_share": busy / (hi - lo) if hi > lo else 0.0,
            "ms_per_step": (hi - lo) / 1000 / n, "kernels_per_step": len(inside) / n,
            "gpu_ms_per_step": sum(gpu.values()) / 1000 / n,
            "top_kernels": [{"kernel": k[:120], "per_step": count[k] / n, "ms_per_step": v / 1000 / n}
                            for k, v in gpu.most_common(top)]}


# -- driving the engine ------------------------------------------------------------------------------
class Drainer:
    """Empties every stream every 10 ms on one thread, as the served relay does, and notes which
    have ended."""

    def __init__(self):
        self.streams, self.ended, self._stop = [], set(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.01):
            for s in list(self.streams):
                items = s.drain()
                if items and items[-1] is None:
                    self.ended.add(id(s))

    def stop(self):
        self._stop.set()
        self._thread.join()


def request_of(template, frames: int, seed: int, own_rows: int = 0):
    """`template` with its own sampling seed; `own_rows`: its last so many audio embedding rows (its
    last clip) perturbed by the seed, so that its prompt is its own from there on."""
    req = copy.deepcopy(template)
    req.sampling = SamplingParams(seed=seed, max_tokens=frames)
    if own_rows:
        noise = torch.randn(own_rows, req.audio_embeds.shape[-1], generator=torch.Generator().manual_seed(seed))
        req.audio_embeds[-own_rows:] += 1e-3 * noise.to(req.audio_embeds)  # its device (a GPU's) and dtype
    return req


def submit(engine, template, frames: int, seed: int, own_rows: int = 0):
    return engine.submit(request_of(template, frames, seed, own_rows))


def wait_until(cond, timeout: float, what: str):
    t = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > t:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


class EngineThreadProfiler:
    """torch.profiler run on the engine's thread (a profiler records the CPU ops of the thread that
    starts it): started and stopped there between two steps (`ChromaEngine.between_steps`)."""

    def __init__(self, engine, activities, wake):
        """`wake()`: submit something, so that an idle engine's thread comes round to a step."""
        self.engine, self.activities, self.wake = engine, activities, wake
        self._want, self._prof = None, None
        self._done = threading.Event()
        engine.between_steps = self._between_steps
        engine.profile_ranges = True

    def _between_steps(self):
        from torch.profiler import profile

        if self._want == "start":
            self._prof = profile(activities=self.activities)
            self._prof.__enter__()
        elif self._want == "stop":
            self._prof.__exit__(None, None, None)
        else:
            return
        self._want = None
        self._done.set()

    def _ask(self, what: str):
        self._done.clear()
        self._want = what
        for _ in range(60):  # an idle engine (every request ended) waits for work: give it some
            if self._done.wait(1.0):
                return
            self.wake()
        raise SystemExit(f"the engine's thread did not {what} the profiler")

    def run(self, fn, trace_file: Path) -> dict:
        """Profile the engine's thread while `fn()` runs here; returns the chrome trace."""
        self._ask("start")
        try:
            fn()
        finally:
            self._ask("stop")
        self._prof.export_chrome_trace(str(trace_file))
        return json.loads(trace_file.read_text())

    def close(self):
        self.engine.between_steps, self.engine.profile_ranges = None, False


def spy(seconds: float, out: Path) -> subprocess.Popen | None:
    exe = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if not exe or seconds <= 0:
        return None
    return subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--duration", str(int(max(seconds, 1))),
                             "--rate", "200", "--threads", "--format", "raw", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


ENGINE_COUNTERS = ("steps", "frames", "gpu_step_s", "gpu_idle_s", "host_wait_s", "host_step_s", "host_cpu_s")


def engine_numbers(engine, seconds: float) -> dict:
    """The engine's own counters (CUDA events, thread times) over `seconds` without the profiler."""
    before = dict(engine.counters)
    time.sleep(seconds)
    d = {k: engine.counters[k] - before[k] for k in ENGINE_COUNTERS}
    steps = max(d["steps"], 1)
    return {"seconds": seconds, "steps": d["steps"], "frames": d["frames"], "ms_per_step": seconds * 1000 / steps,
            "gpu_ms_per_step": d["gpu_step_s"] * 1000 / steps, "gpu_idle_ms_per_step": d["gpu_idle_s"] * 1000 / steps,
            "host_wait_ms_per_step": d["host_wait_s"] * 1000 / steps, "host_ms_per_step": d["host_step_s"] * 1000 / steps,
            "host_cpu_ms_per_step": d["host_cpu_s"] * 1000 / steps}


def steady_phase(engine, template, args, profiler, work: Path) -> dict:
    """Every row running: first the engine's counters (and py-spy, if asked) without the profiler,
    whose per-op recording slows the host; then the profiled window."""
    drainer = Drainer()
    try:
        for i in range(args.rows):
            drainer.streams.append(submit(engine, template, args.steady_frames, 1000 + i))
        wait_until(lambda: engine.stats()["active"] == args.rows, args.admit_timeout_s, f"{args.rows} rows admitted")
        time.sleep(args.settle_s)
        spy_file = Path(args.out).with_suffix(".pyspy.txt")
        spy_proc = spy(args.spy_s, spy_file)
        plain = engine_numbers(engine, max(args.steady_s, args.spy_s))
        spy_err = None
        if spy_proc is not None:
            _, err = spy_proc.communicate(timeout=args.spy_s + 30)
            spy_err = err.decode(errors="replace")[-300:] if spy_proc.returncode else None
        t0 = time.perf_counter()
        trace = profiler.run(lambda: time.sleep(args.steady_s), work / "steady.json")
        wall = time.perf_counter() - t0
        still = engine.stats()["active"]
    finally:
        for s in drainer.streams:
            s.cancel()
        wait_until(lambda: engine.stats()["active"] == 0, 120, "the cancelled rows to leave")
        drainer.stop()
    return {"rows": args.rows, "rows_at_end": still, "profiled_s": wall, "engine": plain,
            "window": window_busy(trace), "ranges": summarize_ranges(trace, "chroma.step"),
            "pyspy": None if spy_proc is None else {"file": str(spy_file), "rate": 200, "seconds": args.spy_s,
                                                    "error": spy_err}}


def prefill_phase(engine, template, group_template, args, profiler, work: Path, previous=None) -> dict:
    """``template``: the request running beside the prefills; ``group_template``: the one the groups
    send; ``previous`` (--prefill-new-turns): the turn before it, admitted first (so stored, with the
    thinker prefix cache), and each group request's last clip is then its own."""
    sizes = [int(n) for n in args.prefills.split(",") if n.strip()]
    engine.opts.admission_pacing = False  # a group submitted together is admitted together
    drainer = Drainer()
    own_rows = 0
    if previous is not None:
        own_rows = group_template.audio_embeds.shape[0] - previous.audio_embeds.shape[0]
        first = submit(engine, previous, 2, 3)
        drainer.streams.append(first)
        wait_until(lambda: id(first) in drainer.ended, args.admit_timeout_s, "the previous turn's end")
    anchor = submit(engine, template, args.steady_frames, 7)
    drainer.streams.append(anchor)
    wait_until(lambda: engine.stats()["active"] == 1, args.admit_timeout_s, "the running request")

    def rounds():
        seed = 10_000
        for n in sizes:
            for _ in range(args.prefill_rounds):
                # built first, then submitted one after another: a group's copies and noise do not
                # spread its arrivals over the running request's steps (the block hashing in
                # submit still does, as on a server's request threads)
                built = []
                for _ in range(n):
                    seed += 1
                    built.append(request_of(group_template, 4, seed, own_rows))
                group = [engine.submit(req) for req in built]
                drainer.streams += group
                wait_until(lambda: all(id(s) in drainer.ended for s in group), args.admit_timeout_s, "a group's end")
    try:
        before = dict(engine.counters)
        trace = profiler.run(rounds, work / "prefill.json")
        counted = {name: engine.counters[name] - before[name] for name in PREFILL_COUNTERS}
    finally:
        anchor.cancel()
        wait_until(lambda: engine.stats()["active"] == 0, 120, "the running request to leave")
        drainer.stop()
    return {"prefills": counted["prefills"], "prompts": counted, "ranges": summarize_ranges(trace, "chroma.prefill")}


PREFILL_COUNTERS = ("prefills", "prefill_graph_prompts", "prefill_eager_prompts", "prefill_prefix_prompts",
                    "prefill_prefix_graph_prompts", "prefill_prefix_tokens")


def print_summary(report: dict) -> None:
    def show(title, ranges):
        for name, r in ranges.items():
            print(f"\n{title} {name}: {r['count']} ranges, wall {r['wall_ms_median']:.2f} ms median, "
                  f"GPU {r['gpu_ms']:.2f} ms in {r['kernels']:.0f} kernels (busy {r['gpu_busy_ms']:.2f} ms), "
                  f"{r['cpu_ops']:.0f} CPU ops, host blocked {r['host_sync_ms']:.2f} ms; launches {r['launches']}")
            for op in r["top_cpu_ops_ms"][:8]:
                print(f"   cpu {op['ms']:7.3f} ms  {op['op']}")
            for k in r["top_kernels"][:10]:
                print(f"   gpu {k['ms']:7.3f} ms  x{k['per_range']:<5.1f} {k['kernel']}")
    if "steady" in report:
        s = report["steady"]
        print(f"steady, {s['rows']} rows: engine {json.dumps({k: round(v, 3) for k, v in s['engine'].items()})}")
        print("window", json.dumps({k: round(v, 3) for k, v in s["window"].items() if not isinstance(v, list)}))
        for k in s["window"].get("top_kernels", [])[:15]:
            print(f"   window gpu {k['ms_per_step']:7.3f} ms/step x{k['per_step']:<6.1f} {k['kernel']}")
        show("steady", s["ranges"])
    if "prefill" in report:
        print("prefill phase's prompts:", json.dumps(report["prefill"]["prompts"]))
        show("prefill", report["prefill"]["ranges"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Chroma checkpoint folder (scripts/make_checkpoint.py)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=256, help="requests running together in the steady phase (0: skip it)")
    ap.add_argument("--steady-s", type=float, default=1.0, help="seconds the steady phase is measured by the engine's "
                    "counters, then as long profiled")
    ap.add_argument("--steady-frames", type=int, default=600, help="max_tokens of the steady phase's requests: "
                    "enough to outlast their admission and both windows (rows_at_end in the JSON says whether they did)")
    ap.add_argument("--settle-s", type=float, default=1.0, help="wait after the last admission before profiling")
    ap.add_argument("--prefills", default="1,16", help="group sizes of the prefill phase (empty: skip it)")
    ap.add_argument("--prefill-rounds", type=int, default=5)
    ap.add_argument("--prefill-turns", type=int, default=0, help="the prefill phase's requests follow this many earlier "
                    "exchanges (a conversation's history: about 120 prompt tokens each; chroma_triton/bench/conversation.py)")
    ap.add_argument("--prefill-new-turns", action="store_true", help="with --prefill-turns N: the turn before "
                    "(N - 1 earlier exchanges) is admitted first, and each request's last clip is its own (its "
                    "embeddings perturbed by its seed): with the thinker prefix cache (--set thinker_prefix_cache_mib=...) "
                    "each then prefills its conversation's last exchange and new turn, as a voice agent's next turn does")
    ap.add_argument("--thinker-max-len", type=int, default=1024, help="as scripts/gpu_bench.sh's stacks")
    ap.add_argument("--backbone-max-len", type=int, default=1536)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a chroma_lm config parameter for this engine (e.g. prefill_graphs=false); repeatable")
    ap.add_argument("--admit-timeout-s", type=float, default=300)
    ap.add_argument("--spy-s", type=float, default=0, help="py-spy records the steady phase's unprofiled window this "
                    "long (py-spy on PATH or $PY_SPY; scripts/pyspy_summary.py reads the file)")
    ap.add_argument("--keep-traces", help="folder to keep the chrome traces in")
    ap.add_argument("--out", default="profile_engine.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    changes = dict(item.split("=", 1) for item in args.set)
    opts = served_options(f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu",
                          max(args.rows, 1 + max([int(n) for n in args.prefills.split(",") if n.strip()] or [0])),
                          args.thinker_max_len, args.backbone_max_len, changes)
    parts = load_parts(args.model, device=device)
    pipe = ChromaPipeline(parts, EngineOptions(max_batch=1, thinker_max_len=args.thinker_max_len,
                                               backbone_max_len=args.backbone_max_len))
    template = make_request(pipe, 0, args.steady_frames)
    group_template = make_request(pipe, 0, args.steady_frames, turns=args.prefill_turns)
    previous = None
    if args.prefill_new_turns:
        if args.prefill_turns < 1:
            raise SystemExit("--prefill-new-turns needs --prefill-turns of 1 or more")
        previous = make_request(pipe, 0, args.steady_frames, turns=args.prefill_turns - 1)
    pipe.close()
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "prompt_tokens": len(template.thinker_ids),
              "prefill_prompt_tokens": len(group_template.thinker_ids),
              "options": {k: v for k, v in vars(opts).items() if not isinstance(v, dict)}, "changes": changes}
    t = time.perf_counter()
    engine = ChromaEngine(parts, opts).start()
    report["engine_start_s"] = time.perf_counter() - t
    print(f"engine ready in {report['engine_start_s']:.0f} s ({json.dumps(changes)})", flush=True)
    profiler = EngineThreadProfiler(engine, activities, wake=lambda: submit(engine, template, 2, 1))
    work = Path(args.keep_traces) if args.keep_traces else Path(tempfile.mkdtemp(prefix="profile_engine_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.rows > 0:
            report["steady"] = steady_phase(engine, template, args, profiler, work)
        if args.prefills.strip():
            report["prefill"] = prefill_phase(engine, template, group_template, args, profiler, work, previous)
    finally:
        profiler.close()
        engine.shutdown()
        if not args.keep_traces:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_summary(report)


if __name__ == "__main__":
    main()
