"""Fault injection against the deployment as it runs in production (the launcher:
tritonserver + frontend, supervised), demo checkpoint on the CPU, loopback only.

1. **A model process dies while requests run**: ``kill -9`` of a model's Python stub (``chroma_lm``,
   then ``audio_encoder``, ``codec_decoder``), and of tritonserver itself. Measured: the answers
   of the requests in flight (must be 503 / an in-band ``service_unavailable`` error event), how
   long until ``/health`` says 503, how long until it says 200 again (the launcher restarted
   tritonserver), that the frontend process is the same one, and that a request then succeeds.
2. **Frontend started before Triton**: ``/health`` is 503 and a chat request gets a clear 503
   while nothing listens; once tritonserver is up the same frontend process serves.

    python scripts/reliability/faults.py --report out/faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, RunInfo, exit_on_sigterm, git_revision, http_get, write_report  # noqa: E402

from chroma_triton.bench.procs import _cmdline, children  # noqa: E402
from chroma_triton.serving.launcher import stub_model  # noqa: E402
from chroma_triton.serving.tritonserver import free_port  # noqa: E402

CHAT_BODY = {"model": "chroma", "messages": [{"role": "user", "content": "Tell me a long story."}]}


def _session():
    import requests

    session = requests.Session()
    session.trust_env = False
    return session


def wait_health(url: str, want: int, timeout: float, interval: float = 0.1) -> float | None:
    """Seconds until ``GET /health`` answers ``want`` (None: not within ``timeout``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if http_get(f"{url}/health", timeout=2)[0] == want:
            return time.monotonic() - t0
        time.sleep(interval)
    return None


def chat(url: str, *, max_tokens: int, stream: bool, timeout: float = 120.0) -> dict:
    """One chat request; returns status, error code and, for streams, whether [DONE] came."""
    t0 = time.monotonic()
    try:
        response = _session().post(f"{url}/v1/chat/completions", json={**CHAT_BODY, "max_tokens": max_tokens,
                                                                        "stream": stream}, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - reported as an outcome
        return {"status": None, "error": repr(exc), "seconds": round(time.monotonic() - t0, 2)}
    out = {"status": response.status_code, "seconds": round(time.monotonic() - t0, 2),
           "request_id": response.headers.get("x-request-id")}
    if stream and response.status_code == 200:
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
        out["done"] = bool(events) and events[-1] == "[DONE]"
        if errors:
            out["error_code"], out["message"] = errors[0]["code"], errors[0]["message"]
    elif response.status_code != 200:
        error = response.json().get("error", {})
        out["error_code"], out["message"] = error.get("code"), error.get("message")
    return out


def failed_clearly(outcome: dict) -> bool:
    """A request caught by a fault: HTTP 503, or an in-band service_unavailable error then [DONE]."""
    if outcome.get("status") == 503 and outcome.get("error_code") == "service_unavailable":
        return True
    return (outcome.get("status") == 200 and outcome.get("error_code") == "service_unavailable"
            and outcome.get("done", False))


# -- 1. the launcher and a dying model process --------------------------------------------------
class LaunchedStack:
    """``python -m chroma_triton.serving.launcher`` on free loopback ports (demo checkpoint, CPU)."""

    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = ()):
        self.workdir = Path(workdir)
        self.ports = {}
        for name in ("port", "triton-grpc-port", "triton-http-port", "triton-metrics-port"):
            self.ports[name] = free_port(exclude=self.ports.values())
        self.args = ["--host", "127.0.0.1", "--device", "cpu", "--quiet", "--workdir", str(self.workdir),
                     *[f"--{k}={v}" for k, v in self.ports.items()], *extra_args]
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "launcher.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['port']}"

    @property
    def metrics_url(self) -> str:
        return f"127.0.0.1:{self.ports['triton-metrics-port']}"

    def spawn(self) -> subprocess.Popen:
        """The launcher started, not waited for (its log in `log_path`)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "chroma_triton.serving.launcher", *self.args],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=ROOT, env={**os.environ, "NO_PROXY": "*"}, start_new_session=True)
        return self.proc

    def start(self, timeout: float = 300.0) -> "LaunchedStack":
        self.spawn()
        if wait_health(self.url, 200, timeout, interval=0.25) is None:
            self.stop()
            raise RuntimeError(f"launcher stack not healthy in {timeout:g} s:\n{self.log_tail()}")
        return self

    def children(self) -> dict[str, int]:
        """{'tritonserver': pid, 'frontend': pid, 'stub:<model>': pid}"""
        out = {}
        for pid in children(self.proc.pid):
            argv = _cmdline(pid)
            if argv and argv[0].endswith("tritonserver"):
                out["tritonserver"] = pid
                for stub in children(pid):
                    model = stub_model(stub)
                    if model:
                        out[f"stub:{model}"] = stub
            elif "openai_frontend" in argv:
                out["frontend"] = pid
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""


def kill_during_requests(stack: LaunchedStack, target: str, *, in_flight: int = 4, max_tokens: int = 1000,
                         settle_s: float = 2.0, recover_timeout: float = 180.0) -> dict:
    """Start ``in_flight`` requests (half streaming), ``kill -9`` ``target`` ('stub:chroma_lm',
    'tritonserver', ...), and measure what the clients and ``/health`` see until it recovers."""
    before = stack.children()
    outcomes: list[dict] = [{} for _ in range(in_flight)]

    def client(i: int) -> None:
        outcomes[i] = chat(stack.url, max_tokens=max_tokens, stream=i % 2 == 0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(in_flight)]
    for t in threads:
        t.start()
    time.sleep(settle_s)  # the requests are generating
    t_kill = time.monotonic()
    os.kill(before[target], signal.SIGKILL)
    unhealthy_after = wait_health(stack.url, 503, timeout=30, interval=0.05)
    healthy_after = wait_health(stack.url, 200, timeout=recover_timeout, interval=0.1)
    recovered_s = None if healthy_after is None else time.monotonic() - t_kill
    for t in threads:
        t.join(150)
    after = stack.children()
    probe = chat(stack.url, max_tokens=10, stream=False)
    return {
        "killed": f"{target} (pid {before[target]}) with SIGKILL",
        "in_flight": in_flight,
        "in_flight_outcomes": [{k: v for k, v in o.items() if k != "request_id"} for o in outcomes],
        "in_flight_failed_clearly": sum(failed_clearly(o) for o in outcomes),
        "in_flight_completed": sum(o.get("status") == 200 and "error_code" not in o for o in outcomes),
        "health_503_after_s": None if unhealthy_after is None else round(unhealthy_after, 2),
        "health_200_again_after_s": None if recovered_s is None else round(recovered_s, 2),
        "frontend_restarted": before.get("frontend") != after.get("frontend"),
        "tritonserver_restarted": before.get("tritonserver") != after.get("tritonserver"),
        "request_after_recovery": probe.get("status"),
    }


# -- 2. the frontend before Triton --------------------------------------------------------------
def frontend_before_triton(workdir: Path, timeout: float = 300.0) -> dict:
    from chroma_triton.serving.repository import RenderSpec, render_repository
    from chroma_triton.serving.tritonserver import TritonServer
    from openai_frontend.testing import FrontendProcess

    repo = Path(workdir) / "model_repository"
    render_repository(repo, RenderSpec(kind="cpu"))
    grpc_port = free_port()
    frontend = FrontendProcess(f"127.0.0.1:{grpc_port}", log_file=Path(workdir) / "frontend.log").start()
    server = None
    try:
        status, body = http_get(f"{frontend.url}/health")
        before = {"health": status, "health_body": json.loads(body or b"{}"),
                  "chat": chat(frontend.url, max_tokens=5, stream=False)}
        server = TritonServer(repo, grpc_port=grpc_port, log_file=Path(workdir) / "tritonserver.log")
        t0 = time.monotonic()
        server.start(timeout=timeout)
        triton_ready_s = time.monotonic() - t0
        serving_after = wait_health(frontend.url, 200, timeout=60, interval=0.05)
        after = {"chat": chat(frontend.url, max_tokens=5, stream=False)}
        return {"before_triton": before, "triton_ready_s": round(triton_ready_s, 2),
                "frontend_healthy_after_triton_ready_s": None if serving_after is None else round(serving_after, 2),
                "after_triton": after, "frontend_pid_unchanged": frontend._proc is not None and frontend._proc.poll() is None}
    finally:
        frontend.stop()
        if server is not None:
            server.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="stub:chroma_lm,stub:audio_encoder,stub:codec_decoder,tritonserver",
                   help="processes to kill, one after the other (each after the previous recovered)")
    p.add_argument("--in-flight", type=int, default=6)
    p.add_argument("--workdir", default=None)
    p.add_argument("--report", default=None)
    args = p.parse_args(argv)
    exit_on_sigterm()
    info = RunInfo.now()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chroma-faults-"))
    report = {"run": vars(info), "revision": git_revision(), "kills": [], "problems": []}
    stack = LaunchedStack(workdir / "launcher", extra_args=("--max-restarts", "10")).start()
    print(f"launcher stack up: {stack.url}; log {stack.log_path}", flush=True)
    try:
        for target in args.targets.split(","):
            result = kill_during_requests(stack, target, in_flight=args.in_flight)
            print(json.dumps(result), flush=True)
            report["kills"].append(result)
            if result["in_flight_failed_clearly"] + result["in_flight_completed"] != result["in_flight"]:
                report["problems"].append(f"{target}: some requests in flight did not fail clearly: "
                                          f"{result['in_flight_outcomes']}")
            if result["health_200_again_after_s"] is None or result["request_after_recovery"] != 200:
                report["problems"].append(f"{target}: the service did not recover")
            if result["frontend_restarted"]:
                report["problems"].append(f"{target}: the frontend was restarted")
    finally:
        stack.stop()
    report["launcher_log_faults"] = [line for line in stack.log_tail(400).splitlines()
                                     if "died" in line or "restarting" in line or "ready in" in line]
    report["frontend_before_triton"] = result = frontend_before_triton(workdir / "late_triton")
    if result["before_triton"]["health"] != 503 or result["before_triton"]["chat"]["status"] != 503:
        report["problems"].append("frontend without Triton did not answer 503")
    if result["after_triton"]["chat"]["status"] != 200:
        report["problems"].append("frontend did not serve once Triton was up")
    write_report(args.report, report)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
