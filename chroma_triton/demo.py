"""The tiny demo checkpoint: generated locally on first use, cached, and loudly labelled as noise."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_WARNING = (
    "No --model/--chroma-model-path given: using a locally generated TINY RANDOM demo checkpoint. "
    "Its text is gibberish and its audio is NOISE. Pass a real Chroma checkpoint for speech."
)
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def cache_dir() -> Path:
    return Path(os.environ.get("CHROMA_CACHE_DIR", Path.home() / ".cache" / "chroma_triton"))


def demo_checkpoint(seed: int = 0) -> Path:
    """Path of the tiny demo checkpoint, creating it if needed (a few seconds)."""
    from .checkpoint.factory import make_checkpoint

    folder = cache_dir() / f"demo-tiny-seed{seed}"
    if not (folder / "config.json").exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        make_checkpoint(tmp, "tiny", seed)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
