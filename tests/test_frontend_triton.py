"""Frontend process + real tritonserver serving a scripted stand-in for the ensemble ``chroma``.

The stand-in has the ensemble's exact interface (inputs, outputs, decoupled streaming, the
``chroma_lm_active_requests`` gauge) and takes its script from the last user text:
``fail-before`` / ``fail-midway`` report errors the way the real models do, ``slow`` paces the
frames so that a client can leave mid-stream, ``echo`` replies with what it received (to check
the wire format).  This pins down the transport — gRPC streaming, final flags, error mapping,
cancellation on disconnect — independently of the model; ``test_frontend_server.py`` runs the
real models.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import requests

from chroma_triton.serving.tritonserver import TritonServer
from openai_frontend.testing import FrontendProcess, metric_value

ASSETS = Path(__file__).resolve().parent.parent / "assets"
FRAME = 1920

CONFIG = """
name: "chroma"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "messages", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "user_audio", data_type: TYPE_STRING, dims: [ -1 ], optional: true },
  { name: "prompt_audio", data_type: TYPE_STRING, dims: [ 1 ], optional: true },
  { name: "prompt_text", data_type: TYPE_STRING, dims: [ 1 ], optional: true },
  { name: "max_tokens", data_type: TYPE_INT32, dims: [ 1 ], optional: true },
  { name: "temperature", data_type: TYPE_FP32, dims: [ 1 ], optional: true },
  { name: "top_k", data_type: TYPE_INT32, dims: [ 1 ], optional: true },
  { name: "top_p", data_type: TYPE_FP32, dims: [ 1 ], optional: true },
  { name: "seed", data_type: TYPE_INT64, dims: [ 1 ], optional: true }
]
output [
  { name: "text", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "audio", data_type: TYPE_FP32, dims: [ -1 ] },
  { name: "finish_reason", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "usage", data_type: TYPE_INT32, dims: [ 3 ] }
]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""

MODEL = '''
import json
import re
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

FRAME = 1920


def _get(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _response(text=b"", audio=None, finish=b"", usage=(0, 0, 0)):
    audio = np.zeros(0, np.float32) if audio is None else audio
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text", np.array([text], dtype=np.object_)),
        pb_utils.Tensor("audio", audio.astype(np.float32)),
        pb_utils.Tensor("finish_reason", np.array([finish], dtype=np.object_)),
        pb_utils.Tensor("usage", np.array(usage, dtype=np.int32)),
    ])


class TritonPythonModel:
    def initialize(self, args):
        self.lock = threading.Lock()
        self.active = 0
        # The families must outlive their metrics: keep them on the model.
        self.families = active, cancelled = (pb_utils.MetricFamily(name="chroma_lm_active_requests", description="requests holding a slot",
                                       kind=pb_utils.MetricFamily.GAUGE),
            pb_utils.MetricFamily(name="fake_cancelled_total", description="requests cancelled",
                                  kind=pb_utils.MetricFamily.COUNTER))
        self.active_gauge = active.Metric(labels={"model": "chroma"})
        self.cancelled_counter = cancelled.Metric(labels={"model": "chroma"})

    def execute(self, requests):
        for request in requests:
            with self.lock:
                self.active += 1
                self.active_gauge.set(self.active)
            threading.Thread(target=self._run, args=(request,), daemon=True).start()
        return None

    def _run(self, request):
        sender = request.get_response_sender()
        try:
            self._generate(request, sender)
        except Exception as exc:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {exc}")),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            with self.lock:
                self.active -= 1
                self.active_gauge.set(self.active)

    def _generate(self, request, sender):
        messages = json.loads(_get(request, "messages")[0])
        script = ""
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                script = content
            else:
                script = " ".join(p["text"] for p in content if p["type"] == "text") or script
        max_tokens = _get(request, "max_tokens")
        max_tokens = 1000 if max_tokens is None else int(max_tokens[0])
        user_audio = _get(request, "user_audio")
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if "fail-before" in script:
            error = pb_utils.TritonError("invalid request: user_audio[0]: could not decode the WAV audio")
            sender.send(pb_utils.InferenceResponse(error=error), flags=final)
            return
        if max_tokens > 2000:
            error = pb_utils.TritonError(f"invalid request: max_tokens {max_tokens} exceeds this server's limit of 2000")
            sender.send(pb_utils.InferenceResponse(error=error), flags=final)
            return
        if "echo" in script:
            def scalar(name):
                value = _get(request, name)
                return None if value is None else round(value.reshape(-1)[0].item(), 4)

            prompt_audio, prompt_text = _get(request, "prompt_audio"), _get(request, "prompt_text")
            seen = {
                "messages": messages,
                "user_audio": [len(a) for a in (user_audio if user_audio is not None else [])],
                "prompt_audio": None if prompt_audio is None else len(prompt_audio[0]),
                "prompt_text": None if prompt_text is None else prompt_text[0].decode(),
                **{name: scalar(name) for name in ("max_tokens", "temperature", "top_k", "top_p", "seed")},
            }
            sender.send(_response(json.dumps(seen).encode(), np.zeros(FRAME, np.float32)))
            sender.send(_response(finish=b"stop", usage=(7, 1, 1)))
            sender.send(flags=final)
            return
        delay = 0.1 if "slow" in script else 0.0
        frames = min(max_tokens, 6)
        text_tokens = 0
        for i in range(frames):
            if sender.is_cancelled():
                self.cancelled_counter.increment(1)
                sender.send(flags=final)
                return
            if "fail-midway" in script and i == 2:
                error = pb_utils.TritonError("internal error: the decoder ran out of memory")
                sender.send(pb_utils.InferenceResponse(error=error), flags=final)
                return
            text = f"w{i // 2} ".encode() if i % 2 == 0 else b""
            text_tokens += bool(text)
            sender.send(_response(text, np.full(FRAME, 0.01 * (i + 1), np.float32)))
            time.sleep(delay)
        reason = b"length" if frames == max_tokens else b"stop"
        sender.send(_response(finish=reason, usage=(len(script), text_tokens, frames)))
        sender.send(flags=final)
'''


@pytest.fixture(scope="module")
def stack(triton_install, tmp_path_factory):
    repo = tmp_path_factory.mktemp("fake_repo")
    (repo / "chroma" / "1").mkdir(parents=True)
    (repo / "chroma" / "config.pbtxt").write_text(textwrap.dedent(CONFIG).lstrip())
    (repo / "chroma" / "1" / "model.py").write_text(textwrap.dedent(MODEL).lstrip())
    logs = tmp_path_factory.mktemp("logs")
    with TritonServer(repo, log_file=logs / "triton.log") as triton:
        frontend = FrontendProcess(triton.grpc_url, log_file=logs / "frontend.log",
                                   args=["--allowed-local-media-path", str(ASSETS), "--request-timeout", "20"])
        with frontend.start(wait_ready=True):
            yield triton, frontend
            print(frontend.log_tail())


def _chat(frontend, text, **extra):
    body = {"model": "chroma", "messages": [{"role": "user", "content": text}], **extra}
    return requests.post(f"{frontend.url}/v1/chat/completions", json=body, timeout=30)


def _metrics(triton) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{triton.metrics_url}/metrics", timeout=5) as response:
        return response.read().decode()


def _wait_metric(triton, name, predicate, timeout=10.0) -> float | None:
    deadline = time.monotonic() + timeout
    while True:
        value = metric_value(_metrics(triton), name)
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.mark.triton
def test_wire_format(stack):
    _, frontend = stack
    wav = (ASSETS / "question_audio.wav").read_bytes()
    body = {"model": "chroma", "seed": 5, "top_k": 3, "temperature": 0.5, "max_tokens": 9,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "echo"},
                {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
                {"type": "audio", "audio": "assets/question_audio.wav"}]}]}
    resp = requests.post(f"{frontend.url}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    seen = json.loads(resp.json()["choices"][0]["message"]["content"])
    assert seen["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "echo"}, {"type": "audio", "audio_index": 0}, {"type": "audio", "audio_index": 1}]}]
    assert seen["user_audio"] == [len(wav), len(wav)]
    assert seen["prompt_audio"] == (ASSETS / "voices" / "default.wav").stat().st_size
    assert seen["prompt_text"] == (ASSETS / "voices" / "default.txt").read_text().strip()
    assert (seen["max_tokens"], seen["temperature"], seen["top_k"], seen["top_p"], seen["seed"]) == (9, 0.5, 3, 1.0, 5)
    # Defaults: no top_k and no seed are left out (the engine's default / a random seed).
    seen = json.loads(_chat(frontend, "echo").json()["choices"][0]["message"]["content"])
    assert (seen["top_k"], seen["seed"], seen["max_tokens"], seen["user_audio"]) == (None, None, 1000, [])


@pytest.mark.triton
def test_complete_and_stream_agree(stack):
    _, frontend = stack
    body = _chat(frontend, "hello", max_tokens=5).json()
    assert body["choices"][0]["message"]["content"] == "w0 w1 w2 "
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens_details"] == {"text_tokens": 3, "audio_tokens": 5}
    assert len(base64.b64decode(body["audio"])) == 44 + 2 * 5 * FRAME  # PCM16 WAV
    with requests.post(f"{frontend.url}/v1/chat/completions", stream=True, timeout=30, json={
            "model": "chroma", "stream": True, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}) as r:
        lines = [line for line in r.iter_lines() if line]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert lines[-1] == b"data: [DONE]"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "w0 w1 w2 "
    pcm = b"".join(base64.b64decode(c["choices"][0]["delta"]["audio"]["data"]) for c in chunks
                   if "data" in c["choices"][0]["delta"].get("audio", {}))
    assert len(pcm) == 2 * 5 * FRAME
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.triton
def test_engine_errors_map_to_http(stack):
    _, frontend = stack
    resp = requests.post(f"{frontend.url}/v1/chat/completions", timeout=30, json={
        "model": "chroma", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "fail-before"}, {"type": "audio", "audio": "assets/question_audio.wav"}]}]})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "messages[0].content[1].audio"
    assert err["message"] == "messages[0].content[1].audio: could not decode the WAV audio"
    err = _chat(frontend, "hi", max_tokens=2001).json()["error"]
    assert (err["param"], err["type"]) == ("max_tokens", "invalid_request_error") and "limit of 2000" in err["message"]
    resp = _chat(frontend, "fail-midway")
    assert resp.status_code == 500 and "ran out of memory" in resp.json()["error"]["message"]
    with requests.post(f"{frontend.url}/v1/chat/completions", stream=True, timeout=30, json={
            "model": "chroma", "stream": True, "messages": [{"role": "user", "content": "fail-midway"}]}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "server_error" and "ran out of memory" in error["message"]


def _raw_request(frontend, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", frontend.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.triton
@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_request(stack, stream):
    triton, frontend = stack
    before = metric_value(_metrics(triton), "fake_cancelled_total") or 0.0
    sock = _raw_request(frontend, {"model": "chroma", "stream": stream, "max_tokens": 300,
                                   "messages": [{"role": "user", "content": "slow"}]})
    if stream:
        assert b"200 OK" in sock.recv(4096)  # the stream has started
    assert _wait_metric(triton, "chroma_lm_active_requests", lambda v: v == 1) == 1
    sock.close()
    assert _wait_metric(triton, "chroma_lm_active_requests", lambda v: v == 0, timeout=5) == 0
    assert metric_value(_metrics(triton), "fake_cancelled_total") == before + 1


@pytest.mark.triton
def test_deadline_is_a_504_and_frees_the_slot(stack):
    """The bounded timeout: past --request-timeout the request is cancelled in Triton too."""
    import asyncio

    from openai_frontend.backend import ChatRequest
    from openai_frontend.errors import GatewayTimeout
    from openai_frontend.triton_backend import TritonBackend

    triton, _ = stack

    async def run():
        backend = TritonBackend(triton.grpc_url, request_timeout=0.3)
        request = ChatRequest("deadline", [{"role": "user", "content": "slow"}], max_tokens=100)
        try:
            with pytest.raises(GatewayTimeout, match="no complete reply within 0.3 s"):
                async for _ in backend.stream(request):
                    pass
            assert (await backend.ready()).ready
        finally:
            await backend.close()

    asyncio.run(run())
    assert _wait_metric(triton, "chroma_lm_active_requests", lambda v: v == 0, timeout=5) == 0


@pytest.mark.triton
def test_sdk_sees_in_band_stream_error(stack):
    """The OpenAI SDK turns the in-band error event into an APIError carrying our message."""
    import openai

    _, frontend = stack
    client = openai.OpenAI(api_key="unused", base_url=f"{frontend.url}/v1", max_retries=0)
    stream = client.chat.completions.create(model="chroma", stream=True,
                                            messages=[{"role": "user", "content": "fail-midway"}])
    received = []
    with pytest.raises(openai.APIError, match="ran out of memory"):
        for chunk in stream:
            received.append(chunk)
    assert received and received[0].choices[0].delta.role == "assistant"
    with pytest.raises(openai.BadRequestError, match="could not decode") as info:
        client.chat.completions.create(model="chroma", messages=[{"role": "user", "content": [
            {"type": "text", "text": "fail-before"},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(
                (ASSETS / "question_audio.wav").read_bytes()).decode(), "format": "wav"}}]}])
    assert info.value.param == "messages[0].content[1].input_audio.data"


@pytest.mark.triton
def test_workers_and_api_key_from_the_command_line(stack, tmp_path):
    """--workers N runs N uvicorn processes (settings travel through the environment);
    --api-key guards /v1/* in each of them."""
    triton, _ = stack
    with FrontendProcess(triton.grpc_url, args=["--workers", "2", "--api-key", "k3y"],
                         log_file=tmp_path / "frontend.log").start(wait_ready=True) as frontend:
        url = f"{frontend.url}/v1/chat/completions"
        body = {"model": "chroma", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        resp = requests.post(url, json=body, timeout=30)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        for _ in range(4):
            resp = requests.post(url, json=body, headers={"Authorization": "Bearer k3y"}, timeout=30)
            assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "w0 "
        assert requests.get(f"{frontend.url}/health", timeout=10).status_code == 200
    assert "Started parent process" in frontend.log_tail(200)


def _served_by(log_text: str) -> dict[str, int]:
    """request id -> pid of the worker that logged its completion line."""
    lines = re.finditer(r" (\d+) \[([^\]]+)\] openai_frontend: POST /v1/chat/completions -> 200", log_text)
    return {m.group(2): int(m.group(1)) for m in lines}


def _streamed_reply(url: str) -> tuple[str, str, str]:
    """(request id, audio id, transcript) of one streamed audio reply."""
    body = {"model": "chroma", "stream": True, "max_tokens": 4, "modalities": ["text", "audio"],
            "audio": {"voice": "default", "format": "pcm16"}, "messages": [{"role": "user", "content": "hello"}]}
    audio_id, transcript = None, []
    with requests.post(url, json=body, headers={"Connection": "close"}, stream=True, timeout=30) as resp:
        assert resp.status_code == 200, resp.text
        for line in resp.iter_lines():
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    audio = choice["delta"].get("audio") or {}
                    audio_id = audio.get("id", audio_id)
                    transcript.append(audio.get("transcript") or "")
        return resp.headers["X-Request-ID"], audio_id, "".join(transcript)


@pytest.mark.triton
def test_workers_share_the_transcripts_of_audio_replies(stack, tmp_path):
    """With --workers 2, a turn that refers to an earlier audio reply by id gets its transcript
    whichever worker streamed the reply (each worker process takes connections as they come).
    Pairs go 8 at a time: one after another, an idle machine's kernel may hand every connection to
    the same worker (seen in CI: 40 pairs in a row on one)."""
    from concurrent.futures import ThreadPoolExecutor

    triton, _ = stack
    log_file = tmp_path / "frontend.log"

    def pair(url: str) -> tuple[str, str]:
        reply_id, audio_id, transcript = _streamed_reply(url)
        assert audio_id and audio_id.startswith("audio_") and transcript == "w0 w1 "
        body = {"model": "chroma", "max_tokens": 2, "messages": [
            {"role": "user", "content": "hello"}, {"role": "assistant", "audio": {"id": audio_id}},
            {"role": "user", "content": "echo"}]}
        resp = requests.post(url, json=body, headers={"Connection": "close"}, timeout=30)
        assert resp.status_code == 200, resp.text
        seen = json.loads(resp.json()["choices"][0]["message"]["content"])
        assert seen["messages"][1] == {"role": "assistant", "content": transcript}
        return reply_id, resp.headers["X-Request-ID"]

    with FrontendProcess(triton.grpc_url, args=["--workers", "2"], log_file=log_file).start(wait_ready=True) as frontend, \
            ThreadPoolExecutor(8) as pool:
        url = f"{frontend.url}/v1/chat/completions"
        pairs = []
        for _ in range(25):
            pairs += list(pool.map(pair, [url] * 8))
            served = _served_by(log_file.read_text(errors="replace"))
            if any(served.get(a) != served.get(b) for a, b in pairs if a in served and b in served):
                break
        served = _served_by(log_file.read_text(errors="replace"))
        assert len(set(served.values())) == 2, f"one worker served all {len(pairs)} pairs: {served}"
        assert any(served[a] != served[b] for a, b in pairs), "no follow-up landed on the other worker"
