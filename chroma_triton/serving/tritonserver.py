"""Find and run a real ``tritonserver`` process (Triton Inference Server 2.51).

Used by the launcher script, the tests and the benchmark tools, so that all of them start the
server the same way. Two installations are supported:

* the NGC container: ``/opt/tritonserver/bin/tritonserver`` with backends in
  ``/opt/tritonserver/backends``;
* the ``nvidia-pytriton`` wheel (installed with ``--no-deps`` by ``scripts/setup.sh``): the same
  Triton build under ``<site-packages>/pytriton/tritonserver`` with its shared libraries in
  ``<site-packages>/nvidia_pytriton.libs`` (which must be on ``LD_LIBRARY_PATH``).

Facts this module is built around (measured, see docs in ``/work/shared/DESIGN.md`` §3):

* The Python-backend stub embeds the Python it finds through ``PATH``; it takes its packages from
  the *active* environment, so the venv's ``bin/`` must come first on ``PATH`` (and
  ``VIRTUAL_ENV`` be set) when ``tritonserver`` starts. ``PYTHONPATH`` alone does not reach it.
* The stubs are separate processes forked by ``tritonserver``. The server is therefore started in
  its own session / process group, and :meth:`TritonServer.stop` sweeps that whole group, so no
  stub outlives its server.
* Everything the server and the stubs print (Triton's log and models' ``print``/``logging``
  output) goes to one log file, whose tail is put into every start-up error.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

ENV_BINARY = "TRITONSERVER_BIN"
"""Environment variable naming the ``tritonserver`` binary to use; wins over every other place."""

ENV_BACKEND_DIR = "TRITONSERVER_BACKEND_DIR"
"""Optional override of the backend directory (default: ``<binary>/../../backends``)."""

ENV_MALLOC = "CHROMA_TRITON_MALLOC"
"""Allocator for tritonserver and its stubs: ``auto`` (default), ``system``, or a library path."""

#: Allocators tried by ``malloc="auto"``, in order (file names as ``ldconfig -p`` lists them).
#: jemalloc was measured here (docs/reliability.md: tritonserver's VmRSS flat over 6 soak rounds
#: instead of growing with glibc); tcmalloc is what NVIDIA's Triton container ships for this.
MALLOC_LIBRARIES = ("libjemalloc.so.2", "libtcmalloc_minimal.so.4", "libtcmalloc.so.4")

NGC_BINARY = Path("/opt/tritonserver/bin/tritonserver")
PYTHON_STUB = "triton_python_backend_stub"
LOG_TAIL_LINES = 60

# What Triton 2.51 prints when it cannot bind a port, e.g.
#   main.cc:257] "failed to start HTTP service: Unavailable - Socket '127.0.0.1:52203' already in use "
# With auto-picked ports another process may take one between free_port() and the bind, so
# start() retries on new ports.
_CLASH_LINE = re.compile(r"failed to start \w+ service:.*already in use", re.I)
_CLASH_PORT = re.compile(r"Socket '[^']*:(\d+)'")
_PORT_ATTEMPTS = 3

INSTALL_HINT = (
    "Install one of: (a) the project venv with `bash scripts/setup.sh` (installs the "
    "nvidia-pytriton==0.7.0 wheel with --no-deps and puts its Python-backend stub in place); "
    "(b) `pip install --no-deps nvidia-pytriton==0.7.0` into the interpreter that runs this code, "
    "then copy pytriton/tritonserver/python_backend_stubs/<X.Y>/triton_python_backend_stub into "
    "pytriton/tritonserver/backends/python/; (c) run inside the NGC container "
    "nvcr.io/nvidia/tritonserver:24.10-py3 (Triton 2.51); or (d) set "
    f"{ENV_BINARY}=/path/to/tritonserver."
)


class TritonServerError(RuntimeError):
    """The server cannot be found, does not start, or died."""


class _PortClash(TritonServerError):
    """The server could not bind a port; ``retryable`` when every such port was picked by us."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


# --------------------------------------------------------------------------------------------
# Finding the installation
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TritonInstall:
    """Where one Triton installation lives.

    ``library_paths`` are prepended to ``LD_LIBRARY_PATH`` (the pytriton wheel's bundled libraries;
    the NGC image's ``lib/``). ``kind`` is ``"pytriton"`` for the wheel and ``"ngc"`` otherwise.
    """

    binary: Path
    backend_directory: Path
    library_paths: tuple[Path, ...] = ()
    kind: str = "ngc"
    cache_directory: Path | None = None


def find_tritonserver() -> TritonInstall:
    """Locate ``tritonserver``: ``$TRITONSERVER_BIN``, then the NGC path, then the pytriton wheel.

    ``$TRITONSERVER_BIN``, when set, is authoritative: a wrong value is an error rather than a
    silent fall-back to some other binary. Raises :class:`TritonServerError` naming what to install
    when nothing is found.
    """
    explicit = os.environ.get(ENV_BINARY)
    if explicit:
        binary = Path(explicit).expanduser()
        if not _is_executable(binary):
            raise TritonServerError(
                f"{ENV_BINARY}={explicit!r} does not point to an executable tritonserver binary. "
                f"Fix or unset {ENV_BINARY}. {INSTALL_HINT}"
            )
        return _install_from_binary(binary)
    if _is_executable(NGC_BINARY):
        return _install_from_binary(NGC_BINARY)
    wheel_binary = _pytriton_binary()
    if wheel_binary is not None and _is_executable(wheel_binary):
        return _install_from_binary(wheel_binary)
    raise TritonServerError(
        f"No tritonserver binary found: {ENV_BINARY} is not set, {NGC_BINARY} does not exist, and "
        f"the nvidia-pytriton wheel is not installed in {sys.prefix}. {INSTALL_HINT}"
    )


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _pytriton_binary() -> Path | None:
    """The binary shipped in the current interpreter's ``pytriton`` package, if installed.

    ``find_spec`` locates the package without importing it (its Python code wants packages that
    ``--no-deps`` left out).
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    return package_dir / "tritonserver" / "bin" / "tritonserver"


def _install_from_binary(binary: Path) -> TritonInstall:
    """Derive backends/libraries from the binary's location (NGC and wheel share the layout)."""
    binary = binary.resolve()
    root = binary.parent.parent  # .../tritonserver
    backends = Path(os.environ.get(ENV_BACKEND_DIR) or root / "backends")
    wheel_libs = root.parent.parent / "nvidia_pytriton.libs"  # <site-packages>/nvidia_pytriton.libs
    if wheel_libs.is_dir():
        kind, libs = "pytriton", (wheel_libs,)
    else:
        kind, libs = "ngc", tuple(p for p in (root / "lib",) if p.is_dir())
    _check_python_backend(backends)
    caches = root / "caches"
    return TritonInstall(
        binary=binary,
        backend_directory=backends,
        library_paths=libs,
        kind=kind,
        cache_directory=caches if caches.is_dir() else None,
    )


def _check_python_backend(backends: Path) -> None:
    """Fail early when the Python backend lacks its stub (the wheel ships it elsewhere)."""
    python_backend = backends / "python"
    if not (python_backend / "libtriton_python.so").exists():
        raise TritonServerError(f"No Python backend in {python_backend}. {INSTALL_HINT}")
    if not (python_backend / PYTHON_STUB).exists():
        raise TritonServerError(
            f"{python_backend} has no {PYTHON_STUB}: copy the stub for this Python "
            f"({sys.version_info.major}.{sys.version_info.minor}) there from "
            f"pytriton/tritonserver/python_backend_stubs/ (scripts/setup.sh does this)."
        )


# --------------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------------


def is_port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` and it can be bound right now. Connections of
    an earlier server left in TIME_WAIT do not count (servers bind with SO_REUSEADDR, so do we)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(exclude: Iterable[int] = ()) -> int:
    """A TCP port the kernel considers free now (it may be taken again before it is used)."""
    excluded = set(exclude)
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in excluded:
            return port
    raise TritonServerError("could not find a free TCP port")


# --------------------------------------------------------------------------------------------
# Processes (Linux /proc)
# --------------------------------------------------------------------------------------------


def _process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class TritonServer:
    """One ``tritonserver`` process serving ``model_repository``; a context manager.

    Defaults and why:

    * ``--disable-auto-complete-config`` (``strict_model_config=True``): our models ship complete
      ``config.pbtxt`` files; auto-complete would spawn an extra Python stub per model at load
      time to call ``auto_complete_config`` and could silently change a config we test against.
    * ``--model-control-mode=none``: the repository is served as is; pass ``"explicit"`` and
      ``--load-model=...`` in ``extra_args`` to choose models.
    * ``address="127.0.0.1"``: tests and benchmarks must not expose ports; the launcher passes
      ``"0.0.0.0"``. The ``*_url`` properties (``host:port``, no scheme, as tritonclient wants
      them) use 127.0.0.1 for a wildcard or loopback address.
    * Ports left ``None`` are picked free; if one is taken before Triton binds it, ``start()``
      retries with new ports.
    * ``env`` entries are added to a copy of ``os.environ``; ``PATH``/``VIRTUAL_ENV`` are then set
      for ``python_env_prefix`` (``None`` leaves them alone) and ``LD_LIBRARY_PATH`` is extended
      with the installation's library folders.
    * ``log_file=None`` writes to a new temporary file, kept after ``stop()`` for inspection.
    * ``malloc="auto"`` preloads jemalloc (else tcmalloc) when the machine has it (``LD_PRELOAD``,
      inherited by the stubs): with glibc's allocator tritonserver's resident memory kept rising
      to the high-water mark of each load peak and stayed there; with jemalloc it stayed flat
      (docs/reliability.md). ``"system"`` keeps glibc; a path names the library. The
      environment variable ``CHROMA_TRITON_MALLOC`` overrides the default.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        python_env_prefix: str | os.PathLike[str] | None = sys.prefix,
        log_file: str | os.PathLike[str] | None = None,
        model_control_mode: str = "none",
        strict_model_config: bool = True,
        address: str = "127.0.0.1",
        install: TritonInstall | None = None,
        malloc: str | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} is not a directory")
        self.install = install or find_tritonserver()
        self._requested_ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self._ports: dict[str, int] = {}
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(env or {})
        self.python_env_prefix = Path(python_env_prefix) if python_env_prefix else None
        self.model_control_mode = model_control_mode
        self.strict_model_config = strict_model_config
        self.address = address
        self._log_path = Path(log_file) if log_file else None
        self._proc: subprocess.Popen[bytes] | None = None
        self.malloc_library = resolve_malloc(malloc if malloc is not None else os.environ.get(ENV_MALLOC, "auto"))

    # ---- properties ---------------------------------------------------------------------

    @property
    def http_port(self) -> int:
        return self._port("http")

    @property
    def grpc_port(self) -> int:
        return self._port("grpc")

    @property
    def metrics_port(self) -> int:
        return self._port("metrics")

    @property
    def http_url(self) -> str:
        """``host:port`` as tritonclient.http expects it (no scheme)."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{self._client_host}:{self.metrics_port}"

    @property
    def _client_host(self) -> str:
        """Where clients on this machine connect: loopback unless bound to one other address."""
        return "127.0.0.1" if self.address in ("", "0.0.0.0", "127.0.0.1", "localhost") else self.address

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def _port(self, name: str) -> int:
        port = self._ports.get(name) or self._requested_ports[name]
        if port is None:
            raise TritonServerError(f"{name} port is chosen by start(); the server is not started")
        return port

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log (Triton and model output)."""
        return _tail(self._log_path, lines) if self._log_path else ""

    def group_pids(self) -> list[int]:
        """Live processes of this server's process group: tritonserver and its Python stubs."""
        return _process_group_members(self._proc.pid) if self._proc else []

    # ---- command line and environment ---------------------------------------------------

    def command(self) -> list[str]:
        """The exact argv used to launch the server (ports must be chosen)."""
        args = [
            str(self.install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.install.backend_directory}",
            f"--model-control-mode={self.model_control_mode}",
            f"--http-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.install.cache_directory is not None:
            args.append(f"--cache-directory={self.install.cache_directory}")
        if self.strict_model_config:
            args.append("--disable-auto-complete-config")
        return args + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        """The environment the server (and so every Python stub) runs with."""
        env = dict(os.environ)
        env.update(self.extra_env)
        if self.python_env_prefix is not None:
            env["PATH"] = _prepend(str(self.python_env_prefix / "bin"), env.get("PATH"))
            if (self.python_env_prefix / "pyvenv.cfg").exists():
                env["VIRTUAL_ENV"] = str(self.python_env_prefix)
            env.pop("PYTHONHOME", None)  # would override the prefix the stub derives from PATH
        for lib in reversed(self.install.library_paths):
            env["LD_LIBRARY_PATH"] = _prepend(str(lib), env.get("LD_LIBRARY_PATH"))
        libpython_dir = _libpython_dir(self.python_env_prefix)
        if libpython_dir is not None:
            env["LD_LIBRARY_PATH"] = _prepend(str(libpython_dir), env.get("LD_LIBRARY_PATH"))
        if self.malloc_library is not None and "LD_PRELOAD" not in self.extra_env:
            preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
            if str(self.malloc_library) not in preload:
                env["LD_PRELOAD"] = " ".join([str(self.malloc_library), *preload])
        return env

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> TritonServer:
        """Launch the server and return once ``/v2/health/ready`` answers 200.

        Fails fast with a :class:`TritonServerError` carrying the log tail when the process exits
        or ``timeout`` seconds pass. If Triton could not bind a port that was picked here (another
        process took it in between), it is started again on new ports.
        """
        if self.is_running():
            return self
        _warn_if_numpy_2(self.python_env_prefix)
        deadline = time.monotonic() + timeout
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._choose_ports()
            self._launch()
            try:
                self._wait_ready(deadline)
                self._check_services(deadline)
                return self
            except _PortClash as exc:
                self.stop()
                if not exc.retryable or attempt == _PORT_ATTEMPTS:
                    raise TritonServerError(str(exc)) from None
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM the process group, wait up to ``timeout`` s, then SIGKILL what is left.

        Triton waits up to its ``--exit-timeout-secs`` (30 s default) for in-flight requests,
        hence the 40 s default. Idempotent.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self._stop_at_exit)
        pgid = proc.pid
        if proc.poll() is None:
            _killpg(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _killpg(pgid, signal.SIGKILL)
                proc.wait()
        self._sweep_group(pgid, timeout=min(timeout, 10.0))
        _remove_server_files(pgid)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running() else "stopped"
        return f"TritonServer({self.model_repository}, {state}, log={self._log_path})"

    # ---- internals ----------------------------------------------------------------------

    def _choose_ports(self) -> None:
        chosen: dict[str, int] = {}
        for name, requested in self._requested_ports.items():
            chosen[name] = requested if requested else free_port(exclude=chosen.values())
        self._ports = chosen

    def _launch(self) -> None:
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "wb") as log:
            log.write(f"# {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,  # own process group: stop() reaches the stubs too
            )
        atexit.register(self._stop_at_exit)

    def _wait_ready(self, deadline: float) -> None:
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            code = self._proc.poll() if self._proc else -1
            if code is not None:
                self._raise_exited(code)
            if _http_ok(url):
                return
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver (pid {self.pid}) not ready at {url} in time; "
                    f"log {self._log_path}, last lines:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _check_services(self, deadline: float) -> None:
        """Catch a port that could not be bound although the server became ready.

        Triton 2.51 logs a metrics-port clash and keeps running without metrics; the metrics
        service starts after HTTP, so wait until ``/metrics`` answers or the clash is logged.
        """
        url = f"http://{self.metrics_url}/metrics"
        want_metrics = "--allow-metrics=false" not in self.extra_args
        while True:
            if _clashing_ports(self.log_tail(lines=1000)) is not None:
                self._raise_failed("tritonserver could not bind a port")
            if not want_metrics or _http_ok(url, timeout=0.5) or time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def _raise_exited(self, code: int) -> None:
        self._raise_failed(f"tritonserver exited with code {code} before becoming ready")

    def _raise_failed(self, what: str) -> None:
        message = f"{what}; log {self._log_path}, last lines:\n{self.log_tail()}"
        clashes = _clashing_ports(self.log_tail(lines=1000))
        if clashes is None:
            raise TritonServerError(message)
        auto = {self._ports[n] for n, p in self._requested_ports.items() if p is None}
        raise _PortClash(message, retryable=bool(auto) and (not clashes or clashes <= auto))

    @staticmethod
    def _sweep_group(pgid: int, timeout: float) -> None:
        """Kill group members that outlived the server (stubs are not our children)."""
        deadline = time.monotonic() + timeout
        while _process_group_members(pgid):
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"processes of tritonserver group {pgid} survive SIGKILL: {_process_group_members(pgid)}"
                )
            _killpg(pgid, signal.SIGKILL)
            time.sleep(0.05)

    def _stop_at_exit(self) -> None:
        """Last resort when the owner forgot ``stop()``: never leave an orphaned server."""
        with contextlib.suppress(Exception):
            self.stop(timeout=10.0)


def python_shm_args(spec: str) -> list[str]:
    """tritonserver arguments for the Python backend's shared memory from "INITIAL[,GROWTH]" (MiB):
    the region each model instance starts with and the step it grows by (Triton's defaults: 1 and
    1 MiB; every request's inputs and every response's outputs pass through it)."""
    parts = [p.strip() for p in spec.split(",")]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if not 1 <= len(sizes) <= 2 or min(sizes) < 1:
        raise ValueError(f"--python-shm-mib {spec!r}: give INITIAL[,GROWTH] in MiB, each >= 1 (e.g. 64 or 64,16)")
    initial, growth = sizes[0], sizes[-1]
    return [f"--backend-config=python,shm-default-byte-size={initial << 20}",
            f"--backend-config=python,shm-growth-byte-size={growth << 20}"]


def find_malloc_library(names: Sequence[str] = MALLOC_LIBRARIES) -> Path | None:
    """The first of ``names`` the dynamic loader knows (``ldconfig -p``, then the usual folders)."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    known = {}
    for line in listing.splitlines():  # "libjemalloc.so.2 (libc6,x86-64) => /lib/x86_64-linux-gnu/libjemalloc.so.2"
        entry, _, target = line.strip().partition(" => ")
        if target and "64" in entry:  # 64-bit builds only (x86-64, AArch64)
            known.setdefault(entry.split()[0], Path(target.strip()))
    folders = [Path("/lib/x86_64-linux-gnu"), Path("/usr/lib/x86_64-linux-gnu"), Path("/lib/aarch64-linux-gnu"),
               Path("/usr/lib/aarch64-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/local/lib")]
    for name in names:
        if name in known and known[name].exists():
            return known[name]
        for folder in folders:
            if (folder / name).exists():
                return folder / name
    return None


def resolve_malloc(choice: str) -> Path | None:
    """``"auto"`` -> jemalloc/tcmalloc if installed, else None; ``"system"`` -> None; a path -> it."""
    choice = (choice or "auto").strip()
    if choice == "system":
        return None
    if choice == "auto":
        return find_malloc_library()
    path = Path(choice).expanduser()
    if not path.is_file():
        raise TritonServerError(f"malloc library {choice!r} not found; use 'auto', 'system' or the path of "
                                f"e.g. libjemalloc.so.2 ({ENV_MALLOC} / --malloc)")
    return path


def _remove_server_files(server_pid: int) -> None:
    """Remove what the models left for this server's lifetime: the cancel board
    (``/dev/shm/chroma-triton-cancel-<pid>``, :mod:`chroma_triton.serving.cancel_board`)."""
    with contextlib.suppress(Exception):
        from .cancel_board import remove_server_dir

        remove_server_dir(server_pid)


def _warn_if_numpy_2(prefix: Path | None) -> None:
    """Triton 2.51's Python backend fails on numpy 2 outputs, with an error that hides the cause.

    Seen: "output tensor shape does not match size of output". Checked only when the stubs use
    this interpreter's environment (the common case), where it costs no subprocess.
    """
    if prefix is None or Path(prefix).resolve() != Path(sys.prefix).resolve():
        return
    try:
        version = importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        return
    if int(version.split(".")[0]) >= 2:
        warnings.warn(
            f"numpy {version} in {sys.prefix}: Triton's Python backend needs numpy<2 "
            "(outputs fail with 'output tensor shape does not match size of output')",
            RuntimeWarning,
            stacklevel=3,
        )


def _libpython_dir(prefix: Path | None) -> Path | None:
    """The folder of this interpreter's shared ``libpython``, when the stubs use this interpreter.

    The stub is linked against ``libpython3.X.so.1.0`` and the dynamic loader finds the system's
    copy first (e.g. Debian's 3.11.2). When the environment's interpreter is another build of the
    same minor version (pyenv's 3.11.7 here), its compiled stdlib modules need symbols the system
    copy lacks: ``import ssl`` (hence transformers) failed in the stub with "undefined symbol:
    _PyModule_Add". Putting the interpreter's own libpython first makes the stub embed the same
    Python the environment was built with.
    """
    if prefix is None or Path(prefix).resolve() != Path(sys.prefix).resolve():
        return None
    import sysconfig

    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname or not (Path(libdir) / soname).exists():
        return None
    if str(Path(libdir).resolve()).startswith(("/usr/lib", "/lib")):
        return None  # the system interpreter (e.g. the NGC image's): the loader finds it anyway
    return Path(libdir)


def _prepend(entry: str, value: str | None) -> str:
    return f"{entry}{os.pathsep}{value}" if value else entry


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    """GET ``url`` bypassing any HTTP proxy from the environment; True on 200."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _clashing_ports(log_text: str) -> set[int] | None:
    """Ports Triton reported as taken (empty set: some, unnamed); ``None`` when no clash."""
    lines = [m.group(0) for m in _CLASH_LINE.finditer(log_text)]
    if not lines:
        return None
    return {int(port) for line in lines for port in _CLASH_PORT.findall(line)}
