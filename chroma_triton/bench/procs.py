"""Which server process burnt how much CPU during a level (Linux ``/proc``), and the py-spy hook.

A served stack is several processes: ``tritonserver``, one Python stub per model instance
(``chroma_lm``, ``audio_encoder``, ``codec_decoder``, ...) and the frontend. When the GPU waits for
the host, the question is which of them is short of CPU: a process at ~1 core with one hot thread
is bound by that thread (for a Python stub: by the GIL). Counters are read from
``/proc/<pid>/stat`` and ``/proc/<pid>/task/<tid>/stat`` (user + system clock ticks) before and
after the level; no sampling thread is needed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PROC = Path("/proc")
STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class ServerProcess:
    pid: int
    role: str  # "tritonserver", "frontend", or the model name of a Python stub ("chroma_lm", ...)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def children(pid: int) -> list[int]:
    """The pids of the processes ``pid`` started (its main thread's children), [] when it is gone."""
    try:
        text = (PROC / str(pid) / "task" / str(pid) / "children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def role_of(argv: list[str]) -> str | None:
    """The server role of a process from its argv, or None when it is not part of the stack."""
    if not argv:
        return None
    exe = os.path.basename(argv[0])
    if STUB in exe:
        # the stub's first argument is the instance's model.py: .../<model>/<version>/model.py
        model_py = Path(argv[1]) if len(argv) > 1 else None
        return model_py.parent.parent.name if model_py is not None and model_py.parent.parent.name else "python_stub"
    if exe == "tritonserver":
        return "tritonserver"
    if any(a == "openai_frontend" or a.startswith("openai_frontend") for a in argv[1:4]):
        return "frontend"
    return None


def _stat_fields(stat_path: Path) -> list[str] | None:
    """The fields of a ``/proc/.../stat`` file after ``pid (comm)`` (state first), or None."""
    try:
        text = stat_path.read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(PROC / str(pid) / "stat")
    return None if fields is None else int(fields[1])


def mentions(part: str, path: str) -> bool:
    """Whether a command-line word names `path` or something under it (``/root/stack-a`` in
    ``/root/stack-a/x/model.py`` or ``--workdir=/root/stack-a``, not in ``/root/stack-ab``)."""
    path = path.rstrip("/")
    return re.search(rf"(^|[=\s]){re.escape(path)}(/|$|\s)", part) is not None


def _lineage_matches(pid: int, match: str, depth: int = 6) -> bool:
    """Whether the process or one of its ancestors names `match` on its command line."""
    for _ in range(depth):
        if pid is None or pid <= 1:
            return False
        if any(mentions(part, match) for part in _cmdline(pid)):
            return True
        pid = _ppid(pid)
    return False


def server_processes(match: str | None = None) -> list[ServerProcess]:
    """tritonserver, its model stubs and the frontend (with its worker processes) running on this
    machine; empty off Linux. With `match`, only those whose command line or an ancestor's holds
    it (e.g. the launcher's ``--workdir`` when two stacks run side by side: the stubs' model.py
    paths and tritonserver's repository lie under it, the frontend is the launcher's child)."""
    if not PROC.is_dir():
        return []
    pids = [int(e.name) for e in PROC.iterdir() if e.name.isdigit()]
    roles = {pid: role_of(_cmdline(pid)) for pid in pids}
    frontends = {pid for pid, role in roles.items() if role == "frontend"}
    for pid in pids:  # uvicorn's --workers: spawned children of the frontend process
        if roles[pid] is None and frontends and _ppid(pid) in frontends:
            roles[pid] = "frontend"
    found = [ServerProcess(pid, role) for pid, role in roles.items()
             if role is not None and (not match or _lineage_matches(pid, match))]
    return sorted(found, key=lambda p: (p.role, p.pid))


def _ticks(stat_path: Path) -> int | None:
    fields = _stat_fields(stat_path)
    return None if fields is None else int(fields[11]) + int(fields[12])  # utime, stime


def cpu_snapshot(procs: list[ServerProcess]) -> dict[int, dict]:
    """Per pid: CPU ticks of the process and of each of its threads."""
    snap = {}
    for p in procs:
        total = _ticks(PROC / str(p.pid) / "stat")
        if total is None:
            continue
        threads = {}
        try:
            for task in (PROC / str(p.pid) / "task").iterdir():
                t = _ticks(task / "stat")
                if t is not None:
                    threads[int(task.name)] = t
        except OSError:
            pass
        snap[p.pid] = {"role": p.role, "ticks": total, "threads": threads}
    return snap


def cpu_deltas(before: dict[int, dict], after: dict[int, dict], wall_s: float, top_threads: int = 3) -> dict:
    """Per role (instances summed): CPU seconds over the level, cores used on average, and the
    busiest threads' share of a core (the hottest thread of a Python stub near 1.0 = bound by it)."""
    out: dict[str, dict] = {}
    for pid, a in after.items():
        b = before.get(pid)
        if b is None:
            continue
        cpu_s = (a["ticks"] - b["ticks"]) / _TICK
        hot = sorted(((a["threads"][t] - b["threads"].get(t, 0)) / _TICK for t in a["threads"]), reverse=True)
        role = out.setdefault(a["role"], {"processes": 0, "cpu_s": 0.0, "hot_threads_cores": []})
        role["processes"] += 1
        role["cpu_s"] += cpu_s
        if wall_s > 0:
            role["hot_threads_cores"].extend(round(t / wall_s, 3) for t in hot[:top_threads])
    for role in out.values():
        role["cores"] = role["cpu_s"] / wall_s if wall_s > 0 else None
        role["hot_threads_cores"] = sorted(role["hot_threads_cores"], reverse=True)[:top_threads]
    return dict(sorted(out.items()))


class PySpy:
    """``py-spy record`` of a server role's processes for a few seconds (bench_serving's
    ``--spy-levels``): collapsed stacks per thread, sampled without pausing the process, once of
    every thread at work and once of the thread holding the GIL. Off when py-spy is neither
    ``$PY_SPY`` nor on ``PATH``; ``scripts/pyspy_summary.py`` reads the files."""

    def __init__(self, out_dir: str | os.PathLike, seconds: float, role: str = "chroma_lm", rate: int = 200,
                 exe: str | None = None, match: str | None = None):
        self.out_dir, self.seconds, self.role, self.rate, self.match = Path(out_dir), seconds, role, rate, match
        self.exe = exe or os.environ.get("PY_SPY") or shutil.which("py-spy")
        self._procs: list[subprocess.Popen] = []

    def start(self, label: str) -> list[str]:
        """Start recording every process of the role; the files it will write."""
        if not self.exe:
            return []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for p in (p for p in server_processes(self.match) if p.role == self.role):
            for mode, extra in (("threads", ["--threads"]), ("gil", ["--gil", "--threads"])):
                path = self.out_dir / f"pyspy_{label}_{self.role}_{p.pid}_{mode}.txt"
                cmd = [self.exe, "record", "-p", str(p.pid), "-d", str(int(max(self.seconds, 1))), "-r", str(self.rate),
                       "--nonblocking", "-f", "raw", "-o", str(path), *extra]
                self._procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
                files.append(str(path))
        return files

    def wait(self, timeout: float = 30.0) -> list[str]:
        """Wait for the recorders; their error lines, if any."""
        errors = []
        for proc in self._procs:
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                err = b"py-spy did not finish"
            if proc.returncode:
                errors.append(err.decode("utf-8", "replace").strip()[-300:])
        self._procs = []
        return errors
