#!/usr/bin/env python3
"""Summarise ``py-spy record -f raw --threads`` files (bench_serving.py ``--spy-levels``).

Each line of such a file is ``thread (TID): NAME;frame;frame;... COUNT``. Per file this prints,
per thread group (the thread name without its number), the share of a core its samples stand for
(samples / (rate * seconds)); then, for the busiest group, the functions where its samples ended
(self) and the functions on its stacks (inclusive). On a ``--gil`` recording only the thread
holding the GIL is sampled, so a group's share is its share of the GIL.

    python scripts/pyspy_summary.py --rate 200 --seconds 5 pyspy_grpc256_chroma_lm_*_threads.txt
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^thread \((\d+)\): (.*?)(?:;(.*))? (\d+)$")


def parse(path: Path) -> list[tuple[str, list[str], int]]:
    """(thread group, frames outermost first, samples) per line."""
    out = []
    for line in path.read_text().splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        _tid, name, stack, count = m.groups()
        group = re.sub(r"[\s-]*\d+$", "", name).strip() or name
        frames = stack.split(";") if stack else []
        out.append((group, frames, int(count)))
    return out


def short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py:123)``."""
    return re.sub(r"\(([^()]*/)?([^/()]+)\)$", r"(\2)", frame)


def summarize(path: Path, rate: float, seconds: float, top: int) -> str:
    rows = parse(path)
    ticks = rate * seconds
    groups: Counter = Counter()
    for group, _frames, n in rows:
        groups[group] += n
    lines = [f"## {path.name}: {sum(groups.values())} samples over {seconds:g} s at {rate:g} Hz"]
    for group, n in groups.most_common():
        lines.append(f"  {group:<28} {n:>6} samples = {n / ticks:.2f} of a core")
    for group, _ in groups.most_common(2):
        self_: Counter = Counter()
        incl: Counter = Counter()
        total = 0
        for g, frames, n in rows:
            if g != group or not frames:
                continue
            total += n
            self_[short(frames[-1])] += n
            for f in {short(f) for f in frames}:
                incl[f] += n
        if not total:
            continue
        lines.append(f"  {group}: where its samples ended (self)")
        lines += [f"    {n / total:6.1%}  {f}" for f, n in self_.most_common(top)]
        lines.append(f"  {group}: on its stacks (inclusive; frames on every stack left out)")
        lines += [f"    {n / total:6.1%}  {f}" for f, n in incl.most_common() if n < total][:top]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--rate", type=float, default=200.0, help="py-spy's -r (samples per second)")
    ap.add_argument("--seconds", type=float, default=5.0, help="py-spy's -d (bench_serving --spy-s)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    for f in args.files:
        print(summarize(f, args.rate, args.seconds, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
