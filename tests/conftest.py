"""Shared fixtures: one tiny random checkpoint (real layout) per test session, and the assets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The demo checkpoint cache lives in the session's tmp dir, not in the user's home."""
    os.environ["CHROMA_CACHE_DIR"] = str(tmp_path_factory.mktemp("chroma-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from chroma_triton.checkpoint.factory import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def question_wav() -> bytes:
    return (ASSETS / "question_audio.wav").read_bytes()


@pytest.fixture(scope="session")
def ref_voice() -> tuple[bytes, str]:
    return (ASSETS / "ref_audio.wav").read_bytes(), (ASSETS / "ref_audio.txt").read_text().strip()
