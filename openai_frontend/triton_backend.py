"""The Triton implementation of :class:`~openai_frontend.backend.ChatBackend`.

One gRPC bidirectional stream (``ModelStreamInfer``) per chat request against the ensemble
``chroma`` (decoupled): the request goes out, text/audio responses come back as they are made,
and the request's final flag ends it (we ask for an empty final response,
``triton_enable_empty_final_response``, so the end is explicit).

Why not ``tritonclient.grpc.aio.InferenceServerClient.stream_infer``: it cannot set that
request parameter (its own API rejects ``triton_``-prefixed parameters, and its dict-based
request iterator has no such key).  So requests go to the same method (``ModelStreamInfer`` of
``tritonclient.grpc.service_pb2``) on a ``grpc.aio`` channel, already serialized
(:func:`serialize_infer_request`, which copies the request's audio once), responses are read with
``tritonclient.grpc.InferResult``, and the health checks use the aio client as is.

Cancellation: when the consumer stops early (``aclose()`` / task cancelled) the gRPC call is
cancelled, and a control request goes straight to the model ``chroma_cancel`` naming the request
id: Triton 2.51 does not pass the gRPC cancel to the decoupled ``chroma_lm`` step already running
inside the ensemble, and the fallback path (``codec_decoder`` flags it) waits in the codec's
queue; the control call reaches ``chroma_lm``'s engine within milliseconds
(``chroma_triton/serving/cancel_board.py``). It is sent in the background and never delays or
fails the request's own handling.

Errors are classified here, once: Triton's ``invalid request: ...`` -> 400 (param guessed from
the message), ``internal error: ...`` -> 500, unknown/unloaded model and an unreachable server
-> 503, the deadline -> 504.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import re
import sqlite3
import struct
import time
from contextlib import aclosing
from typing import AsyncIterator, Sequence

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from chroma_triton.serving.affinity import conversation_key, needs_start, opens_conversation
from chroma_triton.serving.protocol import classify_error

from .backend import ChatRequest, Delta, Readiness, Usage
from .errors import APIError, GatewayTimeout, InternalError, InvalidRequest, PayloadTooLarge, RateLimited, ServiceUnavailable
from .transcripts import TranscriptStore

log = logging.getLogger("openai_frontend.triton")

_MAX_MESSAGE = 2**31 - 1
#: Keepalive pings no more often than Triton accepts: with its defaults (a ping at most every
#: 300 s without data, 2 strikes) pings every 30 s made Triton drop the connection with
#: "Too many pings" after ~90 s without data, failing every stream on it (measured on 2.51).
#: Reconnect quickly (≤ 2 s) after Triton restarts, instead of gRPC's default backoff of up to 120 s.
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 330_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
#: How long a request waits for a reconnecting channel: a little over the longest reconnect backoff.
READY_WAIT_S = dict(_CHANNEL_OPTIONS)["grpc.max_reconnect_backoff_ms"] / 1000 + 0.5
#: Request fields the engine validates; a Triton "invalid request: <field> ..." names its param.
_PARAMS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "prompt_audio", "prompt_text", "messages")
_USER_AUDIO = re.compile(r"\buser_audio\[(\d+)\]")
_NOT_READY = r"unknown model|not found|not ready|unavailable|is not loaded|no available versions"
#: Triton 2.51's answer once a model's Python process died (it neither restarts it nor marks the
#: model unready; the launcher restarts tritonserver, see docs/reliability.md).
_DEAD_STUB = r"stub process .* is not healthy"


def encode_bytes(items: Sequence[bytes]) -> bytes:
    """Triton's BYTES wire format: each element as a little-endian uint32 length + its bytes."""
    return b"".join(_bytes_pieces(items))


def _bytes_pieces(items: Sequence[bytes]) -> list[bytes]:
    """The pieces of :func:`encode_bytes`, not yet joined (no element is copied)."""
    return [piece for item in items for piece in (struct.pack("<I", len(item)), item)]


#: A ModelInferRequest's ``raw_input_contents`` field (7, length-delimited) as it starts on the wire.
_RAW_FIELD = service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"]
_RAW_TAG = bytes([_RAW_FIELD.number << 3 | 2])
_STREAM_INFER = "/{}/ModelStreamInfer".format(service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def serialize_infer_request(head: service_pb2.ModelInferRequest, contents: Sequence[Sequence[bytes]]) -> bytes:
    """``head`` (model, id, parameters, the inputs' names, types and shapes) serialized with one
    ``raw_input_contents`` entry per item of ``contents`` (each given as pieces to concatenate).

    Protobuf lets a repeated field's entries follow a message's other fields, so this equals
    ``head``'s serialization after appending the contents to it (a test parses it back), but the
    request's audio is copied once, here, instead of three times (the BYTES encoding, the
    message's field, ``SerializeToString``): with inline clips that was about 0.5 ms of the event
    loop's thread per request (scripts/bench_frontend.py)."""
    parts = [head.SerializeToString()]
    for pieces in contents:
        parts.append(_RAW_TAG)
        parts.append(_varint(sum(len(piece) for piece in pieces)))
        parts.extend(pieces)
    return b"".join(parts)


#: the share of Triton's idle timeout for which a named conversation counts as known: past it the
#: request starts the conversation again (a start of a sequence Triton still holds keeps it where it
#: is, with a warning in Triton's log), rather than risk Triton's refusal and a second request
KNOWN_SHARE = 0.9


class _UnknownConversation(Exception):
    """Triton refused a request that continued a conversation it does not know (affinity.needs_start)."""


class TritonBackend:
    def __init__(self, url: str, model: str = "chroma", *, request_timeout: float = 600.0,
                 health_timeout: float = 2.0, cancel_model: str | None = "chroma_cancel",
                 cancel_timeout: float = 5.0, conversations: TranscriptStore | None = None,
                 conversation_idle_s: float = 0.0):
        self.url = url
        # conversation affinity: > 0 (Triton's idle timeout): requests name their conversations,
        # remembered for KNOWN_SHARE of it in ``conversations`` (a store the workers share)
        self.conversation_idle_s = conversation_idle_s
        self.conversations = conversations
        self.model = model
        self.request_timeout = request_timeout
        self.health_timeout = health_timeout
        self.cancel_model = cancel_model or None  # None/"": only the gRPC cancel
        self.cancel_timeout = cancel_timeout
        self._cancels: set[asyncio.Task] = set()  # control calls in flight (kept referenced)
        self.cancel_calls = {"sent": 0, "running": 0, "failed": 0}
        self._channel: grpc.aio.Channel | None = None
        self._stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None
        self._stream_infer: grpc.aio.StreamStreamMultiCallable | None = None
        self._client: InferenceServerClient | None = None

    # -- connection (created lazily inside the running event loop) ------------------------------
    def _get_stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.url, options=_CHANNEL_OPTIONS)
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
            # ModelStreamInfer fed requests serialized by serialize_infer_request (bytes as they are)
            self._stream_infer = self._channel.stream_stream(
                _STREAM_INFER, request_serializer=None,
                response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
        return self._stub

    def _get_client(self) -> InferenceServerClient:
        if self._client is None:
            self._client = InferenceServerClient(self.url, channel_args=_CHANNEL_OPTIONS)
        return self._client

    async def _channel_ready(self) -> None:
        """After Triton restarts, each worker's channel reconnects on its own backoff (at most
        ``max_reconnect_backoff_ms``), so one worker can still be reconnecting when another already
        answers /health 200. A request reaching it waits that long for the channel instead of
        failing at once; if Triton is really down, the call then fails as before."""
        if self._channel is None or self._channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        try:
            await asyncio.wait_for(self._channel.channel_ready(), READY_WAIT_S)
        except asyncio.TimeoutError:
            pass

    async def close(self) -> None:
        if self._cancels:
            await asyncio.wait(list(self._cancels), timeout=self.cancel_timeout)
        if self._channel is not None:
            await self._channel.close()
        if self._client is not None:
            await self._client.close()
        self._channel = self._stub = self._stream_infer = self._client = None

    # -- health ----------------------------------------------------------------------------------
    async def ready(self) -> Readiness:
        client = self._get_client()
        try:
            if not await client.is_server_ready(client_timeout=self.health_timeout):
                return Readiness(False, f"Triton at {self.url} is up but not ready")
            if not await client.is_model_ready(self.model, client_timeout=self.health_timeout):
                return Readiness(False, f"model {self.model!r} is not ready on Triton at {self.url}")
        except InferenceServerException as exc:
            return Readiness(False, f"Triton at {self.url} is unreachable: {_short(exc.message())}")
        return Readiness(True)

    # -- generation ------------------------------------------------------------------------------
    async def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        """The reply to ``request``. With conversation affinity (``conversation_idle_s`` > 0) the
        request names its conversation (``sequence_id``, see ``chroma_triton/serving/affinity.py``),
        starting it unless this frontend named it within the idle timeout; if Triton does not know
        it all the same (a restarted server), the request is sent once more, starting it."""
        key, start = "", True
        if self.conversation_idle_s > 0:  # hashing clips and the store's SQLite: off the event loop
            key, start = await asyncio.to_thread(self._name_conversation, request)
        while True:
            try:  # aclosing: a consumer that stops early cancels the request at once (_stream_once's finally)
                async with aclosing(self._stream_once(request, key, start)) as deltas:
                    async for delta in deltas:
                        yield delta
                return
            except _UnknownConversation:  # raised only before anything was yielded, and never with start
                log.info("request %s: Triton does not know conversation %s (idle past its timeout, or new to this "
                         "server): sent again as its first turn", request.request_id, key)
                start = True

    def _name_conversation(self, request: ChatRequest) -> tuple[str, bool]:
        """The request's conversation and whether the request starts it (``_starts``)."""
        key = conversation_key(request.messages, request.user_audio)
        return key, self._starts(key, request.messages)

    def _starts(self, key: str, messages: list[dict]) -> bool:
        """Whether the request starts its conversation in Triton: when no worker of this frontend
        named it within (most of) the idle timeout, and remember that it is named now (each request
        renews Triton's timeout). Without the store: when the request has no assistant turn."""
        if self.conversations is None:
            return opens_conversation(messages)
        try:
            start = self.conversations.get(key) is None
            self.conversations.put(key, "", time.time() + KNOWN_SHARE * self.conversation_idle_s)
            return start
        except sqlite3.Error as exc:
            log.warning("conversation %s: the store of named conversations failed (%s)", key, exc)
            return opens_conversation(messages)

    async def _stream_once(self, request: ChatRequest, key: str, start: bool) -> AsyncIterator[Delta]:
        self._get_stub()
        stream_infer = self._stream_infer  # close() may clear it while this request waits below
        infer_request = self._infer_request(request, key, start)
        writes_done = asyncio.Event()

        async def requests():
            yield infer_request
            await writes_done.wait()  # keep our side open until the reply is complete

        await self._channel_ready()
        try:
            call = stream_infer(requests(), timeout=self.request_timeout)
        except grpc.aio.UsageError:  # the channel was closed: the frontend is shutting down
            raise ServiceUnavailable("the frontend is shutting down; retry the request") from None
        completed = yielded = False
        pending: Delta | None = None
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span responses
        try:
            async for response in call:
                if response.error_message:  # an error ends the request (Triton sends nothing after it)
                    completed = True
                    if key and not start and not yielded and needs_start(response.error_message):
                        raise _UnknownConversation()  # nothing was sent to the client yet
                    raise classify_triton_error(response.error_message, self)
                delta, final = _parse(response.infer_response, utf8)
                if pending is not None:  # a finished delta followed by data: merge, keep waiting
                    delta = _merge(pending, delta)
                    pending = None
                if delta.finish_reason is not None and not final:
                    pending = delta  # hold it until the final flag, so stopping after it is clean
                elif delta.text or delta.audio.size or delta.finish_reason is not None:
                    yielded = True
                    yield delta
                if final:
                    if pending is None and delta.finish_reason is None:
                        raise InternalError("the model ended the reply without a finish reason")
                    if pending is not None:
                        yielded = True
                        yield pending
                    completed = True
                    return
            raise ServiceUnavailable(f"Triton at {self.url} closed the stream before the reply was complete")
        except grpc.aio.AioRpcError as exc:
            raise classify_rpc_error(exc, self) from None
        finally:
            writes_done.set()
            if not completed:
                call.cancel()
                self.cancel_in_engine(request.request_id)
                log.info("request %s: cancelling the Triton request", request.request_id)

    def cancel_in_engine(self, request_id: str) -> asyncio.Task | None:
        """Send the control call that cancels ``request_id`` in ``chroma_lm`` (in the background)."""
        if not self.cancel_model or not request_id:
            return None
        task = asyncio.get_running_loop().create_task(self._cancel_call(request_id))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)
        return task

    async def _cancel_call(self, request_id: str) -> bool | None:
        """``True``/``False``: whether the request was running in the engine; ``None``: failed."""
        msg = service_pb2.ModelInferRequest(model_name=self.cancel_model, id=f"cancel-{request_id}")
        tensor = msg.inputs.add()
        tensor.name, tensor.datatype = "request_id", "BYTES"
        tensor.shape.append(1)
        msg.raw_input_contents.append(encode_bytes([request_id.encode()]))
        self.cancel_calls["sent"] += 1
        try:
            response = await self._get_stub().ModelInfer(msg, timeout=self.cancel_timeout)
            running = bool(InferResult(response).as_numpy("running").reshape(-1)[0])
        except (grpc.aio.AioRpcError, InferenceServerException, ValueError, IndexError, AttributeError) as exc:
            self.cancel_calls["failed"] += 1
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            warn = log.warning if self.cancel_calls["failed"] <= 3 else log.debug  # e.g. a repository without it
            warn("request %s: the cancel call to %r failed (%s); the engine learns of it through the "
                        "ensemble instead, later", request_id, self.cancel_model, _short(detail or repr(exc)))
            return None
        self.cancel_calls["running"] += running
        # "running=False": the engine had finished the request already (or it has not reached the
        # engine yet, and the marker will stop it when it does).
        log.info("request %s: cancel call answered: running=%s", request_id, running)
        return running

    def _infer_request(self, request: ChatRequest, conversation: str = "", start: bool = True) -> bytes:
        """The request for the ensemble, serialized (see :func:`serialize_infer_request`), naming
        ``conversation`` (starting it with ``start``) when given."""
        head = service_pb2.ModelInferRequest(model_name=self.model, id=request.request_id)
        head.parameters["triton_enable_empty_final_response"].bool_param = True
        if conversation:
            head.parameters["sequence_id"].string_param = conversation
            head.parameters["sequence_start"].bool_param = start
        contents: list[list[bytes]] = []

        def add(name: str, datatype: str, shape: list[int], pieces: list[bytes]) -> None:
            tensor = head.inputs.add()
            tensor.name, tensor.datatype = name, datatype
            tensor.shape.extend(shape)
            contents.append(pieces)

        # Optional inputs are left out to mean "the engine's default": no user audio, Triton's
        # default voice (no prompt_audio/prompt_text), the checkpoint's top_k, a random seed.
        add("messages", "BYTES", [1], _bytes_pieces([json.dumps(request.messages, ensure_ascii=False).encode()]))
        if request.user_audio:
            add("user_audio", "BYTES", [len(request.user_audio)], _bytes_pieces(request.user_audio))
        if request.prompt_audio:
            add("prompt_audio", "BYTES", [1], _bytes_pieces([request.prompt_audio]))
            add("prompt_text", "BYTES", [1], _bytes_pieces([request.prompt_text.encode()]))
        add("max_tokens", "INT32", [1], [np.array([request.max_tokens], "<i4").tobytes()])
        add("temperature", "FP32", [1], [np.array([request.temperature], "<f4").tobytes()])
        add("top_p", "FP32", [1], [np.array([request.top_p], "<f4").tobytes()])
        if request.top_k is not None:
            add("top_k", "INT32", [1], [np.array([request.top_k], "<i4").tobytes()])
        if request.seed is not None:
            add("seed", "INT64", [1], [np.array([request.seed], "<i8").tobytes()])
        return serialize_infer_request(head, contents)


def _parse(response: service_pb2.ModelInferResponse, utf8: codecs.IncrementalDecoder) -> tuple[Delta, bool]:
    final = "triton_final_response" in response.parameters and response.parameters["triton_final_response"].bool_param
    if not response.outputs:
        return Delta(), final
    result = InferResult(response)
    delta = Delta()
    text = result.as_numpy("text")
    finish = result.as_numpy("finish_reason")
    reason = _as_bytes(finish.reshape(-1)[0]).decode() if finish is not None and finish.size else ""
    if text is not None and text.size:
        delta.text = utf8.decode(b"".join(_as_bytes(t) for t in text.reshape(-1)), final=bool(reason))
    audio = result.as_numpy("audio")
    if audio is not None and audio.size:
        delta.audio = np.ascontiguousarray(audio.reshape(-1), dtype=np.float32)
    if reason:
        delta.finish_reason = reason
        usage = result.as_numpy("usage")
        if usage is None or usage.size < 3:
            raise InternalError("the model's last response has no usage numbers")
        prompt_tokens, text_tokens, audio_frames = (int(v) for v in usage.reshape(-1)[:3])
        delta.usage = Usage(prompt_tokens, text_tokens, audio_frames)
    return delta, final


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _merge(first: Delta, second: Delta) -> Delta:
    audio = np.concatenate([first.audio, second.audio]) if second.audio.size else first.audio
    return Delta(first.text + second.text, audio, second.finish_reason or first.finish_reason,
                 second.usage or first.usage)


def _short(message: str, limit: int = 300) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


def classify_triton_error(message: str, backend: TritonBackend) -> APIError:
    """Turn an error Triton reported into the API error the client should get.

    The models prefix their errors ``invalid request: `` or ``internal error: `` (Triton puts
    ``in ensemble 'chroma', `` in front); :func:`chroma_triton.serving.protocol.classify_error`
    reads that.  Triton's own errors about an unknown or unloaded model mean "not ready" (503);
    the engine's full queue ("server busy") means 429.
    """
    text = " ".join(message.split())
    low = text.lower()
    if re.search(_DEAD_STUB, low):
        return ServiceUnavailable(f"a model process of {backend.model!r} on Triton at {backend.url} has died "
                                  f"({_short(text)}); the server must be restarted (the launcher does it); retry later")
    if not re.search(r"invalid request:|internal error:", low) and re.search(_NOT_READY, low):
        return ServiceUnavailable(f"model {backend.model!r} is not ready on Triton at {backend.url}: {_short(text)}")
    kind, detail = classify_error(text)
    if "server busy" in low:
        return RateLimited(f"the server is at capacity ({_short(detail)})")
    if kind == "invalid_request":
        return InvalidRequest(detail, param=_param_of(detail))
    return InternalError(f"the model failed: {_short(detail)}")


def _param_of(detail: str) -> str | None:
    match = _USER_AUDIO.search(detail)
    if match:
        return f"user_audio[{match.group(1)}]"
    head = detail.split(None, 1)[0].strip(":,.'\"") if detail else ""
    for name in _PARAMS:
        if head == name or head.startswith(name + "[") or head.startswith(name + "."):
            return head
    return None


def classify_rpc_error(exc: grpc.aio.AioRpcError, backend: TritonBackend) -> APIError:
    code, details = exc.code(), _short(exc.details() or "")
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServiceUnavailable(f"Triton at {backend.url} is unreachable ({details}); is tritonserver running?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayTimeout(f"no complete reply within {backend.request_timeout:g} s; "
                              "ask for fewer max_tokens or retry later")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return PayloadTooLarge(f"Triton refused the request size: {details}")
    if code == grpc.StatusCode.CANCELLED:
        return ServiceUnavailable(f"Triton at {backend.url} cancelled the request ({details}); retry")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return classify_triton_error(details, backend)
    return InternalError(f"Triton gRPC error {code.name}: {details}")
