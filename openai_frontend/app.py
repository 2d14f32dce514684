"""The FastAPI application: app factory, the request-context middleware and the one error handler.

Layers, outside in:

* :class:`RequestContext` (pure ASGI): gives each request an id (``X-Request-ID`` header, log
  lines, error bodies), checks the API key on ``/v1/*``, enforces the body-size limit (413), and
  turns any exception that escaped the app into an error response;
* FastAPI's exception handlers: all registered with the same :func:`handle_error`;
* the routers (:mod:`openai_frontend.routes`): validate -> backend -> respond.
"""

from __future__ import annotations

import contextlib
import contextvars
import hmac
import json
import logging
import sys
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .backend import ChatBackend
from .chat import ChatService
from .errors import (
    APIError,
    ClientDisconnected,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    error_body,
    log_error,
    to_api_error,
)
from .media import MediaResolver
from .request_marks import close_marks, describe, mark, open_marks
from .settings import Settings
from .transcripts import MemoryTranscripts, SharedTranscripts
from .voices import VoiceLibrary

log = logging.getLogger("openai_frontend")

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_BODY_METHODS = {"POST", "PUT", "PATCH"}
#: An oversized body is still read (and dropped) up to this multiple of the limit, so that the
#: client, still uploading, gets the 413 instead of a reset connection.
_DRAIN_FACTOR = 4


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every log record (``%(request_id)s``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d [%(request_id)s] %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Log to stderr with the request id on every line (uvicorn's loggers included)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = name != "uvicorn.access"  # RequestContext logs each request


#: glibc malloc settings for the frontend process (see :func:`tune_malloc`).
MMAP_THRESHOLD = 64 * 1024
TRIM_THRESHOLD = 128 * 1024


def tune_malloc() -> bool:
    """Keep the frontend's resident memory flat under sustained streaming (glibc only).

    Every audio chunk passes through short-lived buffers of tens to hundreds of KiB (PCM, base64,
    the JSON event). glibc raises its mmap threshold as such blocks are freed, after which they
    come from the heap, fragment it, and VmRSS crept up by ~10 MiB per 200 streams in the soak
    (docs/reliability.md) while Python's own traced memory stayed flat. A fixed threshold (which
    also stops the dynamic adjustment) returns large blocks to the system when freed: measured
    growth fell to 1-3 MiB per 200 streams.

    The price is CPU: each such block is mapped afresh and its pages faulted in. An audio event
    cost 76-157 us instead of 51 us of the event loop's time until its copies were cut (47-49 us
    now, either way); a request with inline audio still pays about 2.2 ms instead of 1.2 ms
    (scripts/bench_frontend.py --malloc frontend|glibc, docs/benchmarks.md session 13). A 1 MiB
    threshold (``MALLOC_MMAP_THRESHOLD_=1048576``) saves most of that, with VmRSS moving between
    150 and 245 MiB from round to round of the 200-stream soak instead of 145-160 MiB. Operators
    who prefer that trade set glibc's own ``MALLOC_MMAP_THRESHOLD_`` (or ``MALLOC_TRIM_THRESHOLD_``):
    this then leaves glibc's settings alone. Returns whether the settings were applied.
    """
    import ctypes
    import ctypes.util
    import os

    if any(os.environ.get(name) for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False  # glibc read them at start-up
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


def request_id_of(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or REQUEST_ID.get()


def error_response(err: APIError, request_id: str) -> JSONResponse:
    headers = dict(err.headers)
    if isinstance(err, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(err, request_id), status_code=err.status_code, headers=headers or None)


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The one exception handler: classify, log once, answer in OpenAI's error body."""
    err = _classify(exc)
    log_error(err, exc, f"{request.method} {request.url.path}")
    return error_response(err, request_id_of(request))


def _classify(exc: Exception) -> APIError:
    if isinstance(exc, RequestValidationError):
        return validation_error(exc)
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            return NotFound("no such endpoint; see GET / for the list", code="unknown_url")
        if exc.status_code == 405:
            err = MethodNotAllowed(f"method not allowed on this endpoint ({exc.detail})")
            err.headers = dict(exc.headers or {})  # Starlette's "Allow" (RFC 9110 wants it on a 405)
            return err
        err = APIError(str(exc.detail))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return err
    return to_api_error(exc)


# -- pydantic errors -> one clear message ---------------------------------------------------------
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "bytes", "literal"}


def _param(loc: tuple) -> str | None:
    """('body', 'messages', 1, 'content', 'list[tagged-union[...]]', 0, 'input_audio', 'input_audio',
    'data') -> 'messages[1].content[0].input_audio.data' (union member and tag names dropped)."""
    out = ""
    skip_tag = False
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if skip_tag:  # the discriminator value that follows a tagged union
            skip_tag = False
            continue
        if "[" in part or part in _TYPE_TAGS or "-" in part:
            skip_tag = "tagged-union" in part
            continue
        out += f".{part}" if out else part
    return out or None


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    errors = list(exc.errors())
    if not errors:
        return InvalidRequest("invalid request body")
    first = errors[0]
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return InvalidRequest("the request body is empty; send a JSON object such as "
                              '{"model": "chroma", "messages": [...]}', code="invalid_json")
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return InvalidRequest(f"the request body is not valid JSON ({detail})", code="invalid_json")
    depth = max(len(e["loc"]) for e in errors)
    deepest = [e for e in errors if len(e["loc"]) == depth]
    param = _param(tuple(deepest[0]["loc"]))
    if param is None and deepest[0].get("type") in ("model_attributes_type", "dict_type"):
        return InvalidRequest("the request body must be a JSON object", code="invalid_json")
    same = [e for e in deepest if _param(tuple(e["loc"])) == param]
    if same[0]["type"] == "missing":
        return InvalidRequest(f"{param} is required", param=param)
    messages = list(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in same))
    text = "; or ".join(messages[:1] + [m[0].lower() + m[1:] for m in messages[1:]])
    value = same[0].get("input")
    if same[0]["type"] != "value_error" and _short_scalar(value):
        text += f" (got {json.dumps(value)})"
    return InvalidRequest(f"{param}: {text}", param=param)


def _short_scalar(value) -> bool:
    return isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) <= 40)


# -- the middleware ----------------------------------------------------------------------------------
class RequestContext:
    def __init__(self, app, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = REQUEST_ID.set(rid)
        marks, marks_token = open_marks()
        status: list[int] = []
        t0 = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            self._authorize(scope)
            if scope["method"] in _BODY_METHODS:
                receive = await self._read_body(scope, receive)
                mark("body")
            await self.app(scope, receive, send_with_id)
        except ClientDisconnected:
            log.info("client disconnected; request cancelled")
        except Exception as exc:  # noqa: BLE001 - the last line of defence, see handle_error
            err = _classify(exc)
            log_error(err, exc, f"{scope['method']} {scope['path']}")
            if not status:
                await error_response(err, rid)(scope, receive, send_with_id)
        finally:
            log.info("%s %s -> %s in %.0f ms%s", scope["method"], scope["path"], status[0] if status else "-",
                     (time.perf_counter() - t0) * 1000, describe(marks, t0))
            close_marks(marks_token)
            REQUEST_ID.reset(token)

    def _authorize(self, scope) -> None:
        key = self.settings.api_key
        if not key or not scope["path"].startswith("/v1/"):
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise Unauthorized("incorrect API key")

    async def _read_body(self, scope, receive):
        """Read the whole body within the limit; return a ``receive`` that replays it."""
        limit = self.settings.max_body_bytes
        too_large = PayloadTooLarge(
            f"the request body exceeds this server's limit of {limit} bytes; send shorter audio "
            "(or raise --max-body-bytes)")
        declared = dict(scope["headers"]).get(b"content-length")
        with contextlib.suppress(ValueError):
            if declared is not None and int(declared) > limit * _DRAIN_FACTOR:
                raise too_large
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            part = message.get("body", b"")
            size += len(part)
            more = message.get("more_body", False)
            if size <= limit:
                chunks.append(part)
            elif size > limit * _DRAIN_FACTOR:
                raise too_large
        if size > limit:
            raise too_large
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


# -- the factory -------------------------------------------------------------------------------------
#: conversations a frontend remembers naming to Triton (each for most of the idle timeout): far more
#: than start within one at the rate a server of a few GPUs takes them
NAMED_CONVERSATIONS = 65_536


def named_conversations(settings: Settings):
    """With conversation affinity: where the workers remember the conversations they named (the
    transcripts' file, a table of its own, when they share one); else None."""
    if not settings.conversation_idle_s:
        return None
    if settings.transcript_db:
        return SharedTranscripts(settings.transcript_db, NAMED_CONVERSATIONS, table="conversations",
                                 kind="named conversation", lost="its next request starts it again in Triton")
    return MemoryTranscripts(NAMED_CONVERSATIONS)


def create_app(settings: Settings | None = None, *, backend: ChatBackend | None = None) -> FastAPI:
    """Build the app; ``backend`` defaults to Triton at ``settings.triton_grpc_url``."""
    from .routes import router
    from .triton_backend import TritonBackend

    settings = settings or Settings()
    transcripts = SharedTranscripts(settings.transcript_db) if settings.transcript_db else MemoryTranscripts()
    conversations = named_conversations(settings)
    if backend is None:
        backend = TritonBackend(settings.triton_grpc_url, settings.triton_model,
                                request_timeout=settings.request_timeout, health_timeout=settings.health_timeout,
                                cancel_model=settings.triton_cancel_model, conversations=conversations,
                                conversation_idle_s=settings.conversation_idle_s)
    media = MediaResolver(settings.allowed_local_media_paths, max_bytes=settings.max_body_bytes)
    voices = VoiceLibrary.load(settings.voices_dir, settings.max_prompt_audio_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info("serving model %r from Triton %s (local media: %s; API key %s)", settings.model_name,
                 settings.triton_grpc_url, ", ".join(map(str, media.roots)) or "disabled",
                 "required" if settings.api_key else "not required")
        yield
        await backend.close()
        for store in (transcripts, conversations):
            if isinstance(store, SharedTranscripts):
                store.close()

    app = FastAPI(
        title="Chroma on Triton: OpenAI-compatible API",
        description="Spoken dialogue with voice cloning (FlashLabs Chroma 1.0) served by NVIDIA Triton. "
                    "Accepts the Chroma-SGLang server's request schema and OpenAI's audio-chat schema.",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.backend = backend
    app.state.voices = voices
    app.state.chat = ChatService(settings, backend, media, voices, transcripts)
    app.state.started = int(time.time())
    for exc_type in (APIError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(exc_type, handle_error)
    app.include_router(router)
    app.add_middleware(RequestContext, settings=settings)
    if settings.cors_allow_origins:
        # Outermost, so that preflights need no API key and error answers carry the CORS headers too.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_allow_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["X-Request-ID"], max_age=600)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, less the 422 "Validation Error" it documents by default: this server
    answers invalid input with 400 (OpenAI's convention), which every operation lists."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (worker processes read the settings from the environment)."""
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    tune_malloc()
    return create_app(settings)
