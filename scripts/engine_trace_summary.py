#!/usr/bin/env python3
"""Summarise an engine trace (chroma_lm's ``trace_path``, chroma_triton/engine/trace.py).

Prints the admissions (how many, their prefill time against the pacer's estimate, overruns and the
allowance they were admitted under, forced ones), the chunks put out late (how late, how far into
their stream, and which admission started each late stream, with how long before), and the step
times seen.

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
    return out


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
