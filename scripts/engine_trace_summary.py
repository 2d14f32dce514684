#!/usr/bin/env python3
"""Summarise an engine trace (chroma_lm's ``trace_path``, chroma_triton/engine/trace.py).

Prints the admissions (how many, their prefill time against the pacer's estimate, overruns and the
allowance they were admitted under, forced ones), the chunks put out late (how late, how far into
their stream, and which admission started each late stream, with how long before), the step
times seen, the audio each stream's listener had left when its start-up chunks went out, and for
the late chunks where the time went since their stream's first chunk (admissions' stalls against
their estimates, steps against the step time planned with), and the garbage collections that
stopped the process (with the prefills they fell into).

    python scripts/engine_trace_summary.py /root/res/trace_cuda0.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def load(path: Path) -> list[dict]:
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a trace still being written
            continue
    return events


def spread(values: list[float], unit: str = "ms", scale: float = 1000.0) -> str:
    if not values:
        return "–"
    v = sorted(x * scale for x in values)
    return (f"median {statistics.median(v):.0f} {unit}, p90 {v[int(0.9 * (len(v) - 1))]:.0f}, "
            f"max {v[-1]:.0f} (n={len(v)})")


def summarize(events: list[dict]) -> list[str]:
    admits = [e for e in events if e["ev"] == "admit"]
    late = [e for e in events if e["ev"] == "late"]
    steps = [e for e in events if e["ev"] == "step"]
    out = [f"{len(admits)} admissions of {sum(e['n'] for e in admits)} requests; {len(late)} late chunks; "
           f"{len(steps)} step samples"]
    timed = [e for e in admits if e.get("took_s") is not None]
    out.append("prefill time: " + spread([e["took_s"] for e in timed]))
    out.append("stall (with the wait for queued steps): " + spread([e["stall_s"] for e in admits]))
    judged = [e for e in timed if e.get("est_s") is not None]
    over = [e["took_s"] - e["est_s"] for e in judged if e["took_s"] > e["est_s"]]
    out.append(f"over the pacer's estimate: {len(over)} of {len(judged)}; by " + spread(over))
    paced = [e for e in judged if e.get("allowance_s") is not None]
    beyond = [e for e in paced if e["took_s"] > e["allowance_s"]]
    out.append(f"longer than the allowance they were admitted under: {len(beyond)} of {len(paced)} "
               f"(forced: {sum(1 for e in paced if e.get('forced'))})")
    if late:
        out.append("late chunks, how late: " + spread([e["late_s"] for e in late]))
        out.append("late chunks, seconds after their stream's first chunk: "
                   + spread([e["since_first_chunk_s"] for e in late], unit="s", scale=1.0))
        started = {r: e for e in admits for r in e.get("requests", [])}
        causes = []
        for e in late:
            admitted = started.get(e["request"])
            if admitted is not None:
                later = [a for a in admits if admitted["t"] < a["t"] <= e["t"]]
                causes.append((len(later), sum(a.get("took_s") or 0.0 for a in later)))
        if causes:
            out.append(f"admissions between a late stream's own and its late chunk: median "
                       f"{statistics.median(c[0] for c in causes):.0f}, their prefills median "
                       f"{1000 * statistics.median(c[1] for c in causes):.0f} ms")
    if steps:
        out.append("step time (pacer's average): " + spread([e["step_s"] for e in steps if e.get("step_s")]))
        out.append("step wall time (prefills out): " + spread([e["took_s"] - (e.get("prefill_s") or 0.0) for e in steps]))
    chunks = [e for e in events if e["ev"] == "chunk"]
    for index in sorted({e["index"] for e in chunks if e["index"] > 0}):
        left = [e["left_s"] for e in chunks if e["index"] == index]
        out.append(f"chunk {index}: audio left at the listener when it went out: " + spread(left)
                   + f"; {sum(1 for v in left if v < 0)} late, {sum(1 for v in left if 0 <= v < 0.05)} under 50 ms")
    out += late_windows(late, chunks, admits, steps)
    pauses = [e for e in events if e["ev"] == "gc"]
    if pauses:
        full = [e for e in pauses if e.get("gen") == 2]
        # an admission's prefill spans [t - took_s, t]: which of the long ones had a collection inside
        slow = [a for a in timed if a.get("est_s") and a["took_s"] > 2 * a["est_s"]]
        hit = [a for a in slow if any(a["t"] - a["took_s"] <= p["t"] <= a["t"] for p in pauses)]
        out.append(f"garbage collections of 5 ms or more: {len(pauses)} ({len(full)} full), "
                   + spread([e["s"] for e in pauses]) + f"; prefills over twice their estimate: {len(slow)}, "
                   f"{len(hit)} of them with a collection inside")
    passes = [e for e in events if e["ev"] == "relay_pass"]
    if passes:  # chroma_lm's relay threads (serving/relay_hub.py): passes slow to begin or to end
        out.append(f"relay passes of 50 ms or more: {len(passes)}; began after their first wake "
                   + spread([e["waited_s"] for e in passes]) + ", took " + spread([e["took_s"] for e in passes])
                   + ", longest send " + spread([e["longest_send_s"] for e in passes]))
    return out


def late_windows(late: list[dict], chunks: list[dict], admits: list[dict], steps: list[dict]) -> list[str]:
    """Where the time went between a late stream's first chunk and its late chunk: the admissions'
    stalls in that window against what the pacer expected of them, and the steps against the step
    time the pacer had planned with when the first chunk went out."""
    first = {e["request"]: e for e in chunks if e["index"] == 0}
    rows = []
    for e in late:
        start = first.get(e["request"])
        if start is None:
            continue
        inside = [s for s in steps if start["t"] < s["t"] <= e["t"]]
        taken = [a for a in admits if start["t"] < a["t"] <= e["t"]]
        # the step time chunks and admissions were planned with (plan_s; older traces: the average)
        planned = next((s.get("plan_s", s.get("step_s")) for s in reversed(steps) if s["t"] <= start["t"]), None)
        step_wall = sum(s["took_s"] - (s.get("prefill_s") or 0.0) for s in inside)
        rows.append({"window": e["t"] - start["t"], "steps": len(inside), "step_wall": step_wall,
                     "step_over": step_wall - len(inside) * planned if planned else None,
                     "stall": sum(a["stall_s"] for a in taken), "est": sum(a.get("est_s") or 0.0 for a in taken),
                     "admissions": len(taken)})
    if not rows:
        return []

    def med(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return 1000 * statistics.median(vals) if vals else float("nan")
    return [f"late chunks' windows (first chunk to the late one, n={len(rows)}): median {med('window'):.0f} ms; "
            f"admissions in them {statistics.median(r['admissions'] for r in rows):.0f}, stalling "
            f"{med('stall'):.0f} ms (estimated {med('est'):.0f} ms); steps {statistics.median(r['steps'] for r in rows):.0f}, "
            f"{med('step_wall'):.0f} ms, {med('step_over'):+.0f} ms against the step time planned with"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+", type=Path)
    args = ap.parse_args(argv)
    for path in args.traces:
        print(f"# {path}")
        for line in summarize(load(path)):
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
