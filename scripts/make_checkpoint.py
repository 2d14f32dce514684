#!/usr/bin/env python3
"""Write a random-weight Chroma checkpoint in the real layout.

    python scripts/make_checkpoint.py --preset tiny --seed 0 --out /tmp/chroma-tiny
    python scripts/make_checkpoint.py --preset full --out /data/chroma-full   # real sizes, ~9.5 GB

Presets: tiny (seconds on a CPU; tests use it) and full (FlashLabs/Chroma-4B dimensions, for GPU
benchmarks). Same seed, same bytes.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chroma_triton.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["make-checkpoint", *sys.argv[1:]]))
