"""Shared fixtures: one tiny random checkpoint (real layout) per test session, the assets, the
tritonserver binary (tests that need it skip without it) and the real serving stack."""

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


@pytest.fixture(scope="session")
def triton_install():
    """The tritonserver binary (scripts/setup.sh installs the nvidia-pytriton wheel's); a test that
    asks for it is skipped, with the reason, where there is none."""
    from chroma_triton.serving.tritonserver import TritonServerError, find_tritonserver

    try:
        return find_tritonserver()
    except TritonServerError as exc:
        pytest.skip(f"no tritonserver: {exc}")


@pytest.fixture(scope="session")
def stack(triton_install, tmp_path_factory):
    """The real stack, started once per test session for every file that asks for ``stack``:
    tritonserver serving the chroma repository (demo checkpoint, CPU) and the frontend.
    test_frontend_triton.py defines its own ``stack``, over a scripted stand-in model."""
    from openai_frontend.testing import TEST_FRONTEND_ARGS, ChromaStack

    chroma = ChromaStack(tmp_path_factory.getbasetemp() / "chroma_stack", frontend_args=TEST_FRONTEND_ARGS).start()
    yield chroma
    chroma.stop()


class RecordingRunner:
    """Stands in for the engine's StepRunner on the CPU, which has no CUDA graphs: runs each step
    function eagerly and notes the graph key it was asked for."""
    use_graphs = False

    def __init__(self):
        self.keys: list = []

    def __len__(self) -> int:
        return len(set(self.keys))

    def __call__(self, key, fn, *args):
        self.keys.append(key)
        return fn(*args)


@pytest.fixture
def recording_runner():
    return RecordingRunner()
