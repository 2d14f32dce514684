"""The OpenAI frontend in-process, against a scripted backend (no Triton): the HTTP contract.

The fake backend reads its script from the last text the user sent ("fail-before",
"fail-midway", "crash-midway", "cancelled"), so each error path is one request.  The real stack
(tritonserver + uvicorn) is exercised in ``test_frontend_server.py``.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from openai_frontend.app import create_app, validation_error
from openai_frontend.backend import SAMPLES_PER_FRAME, ChatBackend, ChatRequest, Delta, Readiness, Usage
from openai_frontend.errors import InternalError, InvalidRequest
from openai_frontend.settings import Settings
from openai_frontend.triton_backend import TritonBackend, classify_triton_error, encode_bytes, serialize_infer_request


ASSETS = Path(__file__).resolve().parent.parent / "assets"
REPLY = ["Hel", "lo the", "re."]


def _frames(n: int, value: float = 0.25) -> np.ndarray:
    return np.full(n * SAMPLES_PER_FRAME, value, np.float32)


def _last_text(request: ChatRequest) -> str:
    for message in reversed(request.messages):
        content = message["content"]
        if isinstance(content, str):
            return content
        texts = [p["text"] for p in content if p["type"] == "text"]
        if texts:
            return texts[-1]
    return ""


class FakeBackend:
    """Three deltas of text + one audio frame each, then the finish; scripted failures."""

    def __init__(self):
        self.requests: list[ChatRequest] = []
        self.readiness = Readiness(True)
        self.closed = 0

    async def stream(self, request: ChatRequest):
        self.requests.append(request)
        script = _last_text(request)
        try:
            if "fail-before" in script:
                raise InvalidRequest("user_audio[0]: could not decode the WAV audio", param="user_audio[0]")
            for i, text in enumerate(REPLY):
                if i == 1 and "fail-midway" in script:
                    raise InternalError("the model failed: boom")
                if i == 1 and "crash-midway" in script:
                    raise RuntimeError("unexpected bug")
                yield Delta(text=text, audio=_frames(1, 0.1 * (i + 1)))
            reason = "cancelled" if "cancelled" in script else ("length" if request.max_tokens <= 3 else "stop")
            yield Delta(finish_reason=reason, usage=Usage(42, len(REPLY), len(REPLY)))
        finally:
            self.closed += 1

    async def ready(self) -> Readiness:
        return self.readiness

    async def close(self) -> None:
        pass


def make_client(tmp_path=None, **overrides) -> tuple[TestClient, FakeBackend]:
    backend = FakeBackend()
    assert isinstance(backend, ChatBackend)
    settings = Settings(**{"allowed_local_media_paths": (str(ASSETS),), **overrides})
    return TestClient(create_app(settings, backend=backend)), backend


@pytest.fixture(scope="module")
def app_client():
    client, backend = make_client()
    with client:
        yield client, backend


@pytest.fixture
def client(app_client):
    return app_client[0]


@pytest.fixture
def backend(app_client):
    return app_client[1]


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def seed_body(**extra) -> dict:
    return {
        "model": "chroma",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "audio", "audio": "assets/question_audio.wav"}]},
        ],
        **extra,
    }


def openai_body(text: str = "hi", **extra) -> dict:
    return {
        "model": "chroma",
        "modalities": ["text", "audio"],
        "audio": {"voice": "default", "format": "wav"},
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": text},
            {"type": "input_audio", "input_audio": {"data": b64(ASSETS / "question_audio.wav"), "format": "wav"}}]}],
        **extra,
    }


def post(client, body, **kw):
    return client.post("/v1/chat/completions", json=body, **kw)


def assert_error(resp, status: int, param: str | None = None, *, contains: str = "", code: str | None = None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["request_id"] == resp.headers["x-request-id"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert contains.lower() in err["message"].lower(), err["message"]
    return err


def read_sse(resp) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# -- info endpoints -------------------------------------------------------------------------------
def test_root_models_voices_and_openapi(client):
    root = client.get("/").json()
    assert root["name"] == "chroma-triton" and root["version"] and "/v1/chat/completions" in root["endpoints"]
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["chroma"]
    assert client.get("/v1/models/chroma").json()["id"] == "chroma"
    assert_error(client.get("/v1/models/gpt-4o"), 404, "model", code="model_not_found")
    voices = {v["id"]: v for v in client.get("/v1/voices").json()["data"]}
    assert set(voices) == {"default", "bright", "deep"}
    assert voices["default"]["transcript"] == (ASSETS / "voices" / "default.txt").read_text().strip()
    schema = client.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    props = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"prompt_text", "prompt_audio", "return_audio", "audio_format", "modalities", "audio", "top_k"} <= set(props)


def test_health_reflects_backend(client, backend):
    assert client.get("/health").json() == {"status": "healthy", "model_loaded": True}
    backend.readiness = Readiness(False, "model 'chroma' is not ready")
    try:
        resp = client.get("/health")
        assert resp.status_code == 503
        assert resp.json()["model_loaded"] is False and "not ready" in resp.json()["detail"]
    finally:
        backend.readiness = Readiness(True)


def test_unknown_endpoint_and_method_use_openai_error_body(client):
    assert_error(client.get("/v1/nothing"), 404, code="unknown_url")
    assert_error(client.get("/v1/chat/completions"), 405)


# -- non-streaming ----------------------------------------------------------------------------------
def test_seed_schema_response(client, backend):
    resp = post(client, seed_body(max_tokens=50))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == "chroma" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["content"] == "".join(REPLY) and choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 42, "completion_tokens": 6, "total_tokens": 48,
                             "completion_tokens_details": {"text_tokens": 3, "audio_tokens": 3}}
    wav, rate = sf.read(io.BytesIO(base64.b64decode(body["audio"])))
    assert rate == 24000 and len(wav) == 3 * SAMPLES_PER_FRAME
    audio = choice["message"]["audio"]
    assert audio["data"] == body["audio"] and audio["format"] == "wav" and audio["transcript"] == "".join(REPLY)
    assert audio["id"].startswith("audio_") and audio["expires_at"] > body["created"]
    sent = backend.requests[-1]
    assert sent.max_tokens == 50 and sent.temperature == 1.0 and sent.top_p == 1.0 and sent.top_k is None
    assert sent.messages[1] == {"role": "user", "content": [{"type": "audio", "audio_index": 0}]}
    assert sent.user_audio == [(ASSETS / "question_audio.wav").read_bytes()]
    # No prompt: the named voice "default" is sent.
    assert sent.prompt_audio == (ASSETS / "voices" / "default.wav").read_bytes()
    assert sent.prompt_text == (ASSETS / "voices" / "default.txt").read_text().strip()


def test_seed_defaults_and_prompt_forms(client, backend):
    ref = ASSETS / "ref_audio.wav"
    text = (ASSETS / "ref_audio.txt").read_text().strip()
    for prompt_audio in ("assets/ref_audio.wav", b64(ref), "data:audio/wav;base64," + b64(ref), str(ref)):
        assert post(client, seed_body(prompt_text=text, prompt_audio=prompt_audio)).status_code == 200
        sent = backend.requests[-1]
        assert sent.prompt_audio == ref.read_bytes() and sent.prompt_text == text
        assert sent.max_tokens == 1000  # the seed's default


def test_base64_with_line_breaks_and_spaces(client, backend):
    """Base64 wrapped at 76 characters (MIME style) or padded with spaces decodes to the same bytes
    as the unbroken string, in both schemas (the unbroken string skips the whitespace removal)."""
    ref = ASSETS / "ref_audio.wav"
    text = (ASSETS / "ref_audio.txt").read_text().strip()
    plain = b64(ref)
    wrapped = "\n".join(plain[i:i + 76] for i in range(0, len(plain), 76))
    for value in (plain, wrapped, f"  {wrapped}\r\n", "data:audio/wav;base64," + wrapped):
        assert post(client, seed_body(prompt_text=text, prompt_audio=value)).status_code == 200
        assert backend.requests[-1].prompt_audio == ref.read_bytes()
        assert post(client, openai_body(messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": value, "format": "wav"}}]}])).status_code == 200
        assert backend.requests[-1].user_audio == [ref.read_bytes()]
    # a short clip (its base64 could be a path, so the file lookup runs first) with a space in it
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1200, dtype=np.float32), 24000, format="WAV", subtype="PCM_16")
    short = base64.b64encode(buf.getvalue()).decode()
    assert len(short) < 4096
    assert post(client, seed_body(prompt_text=text, prompt_audio=short[:100] + " " + short[100:])).status_code == 200
    assert backend.requests[-1].prompt_audio == buf.getvalue()


def test_empty_or_overpadded_base64_is_named_as_such(client):
    for value in ("", "   ", "\n\t"):
        assert_error(post(client, seed_body(prompt_text="x", prompt_audio=value)), 400, "prompt_audio", contains="is empty")
        assert_error(post(client, _input_audio(value)), 400, OPENAI_PARAM, contains="is empty")
    for value, why in (("QUJD=", "multiple of 4"), ("QUJD====", "more than two '='")):
        assert_error(post(client, seed_body(prompt_text="x", prompt_audio=value)), 400, "prompt_audio", contains=why)
        assert_error(post(client, _input_audio(value)), 400, OPENAI_PARAM, contains=why)


def test_openai_schema_and_options(client, backend):
    body = openai_body(seed=7, top_k=5, temperature=0.5, top_p=0.9, max_completion_tokens=20, max_tokens=99)
    body["audio"]["voice"] = "deep"
    resp = post(client, body)
    assert resp.status_code == 200, resp.text
    sent = backend.requests[-1]
    assert (sent.seed, sent.top_k, sent.temperature, sent.top_p, sent.max_tokens) == (7, 5, 0.5, 0.9, 20)
    assert sent.prompt_audio == (ASSETS / "voices" / "deep.wav").read_bytes()
    assert sent.messages == [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                         {"type": "audio", "audio_index": 0}]}]
    assert resp.json()["choices"][0]["message"]["audio"]["transcript"] == "".join(REPLY)


def test_explicit_prompt_wins_over_voice(client, backend):
    body = openai_body(prompt_text="words", prompt_audio="assets/voices/bright.wav")
    assert post(client, body).status_code == 200
    assert backend.requests[-1].prompt_audio == (ASSETS / "voices" / "bright.wav").read_bytes()
    assert backend.requests[-1].prompt_text == "words"


@pytest.mark.parametrize("fmt,check", [
    ("flac", lambda data: sf.read(io.BytesIO(data))[0].shape == (3 * SAMPLES_PER_FRAME,)),
    ("mp3", lambda data: data[:3] == b"ID3" or data[0] == 0xFF),
    ("pcm16", lambda data: len(data) == 2 * 3 * SAMPLES_PER_FRAME),
    ("pcm", lambda data: len(data) == 2 * 3 * SAMPLES_PER_FRAME),
])
def test_output_formats(client, fmt, check):
    for body in (seed_body(audio_format=fmt), openai_body(audio={"voice": "default", "format": fmt})):
        resp = post(client, body)
        assert resp.status_code == 200, resp.text
        data = base64.b64decode(resp.json()["audio"])
        assert check(data)
        assert resp.json()["choices"][0]["message"]["audio"]["format"] == ("pcm16" if fmt == "pcm" else fmt)


def test_text_only_replies(client):
    for body in (seed_body(return_audio=False), openai_body(modalities=["text"])):
        body = post(client, body).json()
        assert body["audio"] is None and "audio" not in body["choices"][0]["message"]
        assert body["choices"][0]["message"]["content"] == "".join(REPLY)


def test_finish_reason_comes_from_engine(client):
    assert post(client, seed_body(max_tokens=3)).json()["choices"][0]["finish_reason"] == "length"


def test_developer_role_and_multi_turn_audio_reference(client, backend):
    first = post(client, openai_body()).json()
    audio_id = first["choices"][0]["message"]["audio"]["id"]
    body = openai_body()
    body["messages"] = [{"role": "developer", "content": "Be brief."},
                        {"role": "user", "content": "hello"},
                        {"role": "assistant", "audio": {"id": audio_id}},
                        {"role": "user", "content": "and?"}]
    assert post(client, body).status_code == 200
    assert backend.requests[-1].messages[:3] == [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "hello"},
                                                 {"role": "assistant", "content": "".join(REPLY)}]
    body["messages"][2]["audio"]["id"] = "audio_unknown"
    assert_error(post(client, body), 400, "messages[2].audio.id", contains="unknown or expired")


def test_multi_turn_audio_reference_through_the_shared_store(tmp_path):
    """The store that --workers N shares: a reply's transcript is found by id; when the store
    cannot be read, the turn gets a 503 that says what to do instead."""
    client, backend = make_client(transcript_db=str(tmp_path / "transcripts.sqlite3"))
    with client:
        audio_id = post(client, openai_body()).json()["choices"][0]["message"]["audio"]["id"]
        body = openai_body()
        body["messages"] = [{"role": "user", "content": "hello"}, {"role": "assistant", "audio": {"id": audio_id}},
                            {"role": "user", "content": "and?"}]
        assert post(client, body).status_code == 200
        assert backend.requests[-1].messages[1] == {"role": "assistant", "content": "".join(REPLY)}
        client.app.state.chat.transcripts.close()
        assert_error(post(client, body), 503, contains="send the assistant's reply text as content")


# -- streaming ----------------------------------------------------------------------------------------
def test_stream_chunks(client):
    with client.stream("POST", "/v1/chat/completions",
                       json=openai_body(stream=True, stream_options={"include_usage": True})) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = read_sse(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    transcript = "".join(c["choices"][0]["delta"].get("audio", {}).get("transcript", "") for c in chunks if c["choices"])
    assert text == transcript == "".join(REPLY)
    audio_deltas = [c["choices"][0]["delta"]["audio"] for c in chunks if c["choices"] and "data" in c["choices"][0]["delta"].get("audio", {})]
    assert {a["sample_rate"] for a in audio_deltas} == {24000}
    pcm = b"".join(base64.b64decode(a["data"]) for a in audio_deltas)
    assert len(pcm) == 2 * 3 * SAMPLES_PER_FRAME
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens_details"]["audio_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])


def test_request_log_line_has_the_request_moments(client, caplog):
    """A chat request's log line says when its body was read, parsed and validated, its plan ready,
    its first audio back and (streamed) that audio's event sent, in milliseconds since it arrived, in
    that order; a request without a body, none of them."""
    import re

    with caplog.at_level("INFO", logger="openai_frontend"):
        for stream in (True, False):
            assert client.post("/v1/chat/completions", json=openai_body(stream=stream)).status_code == 200
        # streamed text only: the engine's audio comes back, none is sent
        assert client.post("/v1/chat/completions", json=openai_body(stream=True, modalities=["text"])).status_code == 200
        client.get("/v1/models")
    lines = [r.getMessage() for r in caplog.records if " -> 200 in " in r.getMessage()]
    chat = [line for line in lines if line.startswith("POST /v1/chat/completions")]
    assert len(chat) == 3, lines
    for line, sends_audio in zip(chat, (True, False, False)):
        sent = r", first audio sent (\d+) ms" if sends_audio else ""
        m = re.search(r"in (\d+) ms \(body read (\d+) ms, validated (\d+) ms, planned (\d+) ms, first audio (\d+) ms"
                      + sent + r"\)$", line)
        assert m, line
        total, *moments = map(int, m.groups())
        assert moments == sorted(moments) and moments[-1] <= total
    assert any(line.startswith("GET /v1/models -> 200 in ") and line.endswith(" ms") for line in lines), lines


@pytest.mark.parametrize("text", ['"data":""', 'say \\"data\\":\\"\\" and \\', "é ✓ \u2028 \x00", ""])
def test_sse_splices_audio_as_json_would(text):
    """sse() puts the base64 audio into the serialised body instead of letting json scan it; the line
    is the one json.dumps makes with the audio inside, whatever the text around it holds."""
    from openai_frontend.chat import sse

    data = base64.b64encode(os.urandom(3000))
    audio = {"id": "audio_x", "data": "", "format": "pcm16", "transcript": text}
    body = {"id": text or "x", "choices": [{"index": 0, "delta": {"content": text, "audio": audio}}], "model": text}
    inline = json.loads(json.dumps(body))
    inline["choices"][0]["delta"]["audio"]["data"] = data.decode()
    assert sse(body, data) == sse(inline).encode()
    assert json.loads(sse(body, data)[len("data: "):])["choices"][0]["delta"]["audio"]["data"] == data.decode()
    with pytest.raises(ValueError, match="no empty"):  # never a line without the audio it was given
        sse(inline, data)


def test_stream_without_usage_or_audio(client):
    with client.stream("POST", "/v1/chat/completions", json=seed_body(stream=True, return_audio=False)) as resp:
        events = read_sse(resp)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e and "audio" not in e["choices"][0]["delta"] for e in events[:-1])


def test_stream_error_before_output_is_an_http_error(client, backend):
    body = openai_body("fail-before", stream=True)
    err = assert_error(post(client, body), 400, "messages[0].content[1].input_audio.data")
    assert "messages[0].content[1].input_audio.data: could not decode" in err["message"]
    assert backend.closed == len(backend.requests)


@pytest.mark.parametrize("script,status,kind", [("fail-midway", 500, "server_error"),
                                                ("crash-midway", 500, "server_error"),
                                                ("cancelled", 503, "server_error")])
def test_stream_error_midway_is_in_band(client, backend, script, status, kind):
    with client.stream("POST", "/v1/chat/completions", json=openai_body(script, stream=True)) as resp:
        assert resp.status_code == 200
        events = read_sse(resp)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == kind and error["request_id"] == resp.headers["x-request-id"]
    if script == "crash-midway":
        assert "unexpected bug" not in error["message"]  # internals stay in the log
    assert backend.closed == len(backend.requests)


def test_non_stream_errors_from_engine(client):
    assert_error(post(client, openai_body("fail-midway")), 500, contains="boom")
    assert_error(post(client, openai_body("cancelled")), 503, contains="cancelled")
    assert_error(post(client, openai_body("crash-midway")), 500, contains="internal server error")


# -- request errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,param,contains", [
    ({"temperature": 5}, "temperature", "less than or equal to 2"),
    ({"temperature": "hot"}, "temperature", "valid number"),
    # strict JSON types, as OpenAI: a numeric string is not a number, "yes"/1 is not a boolean
    ({"temperature": "0.5"}, "temperature", "valid number"),
    ({"max_tokens": "10"}, "max_tokens", "valid integer"),
    ({"seed": 1.0}, "seed", "valid integer"),
    ({"stream": "yes"}, "stream", "valid boolean"),
    ({"stream": 1}, "stream", "valid boolean"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"top_k": -1}, "top_k", "greater than or equal to 0"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"max_tokens": 100000}, "max_tokens", "limit is 4000"),
    ({"max_completion_tokens": 5000}, "max_completion_tokens", "limit is 4000"),
    ({"seed": -3}, "seed", "greater than or equal to 0"),
    ({"n": 2}, "n", "only n=1 is supported"),
    ({"audio_format": "aac"}, "audio_format", "use one of"),
    ({"audio": {"voice": "default", "format": "aiff"}}, "audio.format", "use one of"),
    ({"audio": {"voice": "alloy"}}, "audio.voice", "voices: bright, deep, default"),
    ({"modalities": ["video"]}, "modalities[0]", "'text' or 'audio'"),
    ({"stop": ["\n"]}, "stop", "not supported"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"prompt_text": "only the text"}, "prompt_audio", "go together"),
    ({"prompt_audio": "assets/ref_audio.wav"}, "prompt_text", "go together"),
    ({"model": "gpt-4o-audio-preview"}, "model", "does not exist"),
])
def test_parameter_errors(client, extra, param, contains):
    status = 404 if param == "model" else 400
    assert_error(post(client, seed_body(**extra)), status, param, contains=contains)


@pytest.mark.parametrize("messages,param,contains", [
    ([], "messages", "at least 1"),
    ([{"role": "tool", "content": "x"}], "messages[0].role", "'system', 'developer', 'user' or 'assistant'"),
    ([{"role": "user", "content": 5}], "messages[0].content", "valid string; or input should be a valid list (got 5)"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]",
     "does not match any of the expected tags"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", "is required"),
    ([{"role": "user", "content": []}], "messages[0].content", "empty list"),
    ([{"role": "user"}], "messages[0].content", "is required"),
    ([{"role": "assistant", "content": [{"type": "audio", "audio": "assets/question_audio.wav"}]}],
     "messages[0].content[0]", "user messages only"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}]}],
     "messages[0].content[0].input_audio.format", "unsupported input audio format"),
])
def test_message_errors(client, messages, param, contains):
    assert_error(post(client, {"model": "chroma", "messages": messages}), 400, param, contains=contains)


def test_body_errors(client):
    assert_error(client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
                 400, None, contains="not valid JSON", code="invalid_json")
    assert_error(post(client, [1, 2]), 400, contains="JSON object")
    assert_error(post(client, {"model": "chroma"}), 400, "messages", contains="is required")


def _audio_part(value: str) -> dict:
    return {"model": "chroma", "messages": [{"role": "user", "content": [{"type": "audio", "audio": value}]}]}


def _input_audio(value: str) -> dict:
    return {"model": "chroma", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": value, "format": "wav"}}]}]}


SEED_PARAM = "messages[0].content[0].audio"
OPENAI_PARAM = "messages[0].content[0].input_audio.data"


def test_bad_base64(client):
    assert_error(post(client, _input_audio("not*base64!")), 400, OPENAI_PARAM, contains="not valid base64",
                 code="invalid_base64")
    assert_error(post(client, _input_audio("QUJD" * 10 + "Q")), 400, OPENAI_PARAM, contains="multiple of 4")
    assert_error(post(client, _audio_part("QUJD" * 2000 + "!")), 400, SEED_PARAM, contains="not valid base64")
    assert_error(post(client, _audio_part("data:audio/wav,plain")), 400, SEED_PARAM, contains="malformed data URI")
    assert_error(post(client, _audio_part("data:image/png;base64,AAAA")), 400, SEED_PARAM, contains="image/png")
    err = assert_error(post(client, _audio_part("no such thing!")), 400, SEED_PARAM, code="file_not_found")
    assert "not valid base64" in err["message"] or "neither" in err["message"]


def test_non_audio_bytes(client):
    for data in (base64.b64encode(b"hello, this is plain text, not audio at all").decode(),
                 base64.b64encode(os.urandom(4000)).decode()):
        assert_error(post(client, _input_audio(data)), 400, OPENAI_PARAM, code="invalid_audio",
                     contains="not")
    wav = (ASSETS / "question_audio.wav").read_bytes()
    assert_error(post(client, seed_body(prompt_text="x", prompt_audio=base64.b64encode(b"GIF89a" * 50).decode())),
                 400, "prompt_audio", code="invalid_audio")
    # A WAV header that promises more samples than the file holds: an upload cut short.
    assert_error(post(client, _input_audio(base64.b64encode(wav[:2000]).decode())), 400, OPENAI_PARAM,
                 code="invalid_audio", contains="truncated")


def test_truncated_ogg_and_mp3_are_detected():
    """libsndfile decodes the part of a cut OGG/MP3 that is there; the container framing shows the cut."""
    from chroma_triton.audio_io import encode_audio
    from openai_frontend.media import mp3_truncation, ogg_truncation

    x = (0.3 * np.sin(np.arange(24000 * 2) / 10)).astype(np.float32)
    for fmt, check in (("ogg", ogg_truncation), ("opus", ogg_truncation), ("mp3", mp3_truncation)):
        for channels in (1, 2):
            data = encode_audio(x if channels == 1 else np.stack([x, x], 1), 24000, fmt)
            assert check(data) is None, fmt
            for share in (0.3, 0.5, 0.9, 0.99):
                assert "truncated" in (check(data[: int(len(data) * share)]) or ""), (fmt, channels, share)
    # Cut exactly at a frame boundary: the Xing/Info header's frame count still tells.
    from openai_frontend.media import _mp3_frame

    mp3 = encode_audio(x, 24000, "mp3")
    starts, offset = [], 0
    while offset < len(mp3):
        starts.append(offset)
        offset += _mp3_frame(mp3, offset)[0]
    assert "promises" in mp3_truncation(mp3[: starts[len(starts) // 2]])
    assert ogg_truncation(b"RIFF....WAVE") is None and mp3_truncation(b"RIFF....WAVE") is None


def test_local_paths_are_confined(client, tmp_path):
    secret = tmp_path / "secret.wav"
    secret.write_bytes((ASSETS / "question_audio.wav").read_bytes())
    link = ASSETS.parent / "tests" / "_escape_link.wav"  # not inside assets/ either
    for value in (str(secret), "/etc/passwd", "assets/../pyproject.toml", "../../../../etc/passwd",
                  "assets/voices/../../tests/conftest.py", "~/.bashrc", "file:///etc/passwd"):
        assert_error(post(client, _audio_part(value)), 400, SEED_PARAM, contains="outside the folders",
                     code="local_path_not_allowed")
    assert_error(post(client, seed_body(prompt_text="x", prompt_audio="/etc/hostname")), 400, "prompt_audio",
                 code="local_path_not_allowed")
    assert_error(post(client, _audio_part("assets/missing.wav")), 400, SEED_PARAM, code="file_not_found")
    assert not link.exists()
    # A symlink inside the allowed folder that points outside it is refused too.
    inner = ASSETS / "_test_link.wav"
    try:
        inner.symlink_to(secret)
        assert_error(post(client, _audio_part("assets/_test_link.wav")), 400, SEED_PARAM,
                     code="local_path_not_allowed")
    finally:
        inner.unlink(missing_ok=True)
    # Remote URLs are never fetched.
    assert_error(post(client, _audio_part("https://example.com/a.wav")), 400, SEED_PARAM, code="unsupported_url")


def test_paths_still_resolve_after_the_working_directory_is_removed(tmp_path, monkeypatch):
    """A redeploy may remove the folder the server was started in: path requests kept working
    (they were answered 500, FileNotFoundError, when the frontend asked for the folder per request)."""
    start = tmp_path / "release-1"
    start.mkdir()
    monkeypatch.chdir(start)
    client, _ = make_client()
    start.rmdir()
    with client:
        assert post(client, seed_body()).status_code == 200
        assert_error(post(client, _audio_part("assets/missing.wav")), 400, SEED_PARAM, code="file_not_found")


def test_paths_disabled_without_allowed_folder():
    client, _ = make_client(allowed_local_media_paths=())
    with client:
        err = assert_error(post(client, seed_body()), 400, "messages[1].content[0].audio")
        assert "--allowed-local-media-path" in err["message"]
        assert post(client, openai_body()).status_code == 200


def test_size_and_duration_limits():
    client, _ = make_client(max_body_bytes=400_000, max_audio_seconds=2.0, max_prompt_audio_seconds=3.0,
                            voices_dir=None)
    with client:
        big = {"model": "chroma", "messages": [{"role": "user", "content": "x" * 500_000}]}
        assert_error(post(client, big), 413, code="request_too_large", contains="limit of 400000 bytes")
        assert_error(post(client, seed_body()), 400, "messages[1].content[0].audio", code="audio_too_long",
                     contains="limit is 2 s")
        assert_error(post(client, {**seed_body(), "messages": [{"role": "user", "content": "hi"}],
                                   "prompt_text": "t", "prompt_audio": "assets/ref_audio.wav"}),
                     400, "prompt_audio", code="audio_too_long")


def test_api_key():
    client, _ = make_client(api_key="s3cret")
    with client:
        assert_error(client.get("/v1/models"), 401, code="invalid_api_key", contains="missing API key")
        assert_error(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, contains="incorrect")
        assert_error(post(client, seed_body()), 401)
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200  # probes need no key


# -- units: error classification, wire format, validation messages ---------------------------------------
def test_classify_triton_errors():
    backend = TritonBackend("localhost:1")
    err = classify_triton_error("in ensemble 'chroma', invalid request: max_tokens 5000 exceeds the limit", backend)
    assert (err.status_code, err.param, err.message) == (400, "max_tokens", "max_tokens 5000 exceeds the limit")
    err = classify_triton_error("invalid request: user_audio[1]: data is not a recognised audio file", backend)
    assert (err.status_code, err.param) == (400, "user_audio[1]")
    assert classify_triton_error("internal error: CUDA out of memory", backend).status_code == 500
    assert classify_triton_error("Request for unknown model: 'chroma' is not found", backend).status_code == 503
    assert classify_triton_error("something odd", backend).status_code == 500
    busy = "in ensemble 'chroma', internal error: server busy: 1024 requests already waiting; retry later"
    assert classify_triton_error(busy, backend).status_code == 429


def test_bytes_wire_format():
    assert encode_bytes([b"ab", b""]) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"


@pytest.mark.parametrize("with_options", [False, True])
def test_the_serialized_request_is_the_message_protobuf_would_send(with_options):
    """The frontend serializes its requests itself (one copy of the audio): parsed back, each is
    the message built field by field with protobuf, with entries whose lengths take 1, 2 and 3
    bytes of varint, and an empty clip."""
    from tritonclient.grpc import service_pb2

    clips = [b"", b"x" * 1000, bytes(range(256)) * 64, b"\xff" * 20_000]
    request = ChatRequest(request_id="req-1", messages=[{"role": "user", "content": [{"type": "audio", "audio_index": 0}]}],
                          user_audio=clips if with_options else [clips[1]],
                          prompt_audio=b"RIFF" * 40_000 if with_options else b"", prompt_text="hé" if with_options else "",
                          max_tokens=7, temperature=0.5, top_k=3 if with_options else None, top_p=0.9,
                          seed=-5 if with_options else None)
    wire = TritonBackend("localhost:1")._infer_request(request)

    expected = service_pb2.ModelInferRequest(model_name="chroma", id="req-1")
    expected.parameters["triton_enable_empty_final_response"].bool_param = True

    def add(name, datatype, shape, raw):
        tensor = expected.inputs.add()
        tensor.name, tensor.datatype = name, datatype
        tensor.shape.extend(shape)
        expected.raw_input_contents.append(raw)

    add("messages", "BYTES", [1], encode_bytes([json.dumps(request.messages).encode()]))
    add("user_audio", "BYTES", [len(request.user_audio)], encode_bytes(request.user_audio))
    if with_options:
        add("prompt_audio", "BYTES", [1], encode_bytes([request.prompt_audio]))
        add("prompt_text", "BYTES", [1], encode_bytes(["hé".encode()]))
    add("max_tokens", "INT32", [1], np.array([7], "<i4").tobytes())
    add("temperature", "FP32", [1], np.array([0.5], "<f4").tobytes())
    add("top_p", "FP32", [1], np.array([0.9], "<f4").tobytes())
    if with_options:
        add("top_k", "INT32", [1], np.array([3], "<i4").tobytes())
        add("seed", "INT64", [1], np.array([-5], "<i8").tobytes())
    assert service_pb2.ModelInferRequest.FromString(wire) == expected
    assert serialize_infer_request(expected, []) == expected.SerializeToString()
    # naming the conversation (conversation affinity) adds sequence_id and sequence_start
    named = service_pb2.ModelInferRequest.FromString(TritonBackend("localhost:1")._infer_request(request, "conv-1", False))
    assert named.parameters["sequence_id"].string_param == "conv-1"
    assert named.parameters["sequence_start"].WhichOneof("parameter_choice") == "bool_param"
    assert not named.parameters["sequence_start"].bool_param
    del named.parameters["sequence_id"], named.parameters["sequence_start"]
    assert named == expected


def test_unreachable_triton_is_503():
    settings = Settings(triton_grpc_url="127.0.0.1:9", request_timeout=5.0, health_timeout=1.0)
    with TestClient(create_app(settings)) as client:
        resp = client.get("/health")
        assert resp.status_code == 503 and resp.json()["model_loaded"] is False
        assert "unreachable" in resp.json()["detail"]
        assert_error(post(client, {"model": "chroma", "messages": [{"role": "user", "content": "hi"}]}), 503,
                     contains="unreachable")


def test_validation_error_without_errors_is_still_400():
    from fastapi.exceptions import RequestValidationError

    assert validation_error(RequestValidationError([])).status_code == 400


def test_tune_malloc_leaves_glibc_settings_given_in_the_environment(monkeypatch):
    from openai_frontend.app import tune_malloc

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        with monkeypatch.context() as m:
            m.setenv(name, "1048576")
            assert tune_malloc() is False


@pytest.mark.parametrize("body", [
    b'{"a": 0.1, "b": 1e400, "c": -0.0, "d": 123456789012345678901234567890, "e": 1.7976931348623157e308}',
    b'{"a": 1, "a": 2, "nested": {"x": [1, 2.5, null, true, false, "s"]}}',
    b'{"s": "\\u00e9\\ud83d\\ude00 \\" \\\\ \\/ \\n", "raw": "h\xc3\xa9"}',
    b'{"lone": "\\ud800"}',  # a lone surrogate: json.loads keeps it
    b'{"n": NaN, "i": -Infinity}',
    b'  [1, 2]  ',
])
def test_fast_json_parses_bodies_as_json_loads_does(body):
    import asyncio as aio

    from openai_frontend.routes import FastJSONRequest

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    request = FastJSONRequest({"type": "http", "method": "POST", "headers": []}, receive)
    parsed = aio.run(request.json())
    assert repr(parsed) == repr(json.loads(body))



def test_http_parser_flag():
    from openai_frontend.__main__ import parse_args

    # h11 by default, whatever is installed: httptools takes headers of any size
    assert parse_args([])[0].http == "h11"
    assert parse_args(["--http", "httptools"])[0].http == "httptools"
    with pytest.raises(SystemExit):
        parse_args(["--http", "auto"])


def test_a_request_racing_the_backends_close_gets_a_503():
    """close() (at shutdown) while a request waits for the channel: a clear 503, not a TypeError."""
    import asyncio as aio

    from openai_frontend.errors import ServiceUnavailable

    async def scenario():
        backend = TritonBackend("127.0.0.1:9")
        backend._get_stub()
        real_ready = backend._channel_ready

        async def ready_then_closed():
            await backend.close()
            await real_ready()

        backend._channel_ready = ready_then_closed
        stream = backend.stream(ChatRequest(request_id="r", messages=[{"role": "user", "content": "hi"}]))
        with pytest.raises(ServiceUnavailable, match="shutting down"):
            await anext(stream)

    aio.run(scenario())


class _EndlessBackend:
    """Audio events as fast as the client takes them, until the stream is closed."""

    def __init__(self):
        import threading

        self.closed = threading.Event()

    async def stream(self, request: ChatRequest):
        import asyncio as aio

        try:
            while True:
                yield Delta(text="", audio=_frames(10, 0.1))
                await aio.sleep(0.002)
        finally:
            self.closed.set()

    async def ready(self) -> Readiness:
        return Readiness(True)

    async def close(self) -> None:
        pass


def test_a_client_that_stops_reading_is_let_go():
    """A real uvicorn server and a client that never reads its SSE stream: once an event has
    waited slow_client_timeout for the full socket, the reply is abandoned (the backend stream
    closed, which cancels the Triton request) and the connection is closed."""
    import socket
    import threading
    import time

    import uvicorn

    from chroma_triton.serving.tritonserver import free_port

    backend = _EndlessBackend()
    app = create_app(Settings(slow_client_timeout=1.0), backend=backend)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, http="h11"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        body = json.dumps({"model": "chroma", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
        started = time.monotonic()
        assert backend.closed.wait(30), "the reply of a client that reads nothing was never abandoned"
        waited = time.monotonic() - started
        # what the server had written before giving up is still readable, then the connection ends
        client.settimeout(10)
        received = 0
        while chunk := client.recv(1 << 20):
            received += len(chunk)
        client.close()
        assert received > 0 and waited >= 1.0
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_frontend_starts_a_conversation_none_of_its_workers_named_lately(monkeypatch, tmp_path):
    """sequence_start goes with a conversation the store (shared by the workers) does not hold, or
    holds from longer ago than 90 % of the idle timeout; each request renews it. Without a store:
    a request without an assistant turn starts."""
    import openai_frontend.triton_backend as tb
    from openai_frontend.transcripts import SharedTranscripts

    clock = [1000.0]
    monkeypatch.setattr(tb.time, "time", lambda: clock[0])
    first = [{"role": "user", "content": "hi"}]
    later = first + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]
    shared = str(tmp_path / "conversations.sqlite3")
    workers = [TritonBackend("localhost:1", conversations=SharedTranscripts(shared), conversation_idle_s=100.0)
               for _ in range(2)]
    assert workers[0]._starts("conv-a", later)  # named nowhere yet, whatever its history
    assert not workers[1]._starts("conv-a", later)  # the other worker named it
    clock[0] += 89.0
    assert not workers[0]._starts("conv-a", later)  # renewed at each request
    clock[0] += 91.0
    assert workers[1]._starts("conv-a", first)  # 91 s > 90 % of 100 s since the last
    bare = TritonBackend("localhost:1")
    assert bare._starts("conv-b", first) and not bare._starts("conv-b", later)
    for bad in (0.5, float("inf"), -3):
        with pytest.raises(ValueError, match="conversation_idle_s"):
            Settings(conversation_idle_s=bad)
    assert Settings().conversation_idle_s == 0  # off: requests name no conversation
