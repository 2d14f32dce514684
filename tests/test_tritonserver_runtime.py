"""A real tritonserver (Triton 2.51) runs tiny Python-backend models through our launcher module.

One server per module (start-up costs seconds). The repository holds:

* ``add_one`` — FP32 [-1] -> input + 1; also reports ``numpy.__version__`` and ``sys.prefix`` as
  seen *inside* the Python stub (the backend breaks on numpy 2, and the stub must run in our venv);
* ``count_up`` — decoupled; for INT32 N it sends N responses 0..N-1, then the final flag alone.

Both models write a marker file from ``finalize()``, so the test of ``stop()`` can check that the
server unloaded them cleanly rather than being killed.
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import textwrap
import time
import urllib.request
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from chroma_triton.serving import tritonserver as ts
from chroma_triton.serving.tritonserver import (
    TritonServer,
    TritonServerError,
    find_tritonserver,
    free_port,
    is_port_free,
)


def _find_or_skip() -> ts.TritonInstall:
    try:
        return find_tritonserver()
    except TritonServerError as exc:
        pytest.skip(f"no tritonserver binary: {exc}")


# --------------------------------------------------------------------------------------------
# The model repository
# --------------------------------------------------------------------------------------------

ADD_ONE_CONFIG = """
name: "add_one"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [
  { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] },
  { name: "NUMPY_VERSION", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "PYTHON_PREFIX", data_type: TYPE_STRING, dims: [ 1 ] }
]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""

ADD_ONE_MODEL = """
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_dir = args["model_repository"]
        print(f"add_one stub: numpy {np.__version__}, prefix {sys.prefix}", flush=True)

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            outputs = [
                pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32)),
                pb_utils.Tensor("NUMPY_VERSION", np.array([np.__version__.encode()], dtype=np.object_)),
                pb_utils.Tensor("PYTHON_PREFIX", np.array([sys.prefix.encode()], dtype=np.object_)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses

    def finalize(self):
        open(os.path.join(self.model_dir, "finalized"), "w").close()
"""

COUNT_UP_CONFIG = """
name: "count_up"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "N", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "VALUE", data_type: TYPE_INT32, dims: [ 1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""

COUNT_UP_MODEL = """
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_dir = args["model_repository"]

    def execute(self, requests):
        # Decoupled: answer through each request's sender, return None.
        for request in requests:
            sender = request.get_response_sender()
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
            for i in range(n):
                value = pb_utils.Tensor("VALUE", np.array([i], dtype=np.int32))
                sender.send(pb_utils.InferenceResponse(output_tensors=[value]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def finalize(self):
        open(os.path.join(self.model_dir, "finalized"), "w").close()
"""


def write_model(repo: Path, name: str, config: str, model_py: str) -> Path:
    """One Python-backend model: ``<repo>/<name>/config.pbtxt`` and ``1/model.py``."""
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(textwrap.dedent(config).lstrip())
    (model_dir / "1" / "model.py").write_text(textwrap.dedent(model_py).lstrip())
    return model_dir


def build_repository(repo: Path) -> Path:
    write_model(repo, "add_one", ADD_ONE_CONFIG, ADD_ONE_MODEL)
    write_model(repo, "count_up", COUNT_UP_CONFIG, COUNT_UP_MODEL)
    return repo


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One running server for the module; its log is printed on failure by pytest's capture."""
    _find_or_skip()
    repo = build_repository(tmp_path_factory.mktemp("model_repository"))
    log_file = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    server = TritonServer(repo, log_file=log_file)
    t0 = time.monotonic()
    server.start(timeout=120)
    print(f"tritonserver ready in {time.monotonic() - t0:.1f}s: {server!r}")
    yield server
    server.stop()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True for a live, non-zombie process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (server and stubs name the repo)."""
    pids = [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != os.getpid()]
    return [pid for pid in pids if text in _cmdline(pid) and _alive(pid)]


def _get(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return response.status


# --------------------------------------------------------------------------------------------
# Against the shared server
# --------------------------------------------------------------------------------------------


@pytest.mark.triton
def test_ready_endpoint(server):
    import tritonclient.http as httpclient

    assert _get(f"http://{server.http_url}/v2/health/ready") == 200
    client = httpclient.InferenceServerClient(server.http_url)
    assert client.is_server_ready()
    assert client.is_model_ready("add_one") and client.is_model_ready("count_up")
    assert _get(f"http://{server.metrics_url}/metrics") == 200


@pytest.mark.triton
def test_http_infer_add_one(server):
    import tritonclient.http as httpclient

    x = np.array([1.5, -2.0, 0.0, 41.0], dtype=np.float32)
    inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    client = httpclient.InferenceServerClient(server.http_url)
    result = client.infer("add_one", [inp], outputs=[httpclient.InferRequestedOutput("OUTPUT0")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + 1)


@pytest.mark.triton
def test_stub_runs_in_project_env_with_numpy_below_2(server):
    """The stub must import our venv's packages (PATH/VIRTUAL_ENV) and numpy must be < 2."""
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("INPUT0", [1], "FP32")
    inp.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    result = httpclient.InferenceServerClient(server.http_url).infer("add_one", [inp])
    stub_numpy = result.as_numpy("NUMPY_VERSION")[0].decode()
    stub_prefix = result.as_numpy("PYTHON_PREFIX")[0].decode()
    assert int(stub_numpy.split(".")[0]) < 2, f"numpy {stub_numpy} inside the stub breaks outputs"
    assert Path(stub_prefix).resolve() == Path(sys.prefix).resolve()
    assert f"add_one stub: numpy {stub_numpy}" in server.log_path.read_text()


def _stream_count_up(server, n: int, timeout: float = 20.0) -> list:
    """Stream one ``count_up`` request over gRPC; return every result up to the final one."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put(error or result))
    try:
        inp = grpcclient.InferInput("N", [1], "INT32")
        inp.set_data_from_numpy(np.array([n], dtype=np.int32))
        client.async_stream_infer("count_up", [inp], request_id=f"n{n}", enable_empty_final_response=True)
        received = []
        while True:
            item = results.get(timeout=timeout)
            if isinstance(item, Exception):
                raise item
            received.append(item)
            if _is_final(item):
                return received
    finally:
        client.stop_stream()
        client.close()


def _is_final(result) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


@pytest.mark.triton
@pytest.mark.parametrize("n", [5, 0])
def test_grpc_stream_decoupled_count_up(server, n):
    received = _stream_count_up(server, n)
    assert len(received) == n + 1
    *values, final = received
    assert [int(r.as_numpy("VALUE")[0]) for r in values] == list(range(n))
    assert not any(_is_final(r) for r in values)
    assert final.as_numpy("VALUE") is None  # the final response is empty, only the flag
    assert all(r.get_response().id == f"n{n}" for r in received)


@pytest.mark.triton
def test_launch_environment(server):
    """The running process got the venv first on PATH, VIRTUAL_ENV and the wheel's libraries."""
    environ = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{server.pid}/environ").read_bytes().decode().split("\0")
        if "=" in item
    )
    assert environ["PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")
    if (Path(sys.prefix) / "pyvenv.cfg").exists():
        assert environ["VIRTUAL_ENV"] == sys.prefix
    libs = environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    assert all(str(p) in libs for p in server.install.library_paths)
    argv = _cmdline(server.pid)
    assert f"--model-repository={server.model_repository}" in argv
    assert f"--http-port={server.http_port}" in argv and "--disable-auto-complete-config" in argv


def _mapped(pid: int, library: Path) -> bool:
    """Whether the process has ``library`` loaded (its memory maps name the file)."""
    return library.resolve().name in Path(f"/proc/{pid}/maps").read_text()


def test_allocator_preloaded_when_available(server):
    """malloc="auto" (the default): jemalloc (else tcmalloc) is loaded into tritonserver and its
    stubs when installed; "system" keeps glibc's; a wrong path is a clear error."""
    library = ts.find_malloc_library()
    if os.environ.get(ts.ENV_MALLOC, "auto") != "auto":
        pytest.skip(f"{ts.ENV_MALLOC} is set")
    assert server.malloc_library == library
    stubs = [pid for pid in server.group_pids() if "triton_python_backend_stub" in _cmdline(pid)]
    if library is None:
        assert "LD_PRELOAD" not in server.environment() or "jemalloc" not in server.environment()["LD_PRELOAD"]
        pytest.skip("no jemalloc/tcmalloc on this machine")
    assert _mapped(server.pid, library) and stubs and all(_mapped(pid, library) for pid in stubs)
    system = TritonServer(server.model_repository, malloc="system")
    assert system.malloc_library is None and str(library) not in system.environment().get("LD_PRELOAD", "")
    with pytest.raises(ts.TritonServerError, match="malloc library"):
        TritonServer(server.model_repository, malloc="/no/such/libjemalloc.so.2")


# --------------------------------------------------------------------------------------------
# Own servers: lifecycle and failures
# --------------------------------------------------------------------------------------------


@pytest.mark.triton
def test_stop_leaves_no_process_and_models_finalize(tmp_path):
    _find_or_skip()
    repo = build_repository(tmp_path / "repo")
    from chroma_triton.serving.cancel_board import server_dir

    with TritonServer(repo, log_file=tmp_path / "server.log") as srv:
        board = server_dir(srv.pid)  # what the chroma models' stubs create (cancel_board.CancelBoard)
        board.mkdir(parents=True, exist_ok=True)
        (board / "rid-left-over").touch()
        pids = srv.group_pids()
        stubs = [pid for pid in pids if "triton_python_backend_stub" in _cmdline(pid)]
        assert srv.pid in pids and len(stubs) == 2, [(_cmdline(p)) for p in pids]
        assert sorted(_processes_mentioning(str(repo))) == sorted(pids)
    assert not [pid for pid in pids if _alive(pid)]
    assert not _processes_mentioning(str(repo))
    assert srv.pid is None and not srv.is_running()
    assert not board.exists()  # no /dev/shm folder left behind
    # SIGTERM let Triton unload the models cleanly (finalize ran in each stub).
    assert (repo / "add_one" / "finalized").exists() and (repo / "count_up" / "finalized").exists()
    srv.stop()  # idempotent


@pytest.mark.triton
def test_python_shared_memory_sizes_reach_the_backend(tmp_path):
    """--python-shm-mib INITIAL[,GROWTH]: the Python backend reports the sizes it was given and
    each stub starts with that region (Triton's default is 1 MiB, grown 1 MiB at a time); a bad
    value is refused before anything starts."""
    _find_or_skip()
    repo = build_repository(tmp_path / "repo")
    with TritonServer(repo, log_file=tmp_path / "server.log", log_verbose=1,
                      extra_args=ts.python_shm_args("8,2")) as srv:
        assert srv.is_running()
    log = (tmp_path / "server.log").read_text()
    assert f"shm-default-byte-size={8 << 20},shm-growth-byte-size={2 << 20}" in log, log[-3000:]
    assert ts.python_shm_args("16") == [f"--backend-config=python,shm-default-byte-size={16 << 20}",
                                        f"--backend-config=python,shm-growth-byte-size={16 << 20}"]
    for bad in ("0", "8,0", "lots", "1,2,3", ""):
        with pytest.raises(ValueError, match="--python-shm-mib"):
            ts.python_shm_args(bad)


def test_broken_model_fails_fast_with_log_tail(tmp_path):
    _find_or_skip()
    repo = tmp_path / "repo"
    write_model(repo, "broken", ADD_ONE_CONFIG.replace("add_one", "broken"), "def oops(:\n")
    srv = TritonServer(repo, log_file=tmp_path / "server.log")
    t0 = time.monotonic()
    with pytest.raises(TritonServerError, match="exited with code") as info:
        srv.start(timeout=60)
    assert time.monotonic() - t0 < 30
    assert "broken" in str(info.value) and str(srv.log_path) in str(info.value)
    assert not _processes_mentioning(str(repo))


@pytest.mark.triton
def test_auto_port_taken_meanwhile_is_retried(tmp_path, monkeypatch):
    """A picked port grabbed by someone else before Triton binds it: start again on new ports."""
    _find_or_skip()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        handed: list[int] = []
        monkeypatch.setattr(ts, "free_port", partial(_racy, taken, handed, ts.free_port))
        with TritonServer(build_repository(tmp_path / "repo"), log_file=tmp_path / "server.log") as srv:
            assert srv.http_port != taken and handed[0] == taken
            assert _get(f"http://{srv.http_url}/v2/health/ready") == 200


def _racy(taken: int, handed: list, real_free_port, exclude=()) -> int:
    """free_port() that first hands out a port which is already taken."""
    port = taken if not handed else real_free_port(exclude)
    handed.append(port)
    return port


@pytest.mark.triton
def test_explicit_port_taken_is_an_error(tmp_path):
    _find_or_skip()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        srv = TritonServer(build_repository(tmp_path / "repo"), grpc_port=taken, log_file=tmp_path / "server.log")
        with pytest.raises(TritonServerError, match="already in use"):
            srv.start(timeout=60)
    assert not srv.is_running()


# --------------------------------------------------------------------------------------------
# No binary needed
# --------------------------------------------------------------------------------------------


def test_missing_binary_named_by_env_is_a_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "tritonserver"
    monkeypatch.setenv(ts.ENV_BINARY, str(missing))
    with pytest.raises(TritonServerError, match=r"TRITONSERVER_BIN=.*nowhere.*not point") as info:
        find_tritonserver()
    assert "scripts/setup.sh" in str(info.value) and "nvidia-pytriton" in str(info.value)
    (tmp_path / "repo").mkdir()
    with pytest.raises(TritonServerError, match="TRITONSERVER_BIN"):
        TritonServer(tmp_path / "repo")


def test_no_binary_anywhere_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv(ts.ENV_BINARY, raising=False)
    monkeypatch.setattr(ts, "NGC_BINARY", tmp_path / "opt" / "tritonserver")
    monkeypatch.setattr(ts, "_pytriton_binary", lambda: None)
    with pytest.raises(TritonServerError, match="No tritonserver binary found") as info:
        find_tritonserver()
    assert "nvidia-pytriton==0.7.0" in str(info.value) and "nvcr.io/nvidia/tritonserver" in str(info.value)


def test_port_helpers():
    port = free_port()
    assert is_port_free(port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert not is_port_free(port)
        assert free_port(exclude=[port]) != port


@pytest.mark.triton
def test_launcher_watch_notices_a_fatal_signal(tmp_path):
    """Triton's heap corruption ends in its own handler ("Signal (6) received."), after which the
    process was seen hung while still answering ready: the launcher's watch reads it in the log."""
    import signal as _signal

    from chroma_triton.serving.launcher import ModelWatch

    _find_or_skip()
    repo = build_repository(tmp_path / "repo")
    with TritonServer(repo, log_file=tmp_path / "server.log") as srv:
        watch = ModelWatch()
        watch.reset(srv)
        assert watch.fault() is None
        os.kill(srv.pid, _signal.SIGABRT)  # what glibc's "malloc(): ... detected" does
        deadline = time.monotonic() + 20
        fault = None
        while fault is None and time.monotonic() < deadline:
            fault = watch.fault()
            time.sleep(0.1)
    assert fault is not None and "fatal signal 6" in fault, (fault, srv.log_tail())


def test_fatal_signal_lines():
    from chroma_triton.serving.launcher import fatal_signal_in

    assert fatal_signal_in(["I1127 ... ready", "Signal (15) received."]) is None  # an orderly shutdown
    assert fatal_signal_in(["malloc(): unaligned fastbin chunk detected", "Signal (6) received."]) == \
        "signal 6 after 'malloc(): unaligned fastbin chunk detected'"
    assert fatal_signal_in(["Signal (11) received."]) == "signal 11"
