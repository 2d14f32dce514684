"""Soak: rounds of many concurrent streaming chat requests, some of whose clients hang up
mid-stream; after each round every request must have completed (``finish_reason`` + ``[DONE]``)
or been cancelled, the engine must be idle again (``chroma_lm_active_requests`` and
``chroma_lm_queued_requests`` 0; finished + cancelled counters grew by the number of requests, no
failures), and ``/health`` must answer 200.  The resident memory (VmRSS) of tritonserver, each
model process and the frontend is recorded after every round: it must stay flat.

Cancellation of the clients that hang up: each one's request id (``X-Request-ID``) and the wall
time it closed its socket are matched with the line ``chroma_lm`` logs for every request it
cancels (``cancelled request id=… source=… seen=… freed=…`` in the Triton log): how many of the
hung-up requests the engine cancelled (by which path: ``control`` = the frontend's call to
``chroma_cancel``, ``watch`` = the fallback through ``stream_watch``, ``triton``), and the time
from the hang-up to the engine freeing the row (p50 / p95 / max).  ``--no-cancel-call`` runs the
frontend without the control call, to compare.

    python scripts/reliability/soak.py --streams 200 --rounds 3 --disconnect 0.3 --report out/soak.json

Starts its own stack (demo checkpoint, CPU) with ``chroma_lm`` ``max_batch`` = ``--max-batch``
(requests beyond it wait in the engine's queue), unless ``--url``/``--metrics-url`` name one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (COUNTER_METRICS, RunInfo, default_frontend_args, exit_on_sigterm, git_revision,  # noqa: E402
                    http_get, metrics, stack_rss, start_stack, wait_idle, write_report)


@dataclass
class Outcome:
    kind: str  # "completed" | "disconnected" | "error" | "hung"
    seconds: float
    chunks: int = 0
    detail: str = ""
    request_id: str = ""
    left_at: float | None = None  # wall clock (time.time()) when the client hung up


_CANCEL_LINE = re.compile(r"cancelled request id=(\S+) source=(\w+) posted=(\S+) seen=([0-9.]+) freed=([0-9.]+) "
                          r"frames=(\S+)(?: reason=(\S+))?")


def engine_cancels(log_path) -> dict[str, dict]:
    """request id -> {source, seen, freed, frames} from chroma_lm's log lines in the Triton log."""
    out = {}
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return out
    for m in _CANCEL_LINE.finditer(text):
        if m.group(7) not in (None, "cancelled", "-"):
            continue  # the reply had ended by itself just before the cancel arrived
        out[m.group(1)] = {"source": m.group(2), "seen": float(m.group(4)), "freed": float(m.group(5)),
                           "frames": m.group(6)}
    return out


_RUNNING_LINE = re.compile(r"request (\S+): cancel call answered: running=(True|False)")


def cancel_answers(log_path) -> dict[str, bool]:
    """request id -> whether it was running in the engine when the frontend's cancel call came
    (frontend log; absent without the control call)."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return {}
    return {m.group(1): m.group(2) == "True" for m in _RUNNING_LINE.finditer(text)}


def cancellation_summary(outcomes: list[Outcome], cancels: dict[str, dict], answers: dict[str, bool] | None = None) -> dict:
    """How many hung-up clients' requests the engine cancelled, by path, and how fast; with the
    frontend's log, also how many were still running in the engine when their client left (the
    others had finished generating already: the codec and the network were behind)."""
    leavers = [o for o in outcomes if o.kind == "disconnected"]
    matched = [(o, cancels[o.request_id]) for o in leavers if o.request_id in cancels and o.left_at is not None]
    answers = answers or {}
    running = [o for o in leavers if answers.get(o.request_id)]
    freed = sorted(max(0.0, c["freed"] - o.left_at) for o, c in matched)
    seen = sorted(max(0.0, c["seen"] - o.left_at) for o, c in matched)
    return {"hung_up": len(leavers), "cancelled_in_engine": len(matched),
            "cancel_calls_answered": sum(1 for o in leavers if o.request_id in answers) if answers else None,
            "running_at_cancel_call": len(running) if answers else None,
            "running_and_cancelled": sum(1 for o in running if o.request_id in cancels) if answers else None,
            "by_source": dict(Counter(c["source"] for _, c in matched)),
            "hangup_to_row_freed_s": {"p50": _pct(freed, 0.5), "p95": _pct(freed, 0.95), "max": _pct(freed, 1.0)},
            "hangup_to_cancel_seen_s": {"p50": _pct(seen, 0.5), "p95": _pct(seen, 0.95), "max": _pct(seen, 1.0)},
            "freed_s": [round(v, 3) for v in freed], "seen_s": [round(v, 3) for v in seen]}


def _brief(cancellation: dict) -> dict:
    return {k: v for k, v in cancellation.items() if k not in ("freed_s", "seen_s")}


async def one_stream(host: str, port: int, body: dict, leave_after: int | None, timeout: float) -> Outcome:
    """POST a streaming request over a raw HTTP/1.1 connection; read events until ``[DONE]``, or
    close the socket after ``leave_after`` audio events (a client that hangs up)."""
    t0 = time.monotonic()
    payload = json.dumps(body).encode()
    writer = None
    chunks = 0
    rid = ""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(None, 2)[1])
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"x-request-id:"):
                rid = line.split(b":", 1)[1].strip().decode()
        if status != 200:
            rest = await asyncio.wait_for(reader.read(4096), timeout)
            return Outcome("error", time.monotonic() - t0, 0, f"HTTP {status}: {rest[-300:]!r}", rid)
        buffer = b""
        deadline = t0 + timeout
        while True:
            data = await asyncio.wait_for(reader.read(65536), max(0.1, deadline - time.monotonic()))
            if not data:
                return Outcome("error", time.monotonic() - t0, chunks, "connection closed before [DONE]", rid)
            buffer += data
            # Count complete SSE events (each is one HTTP chunk; chunk-size lines do not contain "data: ").
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                line = event[event.find(b"data: "):]
                if line.startswith(b"data: [DONE]"):
                    return Outcome("completed", time.monotonic() - t0, chunks, "", rid)
                if b'"error"' in line[:20]:
                    return Outcome("error", time.monotonic() - t0, chunks, line[:300].decode(errors="replace"), rid)
                if b'"data":' in line:  # an audio chunk
                    chunks += 1
                    if leave_after is not None and chunks >= leave_after:
                        writer.close()  # hang up now (the finally below waits for the close)
                        return Outcome("disconnected", time.monotonic() - t0, chunks, "", rid, time.time())
    except asyncio.TimeoutError:
        return Outcome("hung", time.monotonic() - t0, chunks, f"no [DONE] within {timeout:g} s", rid)
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        return Outcome("error", time.monotonic() - t0, chunks, repr(exc), rid)
    finally:
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


async def run_round(frontend_url: str, streams: int, disconnect: float, max_tokens: tuple[int, int],
                    rng: random.Random, timeout: float, leaver_tokens: int = 1000) -> list[Outcome]:
    host, port = frontend_url.removeprefix("http://").rsplit(":", 1)
    leavers = set(rng.sample(range(streams), round(streams * disconnect)))
    tasks = []
    for i in range(streams):
        leave_after = rng.randint(1, 2) if i in leavers else None
        # A client that will hang up asks for a long reply, so that it leaves while its request
        # is still generating (the tiny model would otherwise often be done before it reads on).
        tokens = rng.randint(*max_tokens) if leave_after is None else leaver_tokens
        body = {"model": "chroma", "stream": True, "max_tokens": tokens, "seed": rng.randrange(2**31),
                "messages": [{"role": "user", "content": f"Soak request {i}: say something."}]}
        tasks.append(one_stream(host, int(port), body, leave_after, timeout))
    return await asyncio.gather(*tasks)


@dataclass
class RoundReport:
    round: int
    warmup: bool
    seconds: float
    outcomes: dict
    engine_after: dict
    counters_delta: dict
    health_after: int | None
    rss_kib: dict
    problems: list = field(default_factory=list)
    stream_seconds: dict = field(default_factory=dict)
    cancellation: dict = field(default_factory=dict)
    rss_kib_at_idle: dict | None = None


def soak(frontend_url: str, metrics_url: str, *, streams: int, rounds: int, disconnect: float,
         max_tokens: tuple[int, int], timeout: float, seed: int, rss_of=None, leaver_tokens: int = 1000,
         warmup: int = 0, log=lambda text: print(text, flush=True), triton_log=None,
         frontend_log=None, rss_settle_s: float = 0.0) -> list[RoundReport]:
    """``warmup`` + ``rounds`` rounds; the warm-up rounds are checked like the others, but memory
    is compared over the measured rounds only (allocators and caches fill up in the first ones).
    ``triton_log``: the Triton log file, to match hung-up clients with the engine's cancels.
    ``rss_settle_s``: seconds to wait on the idle stack before reading VmRSS (an allocator such as
    jemalloc returns freed pages after a delay); ``rss_kib_at_idle`` is read before that wait."""
    rng = random.Random(seed)
    reports = []
    for r in range(1, warmup + rounds + 1):
        before = metrics(metrics_url)
        t0 = time.monotonic()
        outcomes = asyncio.run(run_round(frontend_url, streams, disconnect, max_tokens, rng, timeout, leaver_tokens))
        seconds = time.monotonic() - t0
        after = wait_idle(metrics_url, timeout=60)
        time.sleep(0.5)  # let the metrics thread publish the last counters
        after = metrics(metrics_url)
        delta = {name: (after[name] or 0) - (before[name] or 0) for name in COUNTER_METRICS}
        rss_at_idle = rss_of() if rss_of and rss_settle_s else None
        if rss_settle_s:
            time.sleep(rss_settle_s)
        kinds = Counter(o.kind for o in outcomes)
        durations = sorted(o.seconds for o in outcomes if o.kind == "completed")
        report = RoundReport(
            round=r, warmup=r <= warmup, seconds=round(seconds, 1), outcomes=dict(kinds),
            engine_after={k: after[k] for k in ("chroma_lm_active_requests", "chroma_lm_queued_requests")},
            counters_delta=delta, health_after=http_get(f"{frontend_url}/health")[0],
            rss_kib=rss_of() if rss_of else {}, rss_kib_at_idle=rss_at_idle,
            stream_seconds={"p50": _pct(durations, 0.5), "p95": _pct(durations, 0.95), "max": _pct(durations, 1.0)},
            cancellation=cancellation_summary(outcomes, engine_cancels(triton_log),
                                              cancel_answers(frontend_log) if frontend_log else None) if triton_log else {})
        report.problems = check_round(report, streams, outcomes)
        log(f"{'warm-up ' if r <= warmup else ''}round {r}: {seconds:.1f} s, {dict(kinds)}, engine after {report.engine_after}, counters +{delta}, "
            f"health {report.health_after}, cancellation {_brief(report.cancellation)}, RSS {report.rss_kib}"
            + (f", PROBLEMS {report.problems}" if report.problems else ""))
        reports.append(report)
    return reports


def check_round(report: RoundReport, streams: int, outcomes: list[Outcome]) -> list[str]:
    problems = []
    bad = [o for o in outcomes if o.kind not in ("completed", "disconnected")]
    if bad:
        problems.append(f"{len(bad)} request(s) neither completed nor cancelled, e.g. {bad[0]}")
    if any(report.engine_after.values()):
        problems.append(f"engine not idle after the round: {report.engine_after}")
    done = report.counters_delta["chroma_lm_finished_total"] + report.counters_delta["chroma_lm_cancelled_total"]
    if done != streams:
        problems.append(f"engine finished + cancelled {done:g} requests, expected {streams}")
    if report.counters_delta["chroma_lm_failed_total"]:
        problems.append(f"{report.counters_delta['chroma_lm_failed_total']:g} request(s) failed in the engine")
    if report.health_after != 200:
        problems.append(f"/health answered {report.health_after}")
    return problems


def rss_growth(reports: list[RoundReport]) -> dict[str, float]:
    """Per process: growth of VmRSS from the first measured (not warm-up) round to the last, in percent."""
    measured = [r for r in reports if not r.warmup]
    if len(measured) < 2:
        return {}
    first, last = measured[0].rss_kib, measured[-1].rss_kib
    return {name: round(100.0 * (last[name] - first[name]) / first[name], 2) for name in first if name in last}


def rss_per_request(reports: list[RoundReport], streams: int) -> dict[str, float]:
    """Per process: KiB of VmRSS growth per request over the measured rounds (after the first)."""
    measured = [r for r in reports if not r.warmup]
    if len(measured) < 2:
        return {}
    first, last = measured[0].rss_kib, measured[-1].rss_kib
    n = streams * (len(measured) - 1)
    return {name: round((last[name] - first[name]) / n, 2) for name in first if name in last}


def merge_cancellation(reports: list[RoundReport]) -> dict:
    """Totals over rounds (latency percentiles of the rounds are not merged: see each round)."""
    out = {"hung_up": 0, "cancelled_in_engine": 0, "cancel_calls_answered": 0, "running_at_cancel_call": 0,
           "running_and_cancelled": 0,
           "by_source": Counter()}
    freed, seen = [], []
    for r in reports:
        c = r.cancellation or {}
        for key in ("hung_up", "cancelled_in_engine", "cancel_calls_answered", "running_at_cancel_call",
                    "running_and_cancelled"):
            out[key] += c.get(key) or 0
        out["by_source"].update(c.get("by_source", {}))
        freed += c.get("freed_s", [])
        seen += c.get("seen_s", [])
    out["by_source"] = dict(out["by_source"])
    freed.sort()
    seen.sort()
    out["hangup_to_row_freed_s"] = {"p50": _pct(freed, 0.5), "p95": _pct(freed, 0.95), "max": _pct(freed, 1.0)}
    out["hangup_to_cancel_seen_s"] = {"p50": _pct(seen, 0.5), "p95": _pct(seen, 0.95), "max": _pct(seen, 1.0)}
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3, help="measured rounds")
    p.add_argument("--warmup-rounds", type=int, default=1, help="rounds before the measured ones (memory not compared)")
    p.add_argument("--disconnect", type=float, default=0.3, help="share of clients that hang up mid-stream")
    p.add_argument("--min-tokens", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--leaver-tokens", type=int, default=200,
                   help="max_tokens of the clients that hang up (long, so that they leave mid-generation)")
    p.add_argument("--max-batch", type=int, default=200, help="chroma_lm max_batch of the stack started here")
    p.add_argument("--lm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="another chroma_lm config parameter of the stack started here (repeatable)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one stream may take before it counts as hung")
    p.add_argument("--max-rss-growth", type=float, default=10.0,
                   help="percent a process's VmRSS may grow from the first measured round to the last")
    p.add_argument("--triton-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment variable of tritonserver (repeatable), e.g. LD_PRELOAD=... or MALLOC_ARENA_MAX=2")
    p.add_argument("--no-cancel-call", action="store_true",
                   help="run the frontend without its control call to chroma_cancel (the old path only), to compare")
    p.add_argument("--frontend-workers", type=int, default=1,
                   help="the frontend's --workers (the launcher starts 2 per GPU); their VmRSS is read one by one")
    p.add_argument("--rss-settle", type=float, default=0.0,
                   help="seconds the idle stack is left alone before VmRSS is read after each round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--report", default=None)
    args = p.parse_args(argv)
    exit_on_sigterm()
    info = RunInfo.now()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chroma-soak-"))
    triton_env = dict(item.split("=", 1) for item in args.triton_env)
    lm_params = {"max_batch": str(args.max_batch), **dict(item.split("=", 1) for item in args.lm_param)}
    stack = start_stack(workdir, lm_params=lm_params,
                        frontend_args=default_frontend_args(*(["--triton-cancel-model", ""] if args.no_cancel_call else []),
                                                            "--workers", str(args.frontend_workers),
                                                            request_timeout=args.timeout), triton_env=triton_env)
    print(f"stack up: frontend {stack.frontend.url}, metrics {stack.triton.metrics_url}; logs in {workdir}; "
          f"tritonserver allocator: {stack.triton.malloc_library or 'glibc'}", flush=True)
    try:
        warm = stack_rss(stack)
        reports = soak(stack.frontend.url, stack.triton.metrics_url, streams=args.streams, rounds=args.rounds,
                       disconnect=args.disconnect, max_tokens=(args.min_tokens, args.max_tokens), timeout=args.timeout,
                       seed=args.seed, rss_of=lambda: stack_rss(stack), leaver_tokens=args.leaver_tokens,
                       warmup=args.warmup_rounds, triton_log=stack.triton.log_path,
                       frontend_log=stack.frontend.log_path, rss_settle_s=args.rss_settle)
        growth = rss_growth(reports)
        problems = [f"round {r.round}: {p}" for r in reports for p in r.problems]
        problems += [f"{name} VmRSS grew {g}% over the measured rounds" for name, g in growth.items()
                     if g > args.max_rss_growth]
        report = {"run": vars(info), "revision": git_revision(),
                  "triton_malloc": str(stack.triton.malloc_library or "glibc"),
                  "settings": {k: getattr(args, k) for k in ("streams", "rounds", "warmup_rounds", "disconnect",
                                                             "min_tokens", "max_tokens", "leaver_tokens", "max_batch",
                                                             "timeout", "seed", "max_rss_growth", "triton_env",
                                                             "no_cancel_call", "rss_settle")},
                  "rss_kib_before": warm, "rounds": [vars(r) for r in reports],
                  "rss_growth_percent_measured_rounds": growth,
                  "rss_growth_kib_per_request": rss_per_request(reports, args.streams),
                  "cancellation_measured_rounds": merge_cancellation([r for r in reports if not r.warmup]),
                  "problems": problems}
        write_report(args.report, report)
        c = report["cancellation_measured_rounds"]
        print(f"hung-up requests cancelled in the engine: {c['cancelled_in_engine']} of {c['hung_up']} {c['by_source']} "
              f"(running when the cancel call came: {c['running_and_cancelled']} cancelled of {c['running_at_cancel_call']}); "
              f"hang-up -> row freed p50 {c['hangup_to_row_freed_s']['p50']} s, max {c['hangup_to_row_freed_s']['max']} s; "
              f"tritonserver VmRSS growth {report['rss_growth_percent_measured_rounds'].get('tritonserver')} %", flush=True)
    finally:
        stack.stop()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
