"""The real stack: tritonserver serving the ``chroma`` ensemble (demo checkpoint, CPU) and the
frontend as a uvicorn process, driven with the ``openai`` SDK and ``requests``.

Replies are kept short (``max_tokens`` 12 frames) so the module stays fast on a 2-core machine.
The stack is shared with the other test files (the ``stack`` fixture in ``tests/conftest.py``).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
import soundfile as sf

from openai_frontend.testing import metric_value

ASSETS = Path(__file__).resolve().parent.parent / "assets"
FRAME = 1920
MAX_TOKENS = 12
PROMPT_TEXT = (ASSETS / "ref_audio.txt").read_text().strip()

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def sdk(stack):
    return openai.OpenAI(api_key="unused", base_url=f"{stack.frontend.url}/v1", max_retries=0, timeout=120)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def seed_kwargs(**extra) -> dict:
    """The seed's schema through the SDK: an audio part by path, the voice in extra_body."""
    return dict(
        model="chroma",
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": [{"type": "audio", "audio": "assets/question_audio.wav"}]}],
        max_tokens=MAX_TOKENS,
        seed=11,
        extra_body={"prompt_text": PROMPT_TEXT, "prompt_audio": "assets/ref_audio.wav", "return_audio": True,
                    **extra.pop("extra_body", {})},
        **extra,
    )


def openai_kwargs(**extra) -> dict:
    """OpenAI's audio chat: input_audio, modalities, audio={voice, format}."""
    return dict(
        model="chroma",
        modalities=["text", "audio"],
        audio={"voice": "default", "format": "wav"},
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Please answer."},
            {"type": "input_audio", "input_audio": {"data": b64(ASSETS / "question_audio.wav"), "format": "wav"}}]}],
        max_completion_tokens=MAX_TOKENS,
        seed=11,
        **extra,
    )


def wav_samples(data: bytes) -> np.ndarray:
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == 24000 and samples.ndim == 1
    return samples


def collect_stream(stream) -> dict:
    text, transcript, pcm, finish, usage = [], [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text.append(delta.content or "")
        audio = getattr(delta, "audio", None) or (delta.model_extra or {}).get("audio")
        if audio is not None:
            audio = audio if isinstance(audio, dict) else audio.model_dump()
            transcript.append(audio.get("transcript") or "")
            if audio.get("data"):
                assert audio["sample_rate"] == 24000
                pcm.append(base64.b64decode(audio["data"]))
        finish = chunk.choices[0].finish_reason or finish
    return {"text": "".join(text), "transcript": "".join(transcript), "pcm": b"".join(pcm), "finish": finish,
            "usage": usage}


# -- the SDK, both schemas, both modes ----------------------------------------------------------------
def test_health_and_models(stack):
    assert requests.get(f"{stack.frontend.url}/health", timeout=10).json() == {"status": "healthy",
                                                                               "model_loaded": True}
    assert [m["id"] for m in requests.get(f"{stack.frontend.url}/v1/models", timeout=10).json()["data"]] == ["chroma"]


def test_sdk_seed_schema(sdk):
    response = sdk.chat.completions.create(**seed_kwargs())
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length")
    frames = response.usage.completion_tokens_details.audio_tokens
    assert 1 <= frames <= MAX_TOKENS and response.usage.prompt_tokens > 0
    samples = wav_samples(base64.b64decode(response.model_extra["audio"]))
    assert len(samples) == frames * FRAME
    assert choice.message.audio.transcript == choice.message.content
    assert choice.message.audio.data == response.model_extra["audio"]


def test_sdk_openai_schema(sdk):
    completion = sdk.chat.completions.create(**openai_kwargs())
    audio = completion.choices[0].message.audio
    frames = completion.usage.completion_tokens_details.audio_tokens
    assert len(wav_samples(base64.b64decode(audio.data))) == frames * FRAME
    assert audio.transcript == completion.choices[0].message.content
    assert audio.id.startswith("audio_") and audio.expires_at > completion.created


@pytest.mark.parametrize("schema", ["seed", "openai"])
def test_sdk_stream_matches_non_stream(sdk, schema):
    """Same seed, same reply: the streamed text equals the non-streamed transcript, the streamed
    PCM has the reported number of frames."""
    kwargs = seed_kwargs() if schema == "seed" else openai_kwargs()
    full = sdk.chat.completions.create(**kwargs)
    got = collect_stream(sdk.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert got["text"] == got["transcript"] == full.choices[0].message.content
    assert got["finish"] == full.choices[0].finish_reason
    frames = got["usage"].completion_tokens_details.audio_tokens
    assert frames == full.usage.completion_tokens_details.audio_tokens
    assert len(got["pcm"]) == 2 * frames * FRAME
    streamed = np.frombuffer(got["pcm"], "<i2").astype(np.float32) / 32767
    whole = wav_samples(base64.b64decode(full.choices[0].message.audio.data))
    assert np.abs(streamed - whole).max() < 2e-3  # same audio up to PCM16 rounding


def test_output_formats(stack):
    for fmt in ("flac", "mp3", "pcm16"):
        body = {"model": "chroma", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4,
                "audio_format": fmt}
        resp = requests.post(f"{stack.frontend.url}/v1/chat/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        data = base64.b64decode(resp.json()["audio"])
        frames = resp.json()["usage"]["completion_tokens_details"]["audio_tokens"]
        if fmt == "pcm16":
            assert len(data) == 2 * frames * FRAME
        elif fmt == "flac":
            assert len(wav_samples(data)) == frames * FRAME
        else:
            assert data[:3] == b"ID3" or data[0] == 0xFF


# -- error paths over HTTP ---------------------------------------------------------------------------
def _error(resp, status: int, param: str | None) -> str:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["request_id"]
    return err["message"]


def _post(stack, body: dict | bytes):
    kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    return requests.post(f"{stack.frontend.url}/v1/chat/completions", timeout=120, **kwargs)


def _body(**extra) -> dict:
    return {"model": "chroma", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "audio", "audio": "assets/question_audio.wav"}]}], **extra}


def _with_audio(value: str) -> dict:
    return _body(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": value, "format": "wav"}}]}])


AUDIO_PARAM = "messages[0].content[0].input_audio.data"


def test_error_paths(stack):
    msg = _error(_post(stack, _body(prompt_text=PROMPT_TEXT)), 400, "prompt_audio")
    assert "prompt_text and prompt_audio go together" in msg
    msg = _error(_post(stack, _body(prompt_audio="assets/ref_audio.wav")), 400, "prompt_text")
    assert "give both" in msg.lower()
    assert "not valid base64" in _error(_post(stack, _with_audio("%%% not base64 %%%")), 400, AUDIO_PARAM)
    text = base64.b64encode(b"just some text, not a recording" * 10).decode()
    assert "not an audio file" in _error(_post(stack, _with_audio(text)), 400, AUDIO_PARAM)
    msg = _error(_post(stack, _body(messages=[{"role": "user", "content": [
        {"type": "audio", "audio": "/etc/passwd"}]}])), 400, "messages[0].content[0].audio")
    assert "outside the folders" in msg
    msg = _error(_post(stack, _body(prompt_text="x", prompt_audio="assets/../../etc/passwd")), 400, "prompt_audio")
    assert "outside the folders" in msg
    resp = _post(stack, _body(model="gpt-4o-audio-preview"))
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    assert "less than or equal to 2" in _error(_post(stack, _body(temperature=3)), 400, "temperature")
    assert "greater than 0" in _error(_post(stack, _body(top_p=0)), 400, "top_p")
    assert "limit is 4000" in _error(_post(stack, _body(max_tokens=10**6)), 400, "max_tokens")
    resp = _post(stack, b'{"model": "chroma", "pad": "' + b"x" * (9 * 1024 * 1024) + b'"}')
    assert resp.status_code == 413 and "limit of 8388608 bytes" in resp.json()["error"]["message"]


def test_engine_side_audio_error_names_the_field(stack):
    """A FLAC cut short: its header passes the frontend's cheap check, Triton's audio_encoder
    cannot decode it ("invalid request: ..."), and the 400 names the client's field."""
    samples, rate = sf.read(ASSETS / "question_audio.wav", dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="FLAC")
    resp = _post(stack, _with_audio(base64.b64encode(buf.getvalue()[:1000]).decode()))
    message = _error(resp, 400, AUDIO_PARAM)
    assert message.startswith(AUDIO_PARAM) and "could not decode the FLAC audio" in message, message


# -- a client that leaves early frees its slot ---------------------------------------------------------
def _metric(stack, name: str) -> float | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{stack.triton.metrics_url}/metrics", timeout=5) as response:
        return metric_value(response.read().decode(), name)


def _wait_metric(stack, name: str, predicate, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while True:
        value = _metric(stack, name)
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot(stack, stream):
    """A client that leaves (mid-stream, or while waiting for the whole reply) cancels its
    request in chroma_lm: the slot is free again long before the 2000 frames would be done."""
    cancelled = _metric(stack, "chroma_lm_cancelled_total")
    assert cancelled is not None, "Triton exports no chroma_lm metrics (see tritonserver.log)"
    body = json.dumps({"model": "chroma", "stream": stream, "max_tokens": 2000,
                       "messages": [{"role": "user", "content": "Tell me a long story."}]}).encode()
    with socket.create_connection(("127.0.0.1", stack.frontend.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while stream and received.count(b"data: ") < 3:  # the stream is running: a few chunks arrived
            chunk = sock.recv(65536)
            assert chunk, received[-500:]
            received += chunk
        assert _wait_metric(stack, "chroma_lm_active_requests", lambda v: v == 1, timeout=10) == 1
    assert _wait_metric(stack, "chroma_lm_active_requests", lambda v: v == 0, timeout=10) == 0
    assert _wait_metric(stack, "chroma_lm_cancelled_total", lambda v: v == cancelled + 1, timeout=5) == cancelled + 1


def test_hang_up_cancels_through_the_control_call(stack):
    """The frontend tells chroma_lm directly (model chroma_cancel) when a client hangs up, instead
    of relying on the ensemble (Triton 2.51 does not pass the cancel to the running chroma_lm step;
    the fallback waits in codec_decoder's queue): the control call is answered and the engine logs
    the cancel. Which path the engine saw first is a race when the codec is idle, as here (the
    fallback's marker can land before the control call's: seen once in CI), so either source counts."""
    body = json.dumps({"model": "chroma", "stream": True, "max_tokens": 2000, "seed": 3,
                       "messages": [{"role": "user", "content": "Tell me a long story."}]}).encode()
    with socket.create_connection(("127.0.0.1", stack.frontend.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b"data: ") < 2:
            chunk = sock.recv(65536)
            assert chunk, received[-500:]
            received += chunk
        head = received.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        rid = next(line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("x-request-id:"))
    pattern = f"cancelled request id={rid} source="
    deadline = time.monotonic() + 30
    while pattern not in stack.triton.log_tail(lines=2000) and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = [line for line in stack.triton.log_tail(lines=2000).splitlines() if pattern in line]
    assert lines and (f"{pattern}control " in lines[-1] or f"{pattern}watch " in lines[-1]), \
        lines or stack.triton.log_tail(lines=40)
    answered = f"request {rid}: cancel call answered"
    while answered not in stack.frontend.log_tail(lines=2000) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert answered in stack.frontend.log_tail(lines=2000), stack.frontend.log_tail(lines=40)
