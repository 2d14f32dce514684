"""Every example in ``client/`` runs as is against the real stack (demo checkpoint) and leaves a
valid reply on disk.  The stack is the one ``test_frontend_server.py`` uses (shared)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf


ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "client"
MAX_TOKENS = "8"

pytestmark = pytest.mark.triton


def run(cmd: list[str], stack, **env) -> str:
    environment = {**os.environ, "CHROMA_URL": stack.frontend.url, "TRITON_GRPC_URL": stack.triton.grpc_url,
                   "TRITON_HTTP_URL": stack.triton.http_url, "NO_PROXY": "*", **env}
    result = subprocess.run(cmd, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def assert_reply_wav(path: Path, max_frames: int = int(MAX_TOKENS)) -> None:
    samples, rate = sf.read(path)
    assert rate == 24000 and 0 < len(samples) <= max_frames * 1920 and len(samples) % 1920 == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_example(stack, tmp_path):
    out = run(["bash", str(CLIENT / "curl_example.sh")], stack, MAX_TOKENS=MAX_TOKENS, OUT=str(tmp_path / "reply.wav"),
              PYTHON=sys.executable)
    assert "reply text:" in out
    assert_reply_wav(tmp_path / "reply.wav")


def test_requests_example(stack, tmp_path):
    out = run([sys.executable, str(CLIENT / "requests_example.py"), "--max-tokens", MAX_TOKENS,
               "--out", str(tmp_path / "reply.wav")], stack)
    assert "Reply text:" in out
    assert_reply_wav(tmp_path / "reply.wav")


def test_openai_sdk_example(stack, tmp_path):
    out = run([sys.executable, str(CLIENT / "openai_sdk_example.py"), "--max-tokens", MAX_TOKENS,
               "--out", str(tmp_path / "reply")], stack)
    assert "seed schema" in out and "openai schema" in out
    assert_reply_wav(tmp_path / "reply_seed.wav")
    assert_reply_wav(tmp_path / "reply_openai.wav")


def test_openai_stream_example(stack, tmp_path):
    out = run([sys.executable, str(CLIENT / "openai_stream_example.py"), "--max-tokens", MAX_TOKENS,
               "--out", str(tmp_path / "reply.wav")], stack)
    assert "[finish:" in out and "usage:" in out
    assert_reply_wav(tmp_path / "reply.wav")


def test_triton_grpc_stream_example(stack, tmp_path):
    out = run([sys.executable, str(CLIENT / "triton_grpc_stream_example.py"), "--max-tokens", MAX_TOKENS,
               "--url", stack.triton.grpc_url, "--out", str(tmp_path / "reply.wav")], stack)
    assert "[finish:" in out
    assert_reply_wav(tmp_path / "reply.wav")


def test_triton_http_example(stack, tmp_path):
    out = run([sys.executable, str(CLIENT / "triton_http_example.py"), "--max-tokens", MAX_TOKENS,
               "--url", stack.triton.http_url, "--out", str(tmp_path / "reply.wav")], stack)
    assert "model ready: True" in out and "[finish:" in out
    assert_reply_wav(tmp_path / "reply.wav")
