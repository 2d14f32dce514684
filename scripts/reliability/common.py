"""Shared pieces of the reliability drivers (``scripts/reliability/*.py``) and their in-suite
versions (``tests/test_reliability_*.py``): starting a real stack with chosen settings, reading
Triton's metrics, and the resident memory of every serving process.

Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from openai_frontend.testing import ChromaStack, metric_value  # noqa: E402

ASSETS = ROOT / "assets"
SLOT_METRICS = ("chroma_lm_active_requests", "chroma_lm_queued_requests")
COUNTER_METRICS = ("chroma_lm_finished_total", "chroma_lm_cancelled_total", "chroma_lm_failed_total",
                   "chroma_lm_audio_frames_total")

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 10.0) -> tuple[int | None, bytes]:
    """(status, body) of a GET that bypasses any proxy; status None when nothing answers."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None, b""


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that a driver's ``finally`` stops the servers it started."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


# -- the stack -------------------------------------------------------------------------------------
def start_stack(workdir: str | os.PathLike, *, lm_params: dict[str, str] | None = None,
                frontend_args: list[str] | tuple[str, ...] = (), triton_env: dict[str, str] | None = None) -> ChromaStack:
    """tritonserver (the project's repository rendered for the CPU, demo checkpoint, ``chroma_lm``
    parameters overridden by ``lm_params``) + the frontend, both ready."""
    from chroma_triton.serving.repository import RenderSpec, render_repository

    workdir = Path(workdir)
    repo = workdir / "model_repository"
    render_repository(repo, RenderSpec(kind="cpu", params={"chroma_lm": dict(lm_params or {})}))
    return ChromaStack(workdir, frontend_args=list(frontend_args), repository=repo, triton_env=triton_env).start()


def default_frontend_args(*extra: str, request_timeout: float = 120.0) -> list[str]:
    return ["--allowed-local-media-path", str(ASSETS), "--request-timeout", f"{request_timeout:g}", *extra]


# -- metrics -----------------------------------------------------------------------------------------
def metrics(metrics_url: str, names=SLOT_METRICS + COUNTER_METRICS) -> dict[str, float | None]:
    """Current values of ``names`` on Triton's ``/metrics`` (``host:port``)."""
    status, body = http_get(f"http://{metrics_url}/metrics", timeout=5)
    if status != 200:
        raise RuntimeError(f"Triton metrics at {metrics_url} answered {status}")
    text = body.decode()
    return {name: metric_value(text, name) for name in names}


def wait_idle(metrics_url: str, timeout: float = 30.0) -> dict[str, float | None]:
    """Wait until no engine row is busy and nothing is queued; return the metrics then."""
    deadline = time.monotonic() + timeout
    while True:
        values = metrics(metrics_url)
        if all(values[name] == 0 for name in SLOT_METRICS) or time.monotonic() > deadline:
            return values
        time.sleep(0.2)


# -- memory ------------------------------------------------------------------------------------------
def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def process_name(pid: int) -> str:
    """A short name: 'tritonserver', 'stub:<model>' or 'frontend'."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in argv if a]
    if not args:
        return "?"
    if args[0].endswith("tritonserver"):
        return "tritonserver"
    if args[0].endswith("triton_python_backend_stub") and len(args) > 1:
        return "stub:" + Path(args[1]).parent.parent.name
    if "openai_frontend" in args:
        return "frontend"
    return Path(args[0]).name


def frontend_workers(pid: int) -> list[int]:
    """uvicorn's worker processes under the frontend process ``pid`` (``--workers N > 1``), by pid."""
    from chroma_triton.bench.procs import _cmdline, children

    # not multiprocessing's resource tracker, the other child
    return sorted(c for c in children(pid) if any("spawn_main" in part for part in _cmdline(c)))


def stack_rss(stack: ChromaStack) -> dict[str, int]:
    """Resident memory (KiB) of tritonserver, each Python stub, the frontend and its workers
    (``frontend worker 1``, ... in the order of their pids)."""
    named = [(process_name(pid), pid) for pid in stack.triton.group_pids()]
    front = stack.frontend._proc.pid
    named.append(("frontend", front))
    named += [(f"frontend worker {i}", pid) for i, pid in enumerate(frontend_workers(front), 1)]
    out = {}
    for name, pid in named:
        value = rss_kib(pid)
        if value is not None:
            out[name] = value
    return out


# -- reports -----------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    command: str
    started: str
    machine: str

    @classmethod
    def now(cls) -> "RunInfo":
        cores = os.cpu_count()
        try:
            mem = int(Path("/proc/meminfo").read_text().split()[1]) // (1024 * 1024)
        except (OSError, ValueError, IndexError):
            mem = 0
        command = " ".join([Path(sys.executable).name, *[a if " " not in a else repr(a) for a in sys.argv]])
        return cls(command=command, started=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   machine=f"{platform.machine()}, {cores} CPU cores, {mem} GiB RAM, no GPU")


def write_report(path: str | os.PathLike | None, report: dict) -> None:
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"
