"""HTTP routes, kept thin: validate -> backend -> respond.  Errors are raised, never rendered here."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any, Awaitable, Callable, TypeVar

import pydantic_core
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from . import __version__
from .app import request_id_of
from .chat import ChatService
from .errors import ClientDisconnected, NotFound
from .request_marks import mark
from .schemas import ChatCompletion, ChatCompletionRequest, ErrorResponse, Health, ModelCard, ModelList, VoiceList

T = TypeVar("T")


class FastJSONRequest(Request):
    """A request whose JSON body is parsed by pydantic-core's parser instead of Python's ``json``.

    FastAPI parses a body with ``request.json()`` on the event loop's thread, before validating
    it: with both clips inline (546 kB) that took 593 us with ``json.loads`` against 267 us here
    (scripts/bench_frontend.py's request), and in a py-spy of one worker at 256 streams it was the
    loop's largest single item (docs/benchmarks.md, session 14). A body the fast parser refuses
    goes to ``json.loads`` as before, which accepts what it accepted (lone surrogates, ...) and
    raises the ``JSONDecodeError`` that FastAPI turns into a 400."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body)
            except ValueError:
                self._json = json.loads(body)
        return self._json


class FastJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def with_fast_json(request: Request) -> Response:
            return await handler(FastJSONRequest(request.scope, request.receive))

        return with_fast_json


router = APIRouter(route_class=FastJSONRoute)
log = logging.getLogger("openai_frontend")

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503, 504)}
ENDPOINTS = ["/v1/chat/completions", "/v1/models", "/v1/models/{model}", "/v1/voices", "/health", "/docs", "/openapi.json"]


class EventStreamResponse(StreamingResponse):
    """SSE response that always closes its event generator when it ends, so a client leaving
    mid-stream cancels the engine request right away (not when the generator is collected).

    With ``send_timeout`` > 0, a client that stops reading is let go: when one event cannot be
    handed to its connection for that long (the socket buffers are full), the reply is abandoned
    like a disconnect (the Triton request cancelled) and uvicorn closes the connection (logging
    "ASGI callable returned without completing response")."""

    media_type = "text/event-stream"

    def __init__(self, content, *, send_timeout: float = 0.0, **kwargs):
        super().__init__(content, **kwargs)
        self.send_timeout = send_timeout

    async def __call__(self, scope, receive, send) -> None:
        stalled = False

        async def bounded_send(message) -> None:
            nonlocal stalled
            try:
                await _within(self.send_timeout, send(message))
            except asyncio.TimeoutError:
                stalled = True
                raise

        try:
            await super().__call__(scope, receive, bounded_send if self.send_timeout > 0 else send)
        except BaseException:
            if not stalled:
                raise
            log.warning("the client's connection took no data for %g s (it stopped reading); abandoning the reply "
                        "and closing the connection", self.send_timeout)
            raise ClientDisconnected() from None
        finally:
            await self.body_iterator.aclose()


async def _within(seconds: float, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, or asyncio.TimeoutError after ``seconds``."""
    if sys.version_info >= (3, 11):  # no task per call, unlike wait_for
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)  # pragma: no cover - Python 3.10


async def until_disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client goes away first, cancel it (and so the Triton request)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - the client is gone; only the cancellation matters
        pass
    raise ClientDisconnected()


@router.get("/", summary="Server information")
async def root(request: Request) -> dict:
    return {
        "message": "Chroma API Server (Triton)",
        "name": "chroma-triton",
        "version": __version__,
        "model": request.app.state.settings.model_name,
        "endpoints": ENDPOINTS,
    }


@router.get("/health", response_model=Health, response_model_exclude_none=True, responses={503: {"model": Health}},
            summary="Healthy when Triton and the model are ready")
async def health(request: Request):
    readiness = await request.app.state.backend.ready()
    if readiness.ready:
        return {"status": "healthy", "model_loaded": True}
    return JSONResponse({"status": "unhealthy", "model_loaded": False, "detail": readiness.detail}, status_code=503)


def _model_card(request: Request) -> dict:
    name = request.app.state.settings.model_name
    return {"id": name, "object": "model", "created": request.app.state.started, "owned_by": "chroma",
            "root": name, "parent": None, "permission": []}


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(request)]}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
async def get_model(model_id: str, request: Request) -> dict:
    card = _model_card(request)
    if model_id != card["id"]:
        raise NotFound(f"model {model_id!r} does not exist; this server serves {card['id']!r}", param="model",
                       code="model_not_found")
    return card


@router.get("/v1/voices", response_model=VoiceList, responses=_ERRORS, summary="Named voices for audio.voice")
async def list_voices(request: Request) -> dict:
    return {"object": "list", "data": [
        {"id": v.name, "object": "voice", "transcript": v.transcript, "duration_seconds": round(v.duration_seconds, 3)}
        for v in request.app.state.voices]}


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={200: {"model": ChatCompletion, "content": {"text/event-stream": {}},
                     "description": "a chat.completion, or with stream=true SSE chat.completion.chunk events"},
               **_ERRORS},
    summary="Reply text and cloned-voice speech for a conversation",
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    mark("validated")  # FastAPI has read the body's JSON and validated it
    chat: ChatService = request.app.state.chat
    plan = await asyncio.to_thread(chat.plan, body, request_id_of(request))
    mark("planned")
    if not plan.stream:
        return JSONResponse(await unless_disconnected(request, chat.complete(plan)))
    deltas = chat.engine_stream(plan)
    try:
        # Errors before the first output are ordinary HTTP errors; later ones go in-band.
        first = await unless_disconnected(request, anext(deltas, None))
    except BaseException:
        await deltas.aclose()
        raise
    return EventStreamResponse(chat.events(plan, first, deltas), send_timeout=request.app.state.settings.slow_client_timeout,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
