"""The bad-input catalogue and access control, against the real stack: tritonserver (demo
checkpoint) + a frontend process with its own limits, an allowed media folder holding a symlink
that leads out of it, an API key and a CORS origin.

Every bad request must get a *clear* 4xx: OpenAI's error body with the right status, ``type``,
``code`` and ``param``, a message that says what to fix, and the request id that is also in the
``X-Request-ID`` header and on the frontend's log lines of that request. Listed with the figures
in ``docs/reliability.md``.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf

from openai_frontend.testing import FrontendProcess

pytestmark = pytest.mark.triton

ASSETS = Path(__file__).resolve().parent.parent / "assets"
API_KEY = "test-key-7"
ORIGIN = "https://app.example"
MAX_AUDIO_S = 10
MAX_PROMPT_S = 8
MAX_BODY = 2 * 1024 * 1024
WAV = (ASSETS / "question_audio.wav").read_bytes()


def _encoded(fmt: str) -> bytes:
    from chroma_triton.audio_io import decode_audio, encode_audio

    return encode_audio(decode_audio(WAV, 16000)[:16000 * 3], 16000, fmt)


MP3, OGG = _encoded("mp3"), _encoded("ogg")
AUDIO_PARAM = "messages[0].content[0].input_audio.data"
SEED_PARAM = "messages[0].content[0].audio"


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """An allowed folder: a real clip, and a symlink inside it that points outside it."""
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "question.wav").write_bytes(WAV)
    secret = root / "secret.wav"
    secret.write_bytes(WAV)
    (allowed / "escape.wav").symlink_to(secret)
    (allowed / "etc").symlink_to("/etc", target_is_directory=True)
    return allowed


@pytest.fixture(scope="module")
def frontend(stack, media, tmp_path_factory):
    log = tmp_path_factory.mktemp("catalogue") / "frontend.log"
    args = ["--allowed-local-media-path", str(media), "--max-audio-seconds", str(MAX_AUDIO_S),
            "--max-prompt-audio-seconds", str(MAX_PROMPT_S), "--max-body-bytes", str(MAX_BODY),
            "--cors-allow-origin", ORIGIN, "--request-timeout", "120"]
    process = FrontendProcess(stack.triton.grpc_url, args=args, log_file=log, env={"CHROMA_API_KEY": API_KEY})
    with process.start(wait_ready=True):
        yield process


def post(frontend, body=None, *, raw: bytes | None = None, key: str | None = API_KEY, **kwargs):
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else json.dumps(body).encode()
    session = requests.Session()
    session.trust_env = False
    return session.post(f"{frontend.url}/v1/chat/completions", data=data, headers=headers, timeout=120, **kwargs)


def chat(**extra) -> dict:
    return {"model": "chroma", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello?"}], **extra}


def with_audio(data: str, fmt: str = "wav") -> dict:
    return chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]}])


def with_path(path: str) -> dict:
    return chat(messages=[{"role": "user", "content": [{"type": "audio", "audio": path}]}])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def silence_wav(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * rate), np.float32), rate, format="WAV", subtype="PCM_U8")
    return buf.getvalue()


def assert_clear(resp, status: int, *, code: str | None = None, param: str | None = None, says: str = "") -> dict:
    """A clear client error: status, OpenAI's body, our code/param, a message that says what is
    wrong, and the request id of the header."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error", err
    assert err["code"] == code, err
    assert err["param"] == param, err
    assert err["request_id"] and err["request_id"] == resp.headers["x-request-id"], err
    assert says.lower() in err["message"].lower(), err["message"]
    assert len(err["message"]) >= 20 and "Traceback" not in err["message"], err["message"]
    return err


B64_WAV = b64(WAV)
TOO_MANY = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 129  # 258 > 256

# (id, body or raw bytes, status, code, param, message says)
CATALOGUE = [
    ("empty body", b"", 400, "invalid_json", None, "body is empty"),
    ("not JSON", b"{'model': 'chroma'", 400, "invalid_json", None, "not valid JSON"),
    ("JSON but not an object", b'["chroma"]', 400, "invalid_json", None, "must be a JSON object"),
    ("model is a number", {"model": 7, "messages": [{"role": "user", "content": "x"}]}, 400, None, "model",
     "valid string"),
    ("messages is a string", {"model": "chroma", "messages": "hello"}, 400, None, "messages", "valid list"),
    ("max_tokens is text", chat(max_tokens="ten"), 400, None, "max_tokens", "valid integer"),
    ("temperature is an object", chat(temperature={"value": 1}), 400, None, "temperature", "valid number"),
    ("stream is a list", chat(stream=[True]), 400, None, "stream", "valid boolean"),
    ("unknown role", chat(messages=[{"role": "robot", "content": "x"}]), 400, None, "messages[0].role", "robot"),
    ("a lone surrogate in the text", chat(messages=[{"role": "user", "content": "h\ud800i"}]), 400, "invalid_text",
     "messages[0].content", "lone surrogate"),
    ("a lone surrogate in a text part", chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]),
     400, "invalid_text", "messages[0].content[0].text", "lone surrogate"),
    ("zero-length audio (empty base64)", with_audio(""), 400, "invalid_audio", AUDIO_PARAM, "is empty"),
    ("zero-length audio (WAV without samples)", with_audio(b64(silence_wav(0))), 400, "invalid_audio", AUDIO_PARAM,
     "no samples"),
    ("non-audio bytes", with_audio(b64(b"%PDF-1.7\n" + bytes(range(256)) * 8)), 400, "invalid_audio", AUDIO_PARAM,
     "not"),
    ("plain text posing as audio", with_audio(b64(b"just some words, not a recording " * 10)), 400, "invalid_audio",
     AUDIO_PARAM, "not an audio file"),
    ("unsupported input format", with_audio(B64_WAV, fmt="aac"), 400, None,
     "messages[0].content[0].input_audio.format", "unsupported input audio format"),
    ("unsupported output format (OpenAI)", chat(audio={"voice": "default", "format": "aiff"}), 400, None,
     "audio.format", "unsupported audio format"),
    ("unsupported output format (seed)", chat(audio_format="m4a"), 400, None, "audio_format", "unsupported audio format"),
    ("truncated WAV (data cut)", with_audio(b64(WAV[: len(WAV) // 2])), 400, "invalid_audio", AUDIO_PARAM, "truncated"),
    ("truncated WAV (header cut)", with_audio(b64(WAV[:30])), 400, "invalid_audio", AUDIO_PARAM, "truncated or corrupt"),
    ("truncated MP3 (last frame cut)", with_audio(b64(MP3[: len(MP3) // 2 + 7]), fmt="mp3"), 400, "invalid_audio",
     AUDIO_PARAM, "MP3 file is truncated"),
    ("truncated OGG (last page cut)", with_audio(b64(OGG[: len(OGG) * 2 // 3]), fmt="ogg"), 400, "invalid_audio",
     AUDIO_PARAM, "OGG file is truncated"),
    ("base64 with junk", with_audio(B64_WAV[:200] + "$%^&" + B64_WAV[200:]), 400, "invalid_base64", AUDIO_PARAM,
     "not a base64 character"),
    ("base64 cut short", with_audio(B64_WAV[:-3]), 400, "invalid_base64", AUDIO_PARAM, "not a multiple of 4"),
    ("malformed data URI", with_audio("data:audio/wav," + B64_WAV), 400, "invalid_base64", AUDIO_PARAM, "data URI"),
    ("user audio longer than the limit", with_audio(b64(silence_wav(MAX_AUDIO_S + 2))), 400, "audio_too_long",
     AUDIO_PARAM, f"limit is {MAX_AUDIO_S} s"),
    ("voice clip longer than the limit", chat(prompt_text="hi", prompt_audio=b64(silence_wav(MAX_PROMPT_S + 1))), 400,
     "audio_too_long", "prompt_audio", f"limit is {MAX_PROMPT_S} s"),
    ("body over the limit", b'{"model": "chroma", "pad": "' + b"x" * (MAX_BODY + 10) + b'"}', 413, "request_too_large",
     None, f"limit of {MAX_BODY} bytes"),
    ("path traversal (../)", with_path("allowed/../secret.wav"), 400, "local_path_not_allowed", SEED_PARAM,
     "outside the folders"),
    ("path traversal (deep ../)", with_path("../../../../../../etc/passwd"), 400, "local_path_not_allowed", SEED_PARAM,
     "outside the folders"),
    ("absolute path", with_path("/etc/passwd"), 400, "local_path_not_allowed", SEED_PARAM, "outside the folders"),
    ("file:// URL", with_path("file:///etc/hostname"), 400, "local_path_not_allowed", SEED_PARAM, "outside the folders"),
    ("home directory", with_path("~/.bashrc"), 400, "local_path_not_allowed", SEED_PARAM, "outside the folders"),
    ("symlink out of the folder", with_path("allowed/escape.wav"), 400, "local_path_not_allowed", SEED_PARAM,
     "outside the folders"),
    ("symlinked directory out of the folder", with_path("allowed/etc/passwd"), 400, "local_path_not_allowed",
     SEED_PARAM, "outside the folders"),
    ("path as voice clip", chat(prompt_text="hi", prompt_audio="/etc/shadow"), 400, "local_path_not_allowed",
     "prompt_audio", "outside the folders"),
    ("remote URL", with_path("http://169.254.169.254/latest/meta-data"), 400, "unsupported_url", SEED_PARAM,
     "not fetched"),
    ("unknown model", chat(model="gpt-4o-audio-preview"), 404, "model_not_found", "model", "does not exist"),
    ("max_tokens 0", chat(max_tokens=0), 400, None, "max_tokens", "greater than or equal to 1"),
    ("max_tokens negative", chat(max_tokens=-5), 400, None, "max_tokens", "greater than or equal to 1"),
    ("max_completion_tokens 0", chat(max_completion_tokens=0), 400, None, "max_completion_tokens",
     "greater than or equal to 1"),
    ("max_tokens over the server's limit", chat(max_tokens=4001), 400, None, "max_tokens", "limit is 4000"),
    ("max_tokens huge", chat(max_tokens=10**30), 400, None, "max_tokens", "less than or equal"),
    ("temperature < 0", chat(temperature=-0.01), 400, None, "temperature", "greater than or equal to 0"),
    ("temperature > 2", chat(temperature=2.5), 400, None, "temperature", "less than or equal to 2"),
    ("temperature NaN", b'{"model": "chroma", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
     400, None, "temperature", "temperature"),
    ("top_p 0", chat(top_p=0), 400, None, "top_p", "greater than 0"),
    ("top_p negative", chat(top_p=-0.5), 400, None, "top_p", "greater than 0"),
    ("top_p > 1", chat(top_p=1.01), 400, None, "top_p", "less than or equal to 1"),
    ("top_k negative", chat(top_k=-1), 400, None, "top_k", "greater than or equal to 0"),
    ("seed negative", chat(seed=-1), 400, None, "seed", "greater than or equal to 0"),
    ("too many messages", chat(messages=TOO_MANY), 400, None, "messages", "at most 256"),
    ("no messages", chat(messages=[]), 400, None, "messages", "at least 1"),
    ("prompt_text without prompt_audio", chat(prompt_text="hi"), 400, "prompt_incomplete", "prompt_audio",
     "go together"),
    ("unknown voice", chat(audio={"voice": "nobody"}), 400, "unknown_voice", "audio.voice", "unknown voice"),
    ("n > 1", chat(n=2), 400, None, "n", "only n=1"),
    ("audio in an assistant turn", chat(messages=[{"role": "assistant", "content": [
        {"type": "input_audio", "input_audio": {"data": B64_WAV}}]}, {"role": "user", "content": "x"}]), 400, None,
     "messages[0].content[0]", "user messages only"),
]


@pytest.mark.parametrize("body,status,code,param,says", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_a_clear_4xx(frontend, body, status, code, param, says):
    resp = post(frontend, raw=body) if isinstance(body, bytes) else post(frontend, body)
    assert_clear(resp, status, code=code, param=param, says=says)


def test_the_same_requests_done_right_are_served(frontend):
    """The catalogue's good twins: the allowed file by path, the clip inline, a voice clip."""
    for body in (with_path("allowed/question.wav"), with_audio(B64_WAV),
                 chat(prompt_text="Hello there.", prompt_audio=b64((ASSETS / "ref_audio.wav").read_bytes()))):
        resp = post(frontend, body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens_details"]["audio_tokens"] >= 1


def test_engine_side_rejection_is_a_clear_4xx(frontend):
    """A clip whose header passes the frontend but that Triton's audio_encoder cannot decode."""
    samples, rate = sf.read(ASSETS / "question_audio.wav", dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="FLAC")
    assert_clear(post(frontend, with_audio(b64(buf.getvalue()[:1000]))), 400, param=AUDIO_PARAM,
                 says="could not decode the FLAC audio")


# -- access -----------------------------------------------------------------------------------------
def test_api_key(frontend):
    session = requests.Session()
    session.trust_env = False
    for key, says in ((None, "missing API key"), ("wrong", "incorrect API key")):
        resp = post(frontend, chat(), key=key)
        assert resp.status_code == 401, resp.text
        assert resp.headers["www-authenticate"] == "Bearer"
        err = resp.json()["error"]
        assert err["code"] == "invalid_api_key" and says in err["message"]
        assert err["request_id"] == resp.headers["x-request-id"]
    assert session.get(f"{frontend.url}/v1/models", timeout=10).status_code == 401
    assert session.get(f"{frontend.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"},
                       timeout=10).status_code == 200
    assert session.get(f"{frontend.url}/health", timeout=10).status_code == 200  # probes need no key


def test_cors(frontend):
    session = requests.Session()
    session.trust_env = False
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    resp = session.options(f"{frontend.url}/v1/chat/completions", headers=preflight, timeout=10)
    assert resp.status_code == 200  # a preflight needs no API key (browsers send none)
    assert resp.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in resp.headers["access-control-allow-methods"]
    assert "authorization" in resp.headers["access-control-allow-headers"].lower()
    other = session.options(f"{frontend.url}/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"},
                            timeout=10)
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    # A real cross-origin call, refused for its key: the browser page can read the error and its id.
    resp = post(frontend, chat(), key=None, headers={"Origin": ORIGIN})
    assert resp.status_code == 401
    assert resp.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in resp.headers["access-control-expose-headers"].lower()


def test_request_id_on_every_log_line_and_error(frontend):
    """Errors carry the id of their request (body and header), and every line the frontend
    logged while serving it carries the same id."""
    ids = []
    for body in (chat(temperature=-1), with_audio("***"), chat(max_tokens=3)):
        resp = post(frontend, body)
        rid = resp.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
        if resp.status_code != 200:
            assert resp.json()["error"]["request_id"] == rid
        ids.append(rid)
    assert len(set(ids)) == len(ids)
    # A request's closing line is logged after its response went out (with two workers, by another
    # process than the one that answered the next request): wait for it instead of racing it.
    deadline = time.monotonic() + 10
    while not all(rid in frontend.log_tail(5000) for rid in ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = frontend.log_tail(5000)
    for rid in ids:
        lines = [line for line in log.splitlines() if rid in line]
        assert lines, f"no log line for request {rid}"
        assert all(f"[{rid}]" in line for line in lines), lines
    # Lines logged while serving a request never lack its id: the only id-less lines are the
    # server's own (start-up), marked "[-]".
    for line in log.splitlines():
        if re.match(r"\d{4}-\d\d-\d\d ", line) and ("/v1/" in line or "request" in line.lower()):
            assert re.search(r"\[[0-9a-f]{32}\]", line) or "[-]" in line, line
