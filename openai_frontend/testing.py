"""Run the frontend as a real server process (for tests, benchmarks and the client examples).

:class:`FrontendProcess` starts ``python -m openai_frontend`` on a free port, waits until it
answers ``/health`` (any status: the frontend is up even when Triton is not ready), and stops
it again.  Its output goes to a log file whose tail is put into start-up errors.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Sequence

from chroma_triton.serving.tritonserver import free_port


class FrontendProcess:
    def __init__(self, triton_grpc_url: str, *, args: Sequence[str] = (), port: int | None = None,
                 log_file: str | os.PathLike | None = None, env: dict | None = None):
        self.triton_grpc_url = triton_grpc_url
        self.args = list(args)
        self.port = port or free_port()
        self.log_path = Path(log_file) if log_file else Path(tempfile.mkstemp(prefix="frontend-", suffix=".log")[1])
        self.env = env
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "openai_frontend", "--host", "127.0.0.1", "--port", str(self.port),
                "--triton-grpc-url", self.triton_grpc_url, *self.args]

    def start(self, timeout: float = 30.0, wait_ready: bool = False) -> "FrontendProcess":
        """Start and wait for ``/health`` to answer (with ``wait_ready``: to answer 200)."""
        env = {**os.environ, **(self.env or {}), "NO_PROXY": "*"}
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                          stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"frontend exited with code {self._proc.returncode}:\n{self.log_tail()}")
            status = _status(f"{self.url}/health")
            if status == 200 or (status is not None and not wait_ready):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"frontend not {'ready' if wait_ready else 'up'} in {timeout:g} s "
                                   f"(last /health: {status}):\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return ""

    def __enter__(self) -> "FrontendProcess":
        return self if self._proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _status(url: str) -> int | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def metric_value(metrics_text: str, name: str) -> float | None:
    """Sum of the samples of ``name`` in Prometheus text (None when absent)."""
    total, seen = 0.0, False
    for line in metrics_text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


# -- the whole stack: tritonserver (the project's model repository) + this frontend -------------------
class ChromaStack:
    """tritonserver serving the project's ``chroma`` ensemble, and the frontend in front of it.

    ``repository`` defaults to ``model_repository/`` rendered for the CPU with the demo checkpoint
    (:func:`chroma_triton.serving.repository.render_repository`, what the launcher serves).  Used by the end-to-end tests and the client
    examples' tests; start-up costs tens of seconds on a CPU, so the tests share one (the ``stack``
    fixture in ``tests/conftest.py``).
    """

    def __init__(self, workdir: str | os.PathLike, *, frontend_args: Sequence[str] = (), repository=None,
                 triton_env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.frontend_args = list(frontend_args)
        self.repository = repository
        self.triton_env = dict(triton_env or {})  # extra environment of tritonserver (e.g. allocator settings)
        self.triton = None
        self.frontend: FrontendProcess | None = None

    def start(self, timeout: float = 300.0) -> "ChromaStack":
        from chroma_triton.serving.tritonserver import TritonServer

        self.workdir.mkdir(parents=True, exist_ok=True)
        repository = self.repository or render_repository(self.workdir / "model_repository")
        self.triton = TritonServer(repository, log_file=self.workdir / "tritonserver.log", env=self.triton_env)
        try:
            self.triton.start(timeout=timeout)
            self.frontend = FrontendProcess(self.triton.grpc_url, args=self.frontend_args,
                                            log_file=self.workdir / "frontend.log").start(wait_ready=True)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.frontend is not None:
            self.frontend.stop()
        if self.triton is not None:
            self.triton.stop()

    def __enter__(self) -> "ChromaStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def render_repository(target: Path) -> Path:
    """The model repository rendered as the launcher serves it on a CPU (demo checkpoint)."""
    from chroma_triton.serving.repository import RenderSpec, render_repository as render

    render(target, RenderSpec(kind="cpu"))
    return target



#: How the tests run the frontend: the project's assets readable by path (as the launcher does),
#: a body limit small enough to test cheaply, a timeout that fails a hung test in minutes.
TEST_FRONTEND_ARGS = ("--allowed-local-media-path", str(Path(__file__).resolve().parent.parent / "assets"),
                      "--max-body-bytes", str(8 * 1024 * 1024), "--request-timeout", "120")
