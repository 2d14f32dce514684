"""Start the whole serving stack the way users do (the project's launcher: tritonserver + the
OpenAI frontend) on free loopback ports, wait until both are ready, and stop it again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Sequence

from ..serving.tritonserver import free_port

ROOT = Path(__file__).resolve().parents[2]


def http_status(url: str, timeout: float = 3.0) -> int | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class LaunchedStack:
    """``python -m chroma_triton.serving.launcher`` as a subprocess (its own process group)."""

    def __init__(self, workdir: Path, *, model: str | None, dp_size: int = 1, extra_args: Sequence[str] = ()):
        self.workdir = Path(workdir)
        self.model, self.dp_size, self.extra_args = model, dp_size, list(extra_args)
        ports: list[int] = []
        for _ in range(4):
            ports.append(free_port(exclude=ports))
        self.port, self.grpc_port, self.http_port, self.metrics_port = ports
        self.log_path = self.workdir / "launcher.log"
        self.proc: subprocess.Popen | None = None

    @property
    def frontend_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "chroma_triton.serving.launcher", "--host", "127.0.0.1",
               "--port", str(self.port), "--triton-grpc-port", str(self.grpc_port),
               "--triton-http-port", str(self.http_port), "--triton-metrics-port", str(self.metrics_port),
               "--dp-size", str(self.dp_size), "--workdir", str(self.workdir / "server"), "--quiet"]
        if self.model:
            cmd += ["--chroma-model-path", self.model]
        return cmd + self.extra_args

    def start(self, timeout: float = 1800.0) -> "LaunchedStack":
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, NO_PROXY="*")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=ROOT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while http_status(f"{self.frontend_url}/health") != 200:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the launcher exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the stack was not ready in {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.5)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # the launcher stops the frontend and tritonserver itself
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return ""

    def __enter__(self) -> "LaunchedStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
