"""codec_decoder's flight recorder (its ``trace_path`` parameter): one JSON line per execute.

The engine's trace (chroma_triton/engine/trace.py) shows when a chunk left ``chroma_lm``; a chunk
the client got late although the engine put it out in time lost that time after the engine,
often in ``codec_decoder``'s queue. This file shows each execute's wall-clock time, its chunks
(carried, adopted, restarted, stateless, skipped), frames and durations, so a burst of late chunks can be
laid next to what the codec was doing then. Line-buffered: a bench reading it right after a level
sees every execute.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class CodecTrace:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")

    def execute(self, started: float, decoded_s: float, chunks: int, frames: int, counts: dict[str, int],
                skipped: int) -> None:
        """``started``: time.time() when the execute began; ``counts``: chunks by how they decoded."""
        line = {"time": round(started, 4), "execute_ms": round((time.time() - started) * 1e3, 2),
                "decode_ms": round(decoded_s * 1e3, 2), "chunks": chunks, "frames": frames,
                "skipped": skipped, **counts}
        self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._file.close()

