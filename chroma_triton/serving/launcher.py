"""Launch Chroma on Triton: render the model repository, start tritonserver, wait until ready,
start the OpenAI-compatible frontend, supervise both, and stop both cleanly on Ctrl-C/SIGTERM.

    python -m chroma_triton.serving.launcher [--chroma-model-path PATH] [--dp-size N] ...

(``scripts/chroma_server.sh`` runs this after setting up the environment.) Fails fast, before
starting anything, when fewer GPUs than ``--dp-size`` are visible, a port is taken, or the model
path is wrong. Without ``--chroma-model-path`` it serves the tiny random demo checkpoint (noise).
``--dry-run`` prints the rendered configs and exits.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from ..demo import ASSETS
from .affinity import DEFAULT_IDLE_S, idle_problem
from .cuda_mps import MODES, MpsDaemon, MpsError, find_control
from .repository import MODELS, SOURCE_REPOSITORY, RenderSpec, render_configs, render_repository
from .tritonserver import PYTHON_STUB, TritonServer, TritonServerError, find_tritonserver, is_port_free, python_shm_args
from .tritonserver import _http_ok as http_ok
from .warmup import send_warmups

WARMUP_FRAMES_GPU = 20  # 1.6 s of audio: the first chunks' sizes and a few steps past them

log = logging.getLogger("chroma_triton.launcher")

ENV_GPU_COUNT = "CHROMA_GPU_COUNT"  # override GPU detection (tests, unusual drivers)


class LaunchError(RuntimeError):
    """A problem found before anything was started; the message says what to fix."""


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
def _python_shm_spec(value: str) -> str:
    """--python-shm-mib, checked while parsing (python_shm_args builds the server's arguments)."""
    try:
        python_shm_args(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chroma_server", description="Serve FlashLabs Chroma on Triton with an OpenAI-compatible frontend.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="0.0.0.0", help="address the frontend (and Triton, see --triton-host) binds")
    p.add_argument("--port", type=int, default=8000, help="frontend (OpenAI API) port")
    p.add_argument("--chroma-model-path", default=None,
                   help="Chroma checkpoint folder or hub id; default: the tiny random demo checkpoint (NOISE)")
    p.add_argument("--base-qwen-path", default=None,
                   help="Qwen2.5-Omni folder for thinker config/tokenizer/feature extractor the checkpoint lacks")
    p.add_argument("--dp-size", type=int, default=1, help="data parallel size: chroma_lm instances, one per GPU 0..N-1")
    p.add_argument("--workers", type=int, default=None,
                   help="frontend worker processes (default: 2 per --dp-size: one event loop could not carry 256 "
                        "streams of requests with inline base64 audio, two could: docs/benchmarks.md run 45)")
    p.add_argument("--triton-host", default=None, help="address Triton binds (default: --host)")
    p.add_argument("--triton-http-port", type=int, default=8080, help="Triton HTTP/REST port")
    p.add_argument("--triton-grpc-port", type=int, default=8001, help="Triton gRPC port (the frontend uses it)")
    p.add_argument("--triton-metrics-port", type=int, default=8002, help="Triton Prometheus metrics port")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="where the models run; auto: GPUs when visible (or when --dp-size > 1), else CPU")
    p.add_argument("--max-batch", type=int, default=None, help="concurrent streams per chroma_lm instance")
    p.add_argument("--thinker-backend", choices=("auto", "torch", "sglang"), default=None)
    p.add_argument("--default-voice", default=None, help="reference voice .wav (with .txt transcript beside it)")
    p.add_argument("--param", action="append", default=[], metavar="MODEL.KEY=VALUE",
                   help="set a config parameter, e.g. chroma_lm.chunk_frames=10 (repeatable)")
    p.add_argument("--model-repository", default=str(SOURCE_REPOSITORY), help="source repository to render")
    p.add_argument("--workdir", default=None, help="where the rendered repository and logs go (default: a temp dir)")
    p.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for Triton to be ready")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="restarts of a crashed tritonserver/frontend within 10 minutes before giving up")
    p.add_argument("--log-verbose", type=int, default=0, help="Triton --log-verbose level")
    p.add_argument("--quiet", action="store_true", help="do not echo Triton's log to stderr")
    p.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                   help="OpenMP/BLAS threads per model process (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, "
                        "MKL_NUM_THREADS); default on GPUs: 1 (their CPU work is small, and a pool per process "
                        "oversubscribes the cores), on the CPU: the libraries' own default; variables already "
                        "set in the environment win")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="GPU stacks: where torch.compile keeps chroma_lm's compiled kernels across restarts "
                        "(TORCHINDUCTOR_CACHE_DIR; default $CHROMA_CACHE_DIR/torch-compile, else "
                        "~/.cache/chroma_triton/torch-compile; 'none': torch's default under /tmp; the "
                        "variable already set in the environment wins)")
    p.add_argument("--malloc", default=os.environ.get("CHROMA_TRITON_MALLOC", "auto"),
                   help="allocator of tritonserver and its model processes: auto (jemalloc, else tcmalloc, when "
                        "installed; else glibc's), system, or a library path (default: $CHROMA_TRITON_MALLOC or auto)")
    p.add_argument("--python-shm-mib", default=None, metavar="INITIAL[,GROWTH]", type=_python_shm_spec,
                   help="shared memory of each Python model instance, in MiB: the region it starts with and the "
                        "step it grows by (default: Triton's, 1 and 1; every request's inputs and every "
                        "response's outputs pass through it; /dev/shm must hold them all)")
    p.add_argument("--cuda-mps", choices=MODES, default="auto",
                   help="run the stack's GPU processes under a CUDA MPS daemon of its own, so the codec's and "
                        "the encoder's kernels run beside chroma_lm's instead of in time slices (auto: on GPUs "
                        "when nvidia-cuda-mps-control is on PATH; see chroma_triton/serving/cuda_mps.py)")
    p.add_argument("--warmup-frames", type=int, default=None, metavar="N",
                   help=f"before reporting ready (and after each restart), send one request of N audio frames "
                        f"through the ensemble with the default voice, so the first user's request does not pay "
                        f"first-call costs (default: {WARMUP_FRAMES_GPU} on GPUs, 0 = none on the CPU; see "
                        f"chroma_triton/serving/warmup.py)")
    p.add_argument("--audio-embeds-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="how audio_encoder hands the user clips' embeddings to chroma_lm (and answers direct "
                        "calls): auto = the models' dtype, bf16 on GPUs (half the bytes, nothing rounded), fp32 "
                        "on the CPU")
    p.add_argument("--conversation-affinity", choices=("on", "off"), default="off",
                   help="with --dp-size > 1: keep each conversation's turns on the chroma_lm instance (GPU) that "
                        "served its first turn, whose thinker prefix cache holds the conversation so far, through "
                        "Triton's sequence batcher; clients then name the conversation in each request "
                        "(sequence_id, sequence_start on its first; the frontend does it) and Triton refuses "
                        "requests that do not. Off by default: +8-9 %% audio-s/s over gRPC, but through the frontend "
                        "the same throughput with a longer first-audio tail (docs/benchmarks.md runs 77-78; "
                        "chroma_triton/serving/affinity.py)")
    p.add_argument("--conversation-idle-s", type=float, default=DEFAULT_IDLE_S, metavar="SECONDS",
                   help="with conversation affinity: how long a conversation stays bound to its instance after "
                        "its latest request")
    p.add_argument("--no-frontend", action="store_true", help="serve Triton only")
    p.add_argument("--allowed-local-media-path", action="append", default=None, metavar="DIR",
                   help="folder whose files requests may name by path (repeatable; default: the project's assets/)")
    p.add_argument("--api-key", default=None,
                   help="require this Bearer key on /v1/* (passed to the frontend in its environment, not argv)")
    p.add_argument("--cors-allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="passed to the frontend: browser origins allowed to call the API (repeatable; * = any)")
    p.add_argument("--start-timeout", type=float, default=None, metavar="SECONDS",
                   help="frontend: a reply not started within this long gets 429 and is cancelled "
                        "(the frontend's default: 60; 0 = never)")
    p.add_argument("--dry-run", action="store_true", help="print the rendered configs and exit")
    return p


def parse_params(items: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        model, dot, name = key.partition(".")
        if not sep or not dot or not model or not name:
            raise LaunchError(f"--param {item!r}: expected MODEL.KEY=VALUE, e.g. chroma_lm.chunk_frames=10")
        if model not in MODELS:
            raise LaunchError(f"--param {item!r}: unknown model {model!r}; models: {', '.join(MODELS)}")
        out.setdefault(model, {})[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def visible_gpus() -> int:
    """GPUs this process may use: $CHROMA_GPU_COUNT, else nvidia-smi (limited by
    CUDA_VISIBLE_DEVICES), else torch."""
    if os.environ.get(ENV_GPU_COUNT, "").strip():
        return int(os.environ[ENV_GPU_COUNT])
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1", "none", "NoDevFiles"):
        return 0
    count = None
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            if out.returncode == 0:
                count = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.TimeoutExpired):
            count = None
    if count is None:
        try:
            import torch

            return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001
            return 0
    if cvd is not None:
        count = min(count, len([d for d in cvd.split(",") if d.strip()]))
    return count


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def thread_env(cpu_threads: int | None, kind: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Thread-pool sizes for the model processes. On GPUs their CPU work is glue (audio decoding,
    log-mel features, packing); with every process's OpenMP/BLAS pool as large as the machine, the
    pools spin against each other: log-mel features of a 4 s clip took 25 ms with 2 threads and
    1.6 ms with 1 on a loaded 2-core machine (2026-11-27)."""
    if cpu_threads is None and kind != "gpu":
        return {}
    n = str(max(1, cpu_threads or 1))
    return {name: n for name in THREAD_VARIABLES if name not in environ}


COMPILE_CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def compile_cache_env(cache: str | None, kind: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Where torch.compile keeps its compiled kernels, for GPU stacks (chroma_lm compiles at load).
    torch's default is a folder under /tmp, lost with a container: the first start of an H100 stack
    took 150 s, a later one on the same machine, its /tmp cache still there, 67 s (docs/benchmarks.md,
    runs 15-16). Default: the project's cache folder ($CHROMA_CACHE_DIR, /cache in the Docker image,
    else ~/.cache/chroma_triton); a TORCHINDUCTOR_CACHE_DIR already set wins; "none" leaves torch's
    default."""
    if kind != "gpu" or COMPILE_CACHE_VARIABLE in environ or (cache or "").lower() == "none":
        return {}
    if not cache:
        from ..demo import cache_dir

        cache = str(cache_dir() / "torch-compile")
    return {COMPILE_CACHE_VARIABLE: cache}


def warmup_frames(requested: int | None, kind: str) -> int:
    """--warmup-frames: as given, else WARMUP_FRAMES_GPU on GPUs and none on the CPU (where the
    first request pays no GPU first-call costs, and tests count requests from the start)."""
    if requested is not None:
        return requested
    return WARMUP_FRAMES_GPU if kind == "gpu" else 0


def conversation_idle_s(mode: str, idle_s: float) -> float:
    """``RenderSpec.conversation_idle_s`` for ``--conversation-affinity``: 0 (off) or the timeout."""
    problem = idle_problem(idle_s)
    if problem:
        raise LaunchError(f"--conversation-idle-s {problem}")
    return idle_s if mode == "on" else 0.0


def choose_device(requested: str, dp_size: int, gpus: int, dry_run: bool) -> str:
    if dp_size < 1:
        raise LaunchError(f"--dp-size must be >= 1, got {dp_size}")
    kind = requested
    if kind == "auto":
        kind = "gpu" if gpus > 0 or dp_size > 1 else "cpu"
    if kind == "cpu" and dp_size > 1:
        raise LaunchError(f"--dp-size {dp_size} needs GPUs (one chroma_lm instance per GPU); on the CPU use --dp-size 1")
    if kind == "gpu" and gpus < dp_size:
        message = (f"--dp-size {dp_size} needs {dp_size} GPU(s) but {gpus} {'is' if gpus == 1 else 'are'} visible "
                   f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
                   f"lower --dp-size to {max(gpus, 1)}" + ("" if gpus else " and use --device cpu"))
        if not dry_run:
            raise LaunchError(message)
        log.warning("%s (dry run: rendering anyway)", message)
    return kind


def resolve_model_path(path: str | None, *, dry_run: bool) -> tuple[str, bool]:
    """(checkpoint folder, is_demo). A hub id is downloaded here once, not by every model."""
    if path is None or not str(path).strip():
        from ..demo import DEMO_WARNING, demo_checkpoint

        banner = "!" * 100
        print(f"{banner}\nWARNING: {DEMO_WARNING}\n{banner}", file=sys.stderr, flush=True)
        return ("" if dry_run else str(demo_checkpoint())), True
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise LaunchError(f"--chroma-model-path {path}: not a folder (a Chroma checkpoint is a folder with config.json)")
        cfg = p / "config.json"
        if not cfg.is_file():
            raise LaunchError(f"--chroma-model-path {path}: no config.json in it; is this a Chroma checkpoint folder?")
        try:
            model_type = json.loads(cfg.read_text()).get("model_type")
        except ValueError as exc:
            raise LaunchError(f"--chroma-model-path {path}: config.json is not valid JSON ({exc})") from None
        if model_type != "chroma":
            raise LaunchError(f"--chroma-model-path {path}: config.json has model_type {model_type!r}, expected 'chroma'")
        return str(p.resolve()), False
    text = str(path)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise LaunchError(f"--chroma-model-path {path}: no such folder (and not a hub id like FlashLabs/Chroma-4B)")
    if dry_run:
        return text, False
    from ..checkpoint.loader import resolve_model_path as download
    from ..errors import CheckpointError

    try:
        return str(download(text)), False
    except CheckpointError as exc:
        raise LaunchError(f"--chroma-model-path {path}: {exc}") from None


def check_base_qwen(path: str | None) -> str:
    if not path:
        return ""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise LaunchError(f"--base-qwen-path {path}: no such folder")
    return str(p.resolve())


def check_ports(ports: dict[str, int], host: str) -> None:
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if not 0 < port < 65536:
            raise LaunchError(f"{name} {port} is not a valid port")
        if port in seen:
            raise LaunchError(f"{name} and {seen[port]} are both {port}; give them different ports")
        seen[port] = name
        bind = "0.0.0.0" if host in ("", "0.0.0.0") else host
        if not is_port_free(port, bind):
            raise LaunchError(f"{name} {port} on {bind} is already in use; stop what uses it or pick another port")


def frontend_available() -> bool:
    return importlib.util.find_spec("openai_frontend") is not None


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
class _LogEcho(threading.Thread):
    """Echo a growing log file to stderr (so `docker logs` shows Triton's output)."""

    def __init__(self, path: Path):
        super().__init__(name="triton-log-echo", daemon=True)
        self.path, self.stop_event, self.offset = path, threading.Event(), 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                size = self.path.stat().st_size
                if size < self.offset:
                    self.offset = 0  # a restart truncated the file
                if size > self.offset:
                    with open(self.path, "rb") as f:
                        f.seek(self.offset)
                        data = f.read()
                    self.offset += len(data)
                    sys.stderr.write(data.decode("utf-8", "replace"))
                    sys.stderr.flush()
            except OSError:
                pass
            self.stop_event.wait(0.3)


class ModelWatch:
    """Notices a running tritonserver that can no longer serve, so the launcher restarts it.

    Measured on Triton 2.51 (wheel binary, CPU): after ``kill -9`` of a model's Python stub
    (``triton_python_backend_stub``) Triton neither restarts it nor marks the model unready;
    ``/v2/health/ready`` and ``/v2/models/<m>/ready`` keep answering 200, requests in flight on
    it never finish, and every new request fails at once with "Stub process '<instance>' is not
    healthy." So the watch remembers the stubs that were there when the server became ready and
    reports a fault when one is gone, or when the server has not been ready for
    ``ready_grace_s`` seconds in a row (hung).

    Also seen (2026-11-27, soak with many cancelled gRPC streams): tritonserver's heap got
    corrupted ("malloc(): unaligned fastbin chunk detected", then its handler's "Signal (6)
    received."), and the process stayed up, hung, with ``/v2/health/ready`` still 200 and every
    request stuck. So the watch also reads the server log as it grows and reports a fault when
    Triton logs that it caught a fatal signal.
    """

    def __init__(self, ready_grace_s: float = 30.0):
        self.ready_grace_s = ready_grace_s
        self.server: TritonServer | None = None
        self.stubs: dict[int, str] = {}
        self.unready_since: float | None = None
        self.log_offset = 0

    def reset(self, server: TritonServer) -> None:
        self.server = server
        self.stubs = {pid: name for pid in server.group_pids() if (name := stub_model(pid))}
        self.unready_since = None
        self.log_offset = 0
        log.info("watching %d model process(es): %s", len(self.stubs),
                 ", ".join(f"{name} (pid {pid})" for pid, name in sorted(self.stubs.items())) or "none")

    def fatal_signal(self) -> str | None:
        """Triton's "Signal (N) received." in the part of its log written since the last call
        (with the line before it, which usually says why), or None."""
        path = self.server.log_path
        if path is None:
            return None
        try:
            with open(path, "rb") as handle:
                handle.seek(self.log_offset)
                chunk = handle.read()
        except OSError:
            return None
        complete = chunk.rfind(b"\n") + 1  # only whole lines; the rest is read next time
        self.log_offset += complete
        return fatal_signal_in(chunk[:complete].decode(errors="replace").splitlines())

    def fault(self) -> str | None:
        caught = self.fatal_signal()
        if caught:
            return (f"tritonserver caught a fatal {caught}; it may hang while still answering ready, "
                    "so it is restarted")
        alive = set(self.server.group_pids())
        dead = {pid: name for pid, name in self.stubs.items() if pid not in alive}
        if dead:
            return ("model process(es) died: " + ", ".join(f"{name} (pid {pid})" for pid, name in sorted(dead.items()))
                    + "; Triton does not restart them, so tritonserver is restarted")
        if http_ok(f"http://{self.server.http_url}/v2/health/ready", timeout=2.0):
            self.unready_since = None
        elif self.unready_since is None:
            self.unready_since = time.monotonic()
        elif time.monotonic() - self.unready_since > self.ready_grace_s:
            return f"tritonserver has not been ready for {self.ready_grace_s:g} s"
        return None


#: What Triton's own signal handler prints (then it dumps a trace and exits, or hangs).
_FATAL_SIGNAL = re.compile(r"^Signal \((\d+)\) received\.?$")
#: SIGINT, SIGTERM: a shutdown someone asked for (Triton then exits by itself), not a fault.
_ORDERLY_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def fatal_signal_in(lines: list[str]) -> str | None:
    """"signal N after '<the line before>'" for Triton's first fatal-signal line, or None."""
    for i, line in enumerate(lines):
        match = _FATAL_SIGNAL.match(line.strip())
        if match and int(match.group(1)) not in _ORDERLY_SIGNALS:
            before = lines[i - 1].strip() if i else ""
            return f"signal {match.group(1)}" + (f" after {before!r}" if before else "")
    return None


def stub_model(pid: int) -> str | None:
    """The model a Triton Python stub process serves (its argv: stub <repo>/<model>/<version>/model.py ...)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if len(argv) < 2 or not argv[0].endswith(PYTHON_STUB.encode()):
        return None
    return Path(argv[1].decode(errors="replace")).parent.parent.name


class Launcher:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.stop_event = threading.Event()
        self.server: TritonServer | None = None
        self.frontend: subprocess.Popen | None = None
        self.restarts: list[float] = []
        self.watch = ModelWatch()
        self.mps: MpsDaemon | None = None
        self.warmup_frames = 0  # set from --warmup-frames and the device kind in run()
        self.dp_size = 1

    # -- plan ----------------------------------------------------------------------------------
    def plan(self) -> tuple[RenderSpec, dict[str, str]]:
        a = self.args
        params = parse_params(a.param)
        if a.max_batch is not None:
            params.setdefault("chroma_lm", {})["max_batch"] = str(a.max_batch)
        if a.thinker_backend is not None:
            params.setdefault("chroma_lm", {})["thinker_backend"] = a.thinker_backend
        if a.default_voice is not None:
            voice = Path(a.default_voice).expanduser()
            if not voice.is_file() or not voice.with_suffix(".txt").is_file():
                raise LaunchError(f"--default-voice {a.default_voice}: need the audio file and its transcript "
                                  f"{voice.with_suffix('.txt').name} beside it")
            params.setdefault("audio_encoder", {})["default_voice"] = str(voice.resolve())
        if a.warmup_frames is not None and a.warmup_frames < 0:
            raise LaunchError(f"--warmup-frames must be >= 0 (0 = no warm-up request), got {a.warmup_frames}")
        gpus = visible_gpus()
        kind = choose_device(a.device, a.dp_size, gpus, a.dry_run)
        if params.get("chroma_lm", {}).get("thinker_backend") == "sglang" and not a.dry_run:
            if kind != "gpu":
                raise LaunchError("thinker_backend 'sglang' needs a GPU; use auto or torch on the CPU")
            if importlib.util.find_spec("sglang") is None:
                raise LaunchError("thinker_backend 'sglang' needs the sglang package: pip install 'chroma-triton[sglang]'")
        model_path, _ = resolve_model_path(a.chroma_model_path, dry_run=a.dry_run)
        spec = RenderSpec(model_path=model_path, base_qwen_path=check_base_qwen(a.base_qwen_path), kind=kind,
                          dp_size=a.dp_size, params=params, embeds_dtype=a.audio_embeds_dtype,
                          conversation_idle_s=conversation_idle_s(a.conversation_affinity, a.conversation_idle_s))
        try:
            configs = render_configs(spec, Path(a.model_repository))
        except (ValueError, FileNotFoundError) as exc:
            raise LaunchError(str(exc)) from None
        return spec, configs

    def ports(self) -> dict[str, int]:
        a = self.args
        ports = {"--triton-http-port": a.triton_http_port, "--triton-grpc-port": a.triton_grpc_port,
                 "--triton-metrics-port": a.triton_metrics_port}
        if self.want_frontend():
            ports["--port"] = a.port
        return ports

    def want_frontend(self) -> bool:
        return not self.args.no_frontend and frontend_available()

    def triton_extra_args(self) -> list[str]:
        """tritonserver arguments the flags add (--python-shm-mib)."""
        return python_shm_args(self.args.python_shm_mib) if self.args.python_shm_mib else []

    # -- run -----------------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        spec, configs = self.plan()
        if a.dry_run:
            for name, text in configs.items():
                print(f"# ===== {name}/config.pbtxt =====")
                print(text.rstrip())
                print()
            extra = self.triton_extra_args()
            if extra:
                print("# tritonserver arguments beyond the defaults: " + " ".join(extra))
            return 0
        triton_host = a.triton_host if a.triton_host is not None else a.host
        check_ports({k: v for k, v in self.ports().items() if k != "--port"}, triton_host)
        if "--port" in self.ports():
            check_ports({"--port": a.port}, a.host)
        try:
            install = find_tritonserver()
        except TritonServerError as exc:
            raise LaunchError(str(exc)) from None
        self.warmup_frames, self.dp_size = warmup_frames(a.warmup_frames, spec.kind), spec.dp_size
        workdir = Path(a.workdir or tempfile.mkdtemp(prefix="chroma-triton-"))
        workdir.mkdir(parents=True, exist_ok=True)
        repo = workdir / "model_repository"
        render_repository(repo, spec, Path(a.model_repository))
        log.info("rendered %s (%s, dp %d) from %s", repo, spec.kind.upper(), spec.dp_size, a.model_repository)
        if spec.conversation_idle_s:
            log.info("conversation affinity on: a conversation's turns stay on one chroma_lm instance for %g s after "
                     "its latest request; Triton refuses requests that name no conversation (sequence_id)",
                     spec.conversation_idle_s)
        log.info("tritonserver: %s (%s)", install.binary, install.kind)
        self._install_signals()  # before the MPS daemon starts: a stop from now on goes through _shutdown
        mps_env = self._start_mps(spec.kind, workdir)
        try:
            self.server = TritonServer(
                repo, http_port=a.triton_http_port, grpc_port=a.triton_grpc_port, metrics_port=a.triton_metrics_port,
                address=triton_host, log_file=workdir / "tritonserver.log", log_verbose=a.log_verbose, install=install,
                malloc=a.malloc, extra_args=self.triton_extra_args(),
                env={**thread_env(a.cpu_threads, spec.kind),
                                      **compile_cache_env(a.compile_cache, spec.kind), **mps_env})
        except BaseException:
            self._shutdown()
            raise
        if self.server.malloc_library is not None:
            log.info("tritonserver allocator: %s (LD_PRELOAD; --malloc system for glibc's)", self.server.malloc_library)
        echo = None if a.quiet else _LogEcho(workdir / "tritonserver.log")
        if echo:
            echo.start()
        try:
            self._start_triton()
            if self.stop_event.is_set():
                return 0
            self.watch.reset(self.server)  # before the warm-up: a model process it kills is noticed
            self._warm_up()
            if self.stop_event.is_set():
                return 0
            if self.want_frontend():
                self._start_frontend()
            elif a.no_frontend:
                log.info("--no-frontend: serving Triton only")
            else:
                log.warning("the openai_frontend package is not importable: serving Triton only")
            log.info("READY: Triton gRPC %s, HTTP %s, metrics http://%s/metrics%s", self.server.grpc_url,
                     self.server.http_url, self.server.metrics_url,
                     f"; OpenAI API http://{a.host}:{a.port}/v1" if self.frontend else "")
            return self._supervise()
        finally:
            self._shutdown()
            if echo:
                time.sleep(0.4)
                echo.stop_event.set()

    def _start_mps(self, kind: str, workdir: Path) -> dict[str, str]:
        """Start the CUDA MPS daemon (--cuda-mps); returns the environment that points the stack at
        it ({} without MPS). With `auto`, a daemon that does not start is a warning, not an error."""
        try:
            binary = find_control(self.args.cuda_mps, kind)
        except MpsError as exc:
            raise LaunchError(str(exc)) from None
        if binary is None:
            if kind == "gpu" and self.args.cuda_mps == "auto":
                log.info("CUDA MPS off: nvidia-cuda-mps-control is not on PATH (the model processes take turns on each GPU)")
            return {}
        daemon = MpsDaemon(binary, workdir / "mps-log")
        try:
            daemon.start()
        except MpsError as exc:
            daemon.stop()
            if self.args.cuda_mps == "on":
                raise LaunchError(str(exc)) from None
            log.warning("%s; running without CUDA MPS", exc)
            return {}
        self.mps = daemon
        return daemon.env

    def _install_signals(self) -> None:
        def handler(signum, _frame):
            log.info("received %s: shutting down", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def _start_triton(self) -> None:
        t0 = time.monotonic()
        log.info("starting tritonserver (loading models; a real checkpoint takes a while)...")
        starter = threading.Thread(target=self._start_triton_blocking, daemon=True)
        self._start_error: BaseException | None = None
        starter.start()
        while starter.is_alive():
            if self.stop_event.wait(0.2):
                self.server.stop(timeout=20)
                starter.join(30)
                return
        if self._start_error is not None:
            raise self._start_error
        log.info("tritonserver ready in %.1fs (pid %s)", time.monotonic() - t0, self.server.pid)

    def _warm_up(self) -> None:
        """One request through the ensemble per chroma_lm instance (serving/warmup.py); a failure
        is logged, not fatal: the model watch, the server's health and the first real requests
        tell the rest. A stop (Ctrl-C, SIGTERM) ends it within 0.25 s."""
        if self.warmup_frames <= 0 or self.stop_event.is_set():
            return
        for result in send_warmups(self.server.grpc_url, self.warmup_frames, self.dp_size, stop=self.stop_event.is_set):
            if result.error == "stopped":
                log.info("warm-up request stopped after %.1f s", result.total_s)
            elif result.error is not None:
                log.warning("warm-up request failed after %.1f s: %s (serving anyway)", result.total_s, result.error)
            else:
                first = "none" if result.first_audio_s is None else f"{result.first_audio_s * 1000:.0f} ms"
                log.info("warm-up request: first audio after %s, %d frames in %.1f s", first, result.frames,
                         result.total_s)

    def _start_triton_blocking(self) -> None:
        try:
            self.server.start(timeout=self.args.startup_timeout)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            self._start_error = exc

    def _frontend_command(self) -> list[str]:
        a = self.args
        cmd = [sys.executable, "-m", "openai_frontend", "--host", a.host, "--port", str(a.port),
               "--triton-grpc-url", self.server.grpc_url, "--workers", str(2 * a.dp_size if a.workers is None else a.workers)]
        for folder in a.allowed_local_media_path or [str(ASSETS)]:
            cmd += ["--allowed-local-media-path", folder]
        for origin in a.cors_allow_origin:
            cmd += ["--cors-allow-origin", origin]
        if a.start_timeout is not None:
            cmd += ["--start-timeout", str(a.start_timeout)]
        if a.conversation_affinity == "on":  # requests then name their conversations
            cmd += ["--conversation-idle-s", str(a.conversation_idle_s)]
        return cmd

    def _start_frontend(self) -> None:
        cmd = self._frontend_command()
        log.info("starting frontend: %s", " ".join(c if c != self.args.api_key else "***" for c in cmd))
        env = dict(os.environ)
        if self.args.api_key:
            env["CHROMA_API_KEY"] = self.args.api_key  # the frontend reads it; argv would show it in ps
        self.frontend = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, env=env)

    def _note_restart(self, what: str) -> bool:
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < 600] + [now]
        if len(self.restarts) > self.args.max_restarts:
            log.error("%s died again: %d restarts in 10 minutes, giving up", what, len(self.restarts) - 1)
            return False
        return True

    def _supervise(self) -> int:
        while not self.stop_event.wait(1.0):
            fault = "tritonserver exited unexpectedly" if not self.server.is_running() else self.watch.fault()
            if fault:
                log.error("%s; last log lines:\n%s", fault, self.server.log_tail(30))
                if not self._note_restart("tritonserver"):
                    return 1
                # A server with a dead model process cannot finish its requests: no grace period
                # (Triton would wait its 30 s exit timeout for them); the clients get UNAVAILABLE -> 503.
                self.server.stop(timeout=2)
                time.sleep(min(2 ** len(self.restarts), 30))
                log.info("restarting tritonserver")
                try:
                    self._start_triton()
                except TritonServerError as exc:
                    log.error("restart failed: %s", exc)
                    continue
                self.watch.reset(self.server)
                self._warm_up()
            if self.frontend is not None and self.frontend.poll() is not None:
                log.error("frontend exited with code %s", self.frontend.returncode)
                if not self._note_restart("frontend"):
                    return 1
                time.sleep(1)
                self._start_frontend()
        return 0

    def _shutdown(self) -> None:
        if self.frontend is not None and self.frontend.poll() is None:
            log.info("stopping frontend (pid %d)", self.frontend.pid)
            try:
                os.killpg(self.frontend.pid, signal.SIGTERM)
                self.frontend.wait(15)
            except (ProcessLookupError, PermissionError):
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.frontend.pid, signal.SIGKILL)
                self.frontend.wait()
        try:
            if self.server is not None:
                log.info("stopping tritonserver")
                self.server.stop()
        finally:
            if self.mps is not None:
                self.mps.stop()
                self.mps = None
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s [launcher] %(levelname)s %(message)s")
    try:
        return Launcher(args).run()
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TritonServerError as exc:
        print(f"error: tritonserver failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
