"""Chat completions: request -> engine request (:func:`ChatService.plan`), engine deltas ->
``chat.completion`` (:func:`ChatService.complete`) or SSE ``chat.completion.chunk`` events
(:func:`ChatService.events`).

The response carries both APIs' fields: the seed's top-level ``audio`` (base64 file) and
``choices[0].message.content`` (here the reply transcript), and OpenAI's
``choices[0].message.audio = {id, data, format, transcript, expires_at}``.  In streams, text is in
``delta.content`` and ``delta.audio.transcript``, audio in ``delta.audio.data`` as base64
little-endian PCM16 with ``delta.audio.sample_rate`` (24000, our addition).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np

from chroma_triton.audio_io import encode_audio, to_pcm16

from .backend import SAMPLE_RATE, ChatBackend, ChatRequest, Delta, Usage
from .errors import (APIError, InvalidRequest, NotFound, PayloadTooLarge, RateLimited, ServiceUnavailable, error_body, log_error,
                     to_api_error)
from .media import MediaResolver, check_audio
from .request_marks import mark
from .schemas import AudioURLPart, ChatCompletionRequest, InputAudioPart, SeedAudioPart, TextPart
from .settings import Settings
from .transcripts import MemoryTranscripts, TranscriptStore
from .voices import DEFAULT_VOICE, VoiceLibrary

log = logging.getLogger("openai_frontend")


@dataclass
class Plan:
    """What one request asks for, validated, plus how to answer it."""

    engine: ChatRequest
    chat_id: str
    created: int
    model: str
    stream: bool
    want_audio: bool
    audio_format: str
    include_usage: bool
    audio_params: list[str] = field(default_factory=list)  # client param of each user_audio clip


def _unicode_text(value: str, param: str) -> str:
    """``value`` unless it holds a lone surrogate: JSON's ``\\ud800`` escapes let a body carry one,
    no UTF-8 encoder takes it, and the request to Triton failed with a 500."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"{param} holds a lone surrogate ({value[exc.start]!r} at character {exc.start}), which is not "
            "Unicode text; send the text as UTF-8 (a surrogate escape needs its pair)", param=param,
            code="invalid_text") from None
    return value


class ChatService:
    def __init__(self, settings: Settings, backend: ChatBackend, media: MediaResolver, voices: VoiceLibrary,
                 transcripts: TranscriptStore | None = None):
        self.settings = settings
        self.backend = backend
        self.media = media
        self.voices = voices
        self.transcripts = transcripts if transcripts is not None else MemoryTranscripts()

    # -- request -> plan --------------------------------------------------------------------------
    def plan(self, req: ChatCompletionRequest, request_id: str) -> Plan:
        """Validate what the schema cannot and gather the audio; blocking (reads files)."""
        s = self.settings
        if req.model != s.model_name:
            raise NotFound(f"model {req.model!r} does not exist; this server serves {s.model_name!r} (GET /v1/models)",
                           param="model", code="model_not_found")
        messages, user_audio, audio_params = self._messages(req)
        prompt_audio, prompt_text = self._voice(req)
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens or req.max_tokens or s.default_max_tokens
        if max_tokens > s.max_tokens_limit:
            raise InvalidRequest(f"{max_param} is {max_tokens}, this server's limit is {s.max_tokens_limit} "
                                 f"(audio frames of 80 ms); ask for fewer", param=max_param)
        if req.modalities is not None:
            want_audio = "audio" in req.modalities
        else:
            want_audio = req.return_audio is not False
        if req.audio is not None and "format" in req.audio.model_fields_set:
            audio_format = req.audio.format
        else:
            audio_format = req.audio_format or "wav"
        engine = ChatRequest(
            request_id=request_id,
            messages=messages,
            user_audio=user_audio,
            prompt_audio=prompt_audio,
            prompt_text=prompt_text,
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
        )
        return Plan(
            engine=engine,
            chat_id=f"chatcmpl-{request_id}",
            created=int(time.time()),
            model=s.model_name,
            stream=bool(req.stream),
            want_audio=want_audio,
            audio_format=audio_format,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            audio_params=audio_params,
        )

    def _messages(self, req: ChatCompletionRequest) -> tuple[list[dict], list[bytes], list[str]]:
        s = self.settings
        out: list[dict] = []
        clips: list[bytes] = []
        params: list[str] = []
        total_seconds = 0.0
        total_bytes = 0
        for i, message in enumerate(req.messages):
            where = f"messages[{i}]"
            role = "system" if message.role == "developer" else message.role
            content = message.content
            if content is None:
                if role == "assistant" and message.audio is not None:
                    try:
                        content = self.transcripts.get(message.audio.id)
                    except sqlite3.Error as exc:
                        log.error("transcript store unreadable: %s", exc)
                        raise ServiceUnavailable(f"{where}.audio.id cannot be looked up right now; retry, or send "
                                                 "the assistant's reply text as content instead") from None
                    if content is None:
                        raise InvalidRequest(
                            f"{where}.audio.id {message.audio.id!r} is unknown or expired on this server; "
                            "send the assistant's reply text as content instead", param=f"{where}.audio.id")
                else:
                    raise InvalidRequest(f"{where}.content is required", param=f"{where}.content")
            if isinstance(content, str):
                out.append({"role": role, "content": _unicode_text(content, f"{where}.content")})
                continue
            if not content:
                raise InvalidRequest(f"{where}.content is an empty list; give a string or at least one part",
                                     param=f"{where}.content")
            parts = []
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": _unicode_text(part.text, f"{pw}.text")})
                    continue
                if role != "user":
                    raise InvalidRequest(f"{pw}: audio is accepted in user messages only", param=pw)
                if isinstance(part, SeedAudioPart):
                    param = f"{pw}.audio"
                    data = self.media.from_seed(part.audio, param)
                elif isinstance(part, InputAudioPart):
                    param = f"{pw}.input_audio.data"
                    data = self.media.from_openai(part.input_audio.data, param)
                elif isinstance(part, AudioURLPart):
                    param = f"{pw}.audio_url.url"
                    data = self.media.from_url(part.audio_url.url, param)
                else:  # pragma: no cover - the schema admits no other part
                    raise InvalidRequest(f"{pw}: unsupported part", param=pw)
                total_bytes += len(data)
                if total_bytes > s.max_body_bytes:
                    raise PayloadTooLarge(f"{param}: the request's audio exceeds {s.max_body_bytes} bytes in all",
                                          param=param)
                total_seconds += check_audio(data, param, s.max_audio_seconds)
                if total_seconds > s.max_audio_seconds:
                    raise InvalidRequest(
                        f"{param}: the request's audio is {total_seconds:.1f} s in all, the limit is "
                        f"{s.max_audio_seconds:g} s; send shorter clips", param=param, code="audio_too_long")
                parts.append({"type": "audio", "audio_index": len(clips)})
                clips.append(data)
                params.append(param)
            out.append({"role": role, "content": parts})
        return out, clips, params

    def _voice(self, req: ChatCompletionRequest) -> tuple[bytes, str]:
        """(reference clip bytes, transcript); empty bytes = Triton's default voice."""
        if (req.prompt_text is None) != (req.prompt_audio is None):
            given, missing = ("prompt_text", "prompt_audio") if req.prompt_audio is None else ("prompt_audio", "prompt_text")
            raise InvalidRequest(
                f"prompt_text and prompt_audio go together: {given} is given without {missing}. Give both "
                "(a voice clip and its transcript), or neither to use a named voice (audio.voice, 'default' if unset)",
                param=missing, code="prompt_incomplete")
        if req.prompt_audio is not None:
            data = self.media.from_seed(req.prompt_audio, "prompt_audio")
            check_audio(data, "prompt_audio", self.settings.max_prompt_audio_seconds)
            return data, _unicode_text(req.prompt_text, "prompt_text")
        name = req.audio.voice if req.audio is not None else DEFAULT_VOICE
        voice = self.voices.get(name)
        if voice is not None:
            return voice.audio, voice.transcript
        if name == DEFAULT_VOICE:
            return b"", ""
        available = ", ".join(self.voices.names()) or "none"
        raise InvalidRequest(f"unknown voice {name!r}; this server's voices: {available} (GET /v1/voices), "
                             "or clone any voice with prompt_audio + prompt_text", param="audio.voice",
                             code="unknown_voice")

    # -- engine errors in the client's terms ----------------------------------------------------
    def _client_param(self, err: APIError, plan: Plan) -> APIError:
        """Name the client's field for errors the engine reports about ``user_audio[i]``."""
        if err.param and err.param.startswith("user_audio["):
            index = int(err.param[len("user_audio["):-1])
            if index < len(plan.audio_params):
                client_param = plan.audio_params[index]
                err.message = err.message.replace(err.param, client_param)
                err.param = client_param
        return err

    def engine_stream(self, plan: Plan) -> AsyncIterator[Delta]:
        limit = self.settings.start_timeout

        async def deltas():
            gen = self.backend.stream(plan.engine)
            try:
                if limit > 0:  # the reply must start in time: a request still waiting for a row is refused
                    try:
                        async with asyncio.timeout(limit):
                            first = await anext(gen, None)
                    except TimeoutError:
                        raise RateLimited(f"server busy: the reply did not start within {limit:g} s (every "
                                          "generation row is taken; start_timeout); retry later") from None
                    if first is None:
                        return
                    gen = _chain(first, gen)
                async for delta in gen:
                    if delta.finish_reason == "cancelled":
                        raise ServiceUnavailable("the server cancelled the request (it may be shutting down); retry")
                    if delta.audio.size:
                        mark("first_audio")  # the request's log line (the first time only)
                    yield delta
            except APIError as err:
                raise self._client_param(err, plan) from None
            finally:
                await gen.aclose()

        return deltas()

    # -- non-streaming ----------------------------------------------------------------------------
    async def complete(self, plan: Plan) -> dict:
        texts: list[str] = []
        chunks: list[np.ndarray] = []
        last = Delta()
        async for delta in self.engine_stream(plan):
            texts.append(delta.text)
            if delta.audio.size:
                chunks.append(delta.audio)
            last = delta
        transcript = "".join(texts)
        usage = last.usage or Usage(0, 0, 0)
        message: dict = {"role": "assistant", "content": transcript}
        audio_b64 = None
        if plan.want_audio:
            pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
            encoded = await asyncio.to_thread(encode_audio, pcm, SAMPLE_RATE, plan.audio_format)
            audio_b64 = base64.b64encode(encoded).decode("ascii")
            audio_id, expires_at = self._audio_ref(plan)
            await self._remember(audio_id, transcript, expires_at)
            message["audio"] = {"id": audio_id, "data": audio_b64, "format": plan.audio_format,
                                "transcript": transcript, "expires_at": expires_at}
        return {
            "id": plan.chat_id,
            "object": "chat.completion",
            "created": plan.created,
            "model": plan.model,
            "choices": [{"index": 0, "message": message, "finish_reason": last.finish_reason, "logprobs": None}],
            "usage": usage_body(usage),
            "audio": audio_b64,
        }

    def _audio_ref(self, plan: Plan) -> tuple[str, int]:
        """The id of a reply's audio (a later turn may name it) and when it expires."""
        return f"audio_{plan.engine.request_id}", plan.created + self.settings.audio_retention_seconds

    async def _remember(self, audio_id: str, transcript: str, expires_at: int) -> None:
        await asyncio.to_thread(self.transcripts.put, audio_id, transcript, expires_at)  # off the event loop

    # -- streaming ----------------------------------------------------------------------------------
    async def events(self, plan: Plan, first: Delta | None, deltas: AsyncIterator[Delta]) -> AsyncIterator[str | bytes]:
        """SSE lines for a stream whose first delta was already read (errors before it are HTTP errors)."""
        audio_id, expires_at = self._audio_ref(plan)
        sent_audio = False
        transcript: list[str] = []

        def chunk(delta: dict, finish_reason: str | None = None, audio_data: bytes | None = None) -> str | bytes:
            body = {"id": plan.chat_id, "object": "chat.completion.chunk", "created": plan.created,
                    "model": plan.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
            if plan.include_usage:
                body["usage"] = None
            return sse(body, audio_data)

        def for_delta(d: Delta) -> list[str | bytes]:
            nonlocal sent_audio
            out = []
            body: dict = {}
            if d.text:
                body["content"] = d.text
                transcript.append(d.text)
            data = None
            if plan.want_audio and (d.text or d.audio.size):
                audio: dict = {"id": audio_id}
                if not sent_audio:
                    audio["expires_at"] = expires_at
                    sent_audio = True
                if d.audio.size:
                    data = base64.b64encode(memoryview(to_pcm16(d.audio)).cast("B"))
                    audio["data"] = ""  # filled in by sse()
                    audio["format"] = "pcm16"
                    audio["sample_rate"] = SAMPLE_RATE
                if d.text:
                    audio["transcript"] = d.text
                body["audio"] = audio
            if body:
                out.append(chunk(body, audio_data=data))
            if d.finish_reason is not None:
                out.append(chunk({}, d.finish_reason))
                if plan.include_usage:
                    out.append(sse({"id": plan.chat_id, "object": "chat.completion.chunk", "created": plan.created,
                                    "model": plan.model, "choices": [], "usage": usage_body(d.usage or Usage(0, 0, 0))}))
            return out

        source = deltas if first is None else _chain(first, deltas)
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for delta in source:
                for line in for_delta(delta):
                    yield line  # (resumed once the line is handed to the connection)
                    if plan.want_audio and delta.audio.size:
                        mark("first_sent")
            if plan.want_audio:
                await self._remember(audio_id, "".join(transcript), expires_at)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an in-band error event
            err = to_api_error(exc)
            log_error(err, exc, f"stream {plan.chat_id}")
            yield sse(error_body(err, plan.engine.request_id))
        finally:
            await deltas.aclose()
        yield "data: [DONE]\n\n"


def sse(body: dict, audio_data: bytes | None = None) -> str | bytes:
    """One server-sent event. ``audio_data`` (base64: nothing in it needs JSON escaping) replaces the
    body's empty ``"data"`` value after serialising, so json does not scan the chunk's audio, about
    50 kB per event (5 instead of 60 us per event, scripts/bench_frontend.py); that event comes
    back as bytes, joined once, since every copy of that size costs the event loop a fresh mapping
    under the frontend's allocator settings. The body has one key named data, and the text
    ``"data":""`` cannot occur inside a JSON string (its quotes would be escaped), so the first
    match is that key."""
    text = json.dumps(body, ensure_ascii=False, separators=(',', ':'))
    if audio_data is None:
        return f"data: {text}\n\n"
    head, key, tail = text.partition('"data":""')
    if not key:
        raise ValueError('sse: audio_data given but the body has no empty "data" value')
    return b"".join((b"data: ", head.encode(), b'"data":"', audio_data, b'"', tail.encode(), b"\n\n"))


def usage_body(usage: Usage) -> dict:
    completion = usage.text_tokens + usage.audio_frames
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": usage.prompt_tokens + completion,
        "completion_tokens_details": {"text_tokens": usage.text_tokens, "audio_tokens": usage.audio_frames},
    }


def new_request_id() -> str:
    return uuid.uuid4().hex


async def _chain(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    """``first``, then what ``rest`` yields (closing this closes ``rest``)."""
    try:
        yield first
        async for delta in rest:
            yield delta
    finally:
        await rest.aclose()
