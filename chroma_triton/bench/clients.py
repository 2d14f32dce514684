"""The benchmark's two ways in, each one stream per request, many streams on one event loop.

* frontend: ``POST /v1/chat/completions`` with ``"stream": true`` (the README's curl example:
  question audio and reference voice by path, or inline as base64), read as server-sent events
  with httpx; ``delta.audio.data`` is base64 PCM16, so samples = bytes / 2.
* grpc: Triton's ``ModelStreamInfer`` on the ``chroma`` ensemble through tritonclient's generated
  stub on a ``grpc.aio`` channel, asking for the empty final response so the end is explicit;
  ``audio`` is float32 PCM.

Both fill a :class:`~chroma_triton.bench.stats.StreamRecord`; neither raises for a failed
request (the error is recorded).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import soundfile as sf
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc

from ..serving.protocol import ensemble_inputs, triton_dtype
from .conversation import conversation
from .stats import StreamRecord

ASSETS = Path(__file__).resolve().parents[2] / "assets"
GRPC_OPTIONS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]


def parse_turns(text: str) -> tuple[int, int]:
    """``"N"`` or ``"LO-HI"`` (earlier exchanges per request) -> (lo, hi)."""
    lo, sep, hi = text.partition("-")
    try:
        turns = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise ValueError(f"history turns must be N or LO-HI, got {text!r}") from None
    if not 0 <= turns[0] <= turns[1]:
        raise ValueError(f"history turns must satisfy 0 <= LO <= HI, got {text!r}")
    return turns


@dataclass(frozen=True)
class Turn:
    """Which request of a level run this is: stream ``stream``'s round ``round`` in run ``run``."""

    run: int
    stream: int
    round: int


@dataclass(frozen=True)
class Sequence:
    """How a request names its conversation to Triton (chroma_triton/serving/affinity.py)."""

    id: str
    start: bool
    end: bool


@functools.cache
def _pcm16(path: Path) -> tuple[np.ndarray, int]:
    data, rate = sf.read(path, dtype="int16")
    return data, rate


#: the level of `tagged_clip`'s noise against the clip's own RMS: a faint hiss under the speech (1 % of
#: its amplitude) that still changes every log-mel frame, so every row of the clip's embeddings
TAG_NOISE_DB = -40.0


def tagged_clip(path: Path, tag: int) -> bytes:
    """The WAV at ``path`` with noise seeded by ``tag`` (64 bits) at ``TAG_NOISE_DB``: the same
    speech as another speaker's recording of it would be, with other bytes and other embeddings. A
    tag must reach what the thinker sees: its prefix cache matches clips by their embeddings, and
    bits that the features lose (the earlier tag, in the lowest bit of the last 64 samples, gave
    every clip the same embeddings) let conversations share prefixes no two real ones share."""
    data, rate = _pcm16(path)
    if data.ndim != 1 or not len(data):
        raise ValueError(f"{path}: tagged clips need a mono clip")
    rms = float(np.sqrt(np.mean(np.square(data, dtype=np.float64))))
    noise = np.random.default_rng(tag).standard_normal(len(data), dtype=np.float32) * (rms * 10 ** (TAG_NOISE_DB / 20))
    out = io.BytesIO()
    sf.write(out, np.clip(np.rint(data + noise), -32768, 32767).astype(np.int16), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


@dataclass(frozen=True)
class Workload:
    """The request every stream sends (only the seed differs): the README example.

    ``history_turns`` (lo, hi): the request is a conversation's next turn after earlier exchanges
    (a user clip, then ``conversation.HISTORY_REPLY`` as the assistant's text), as a voice agent resends its
    history: about 120 prompt tokens per turn on top of the README request's ~120. The request of
    seed s has lo + s mod (hi - lo + 1) of them, every user turn the question clip (over gRPC one
    clip that each turn names; through the frontend each turn sends it).

    ``conversations``: instead, each stream of a level run is a conversation of its own, already
    ``lo + stream mod (hi - lo + 1)`` turns deep when the level starts (so a level holds shallow and
    deep conversations at once, as a server in steady use does) and a turn deeper each round. A
    request resends at most ``hi`` earlier turns, the latest (as an agent that trims its history
    does). Every user turn has its own clip (the question clip under noise seeded by the run, stream
    and turn, ``tagged_clip``), sent inline on both paths: round r + 1 sends round r's clips
    again but the oldest once the window is full, and no two conversations or runs share a clip (so
    what a server caches by content shows as it would)."""

    question: Path = ASSETS / "question_audio.wav"
    voice: Path = ASSETS / "ref_audio.wav"
    voice_text: str = (ASSETS / "ref_audio.txt").read_text().strip()
    max_tokens: int = 100
    temperature: float = 1.0
    top_p: float = 1.0
    inline_audio: bool = False  # frontend: base64 instead of the README's paths
    history_turns: tuple[int, int] = (0, 0)
    conversations: bool = False

    def turns(self, seed: int, turn: Turn | None = None) -> int:
        """Earlier exchanges in the request of ``seed`` (``turn``: which request it is)."""
        lo, hi = self.history_turns
        if self.conversations and turn is not None:
            return min(self.conversation_turn(turn), hi)
        return lo + seed % (hi - lo + 1)

    def sequence(self, turn: Turn) -> Sequence:
        """In ``conversations``: the stream's conversation, started by the run's first round (the
        server has not seen it, whatever its history); else a sequence of one request."""
        if self.conversations:
            return Sequence(f"bench-{turn.run}-{turn.stream}", start=turn.round == 0, end=False)
        return Sequence(f"bench-{turn.run}-{turn.stream}-{turn.round}", start=True, end=True)

    def conversation_turn(self, turn: Turn) -> int:
        """In ``conversations``: how many turns the conversation of ``turn`` had before it."""
        lo, hi = self.history_turns
        return lo + turn.stream % (hi - lo + 1) + turn.round

    def user_clips(self, seed: int, turn: Turn | None = None) -> list[bytes] | None:
        """Each user turn's clip, oldest first, in ``conversations``; else None (the question clip)."""
        if not (self.conversations and turn is not None):
            return None
        now = self.conversation_turn(turn)
        return [tagged_clip(self.question, (turn.run << 32) | (turn.stream << 16) | j)
                for j in range(now - self.turns(seed, turn), now + 1)]

    def chat_body(self, seed: int, turn: Turn | None = None) -> dict:
        def audio(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode() if self.inline_audio else f"assets/{path.name}"

        clips = self.user_clips(seed, turn)
        if clips is None:
            parts = [{"type": "audio", "audio": audio(self.question)}] * (self.turns(seed) + 1)
        else:
            parts = [{"type": "audio", "audio": base64.b64encode(c).decode()} for c in clips]
        return {"model": "chroma", "stream": True, "stream_options": {"include_usage": True},
                "messages": conversation(parts), "prompt_text": self.voice_text, "prompt_audio": audio(self.voice),
                "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p, "seed": seed}

    def ensemble_arrays(self, seed: int, turn: Turn | None = None) -> dict[str, np.ndarray]:
        clips = self.user_clips(seed, turn)
        if clips is None:
            clips, parts = [self.question.read_bytes()], [{"type": "audio", "audio_index": 0}] * (self.turns(seed) + 1)
        else:
            parts = [{"type": "audio", "audio_index": j} for j in range(len(clips))]
        return ensemble_inputs(conversation(parts), user_audio=clips, prompt_audio=self.voice.read_bytes(),
                               prompt_text=self.voice_text, max_tokens=self.max_tokens,
                               temperature=self.temperature, top_p=self.top_p, seed=seed)


# -- frontend (HTTP SSE) --------------------------------------------------------------------------
async def sse_stream(client, base_url: str, body: dict, rec: StreamRecord) -> None:
    """One streamed chat completion; ``client`` is an ``httpx.AsyncClient``."""
    try:
        async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {' '.join(text.split())[:300]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter()
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                _sse_event(json.loads(data), now, rec)
                if rec.error:
                    break
    except Exception as exc:  # noqa: BLE001 - recorded, the level goes on
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        rec.done = time.perf_counter()


def _sse_event(event: dict, now: float, rec: StreamRecord) -> None:
    if "error" in event:
        rec.error = f"stream error: {event['error'].get('message', event['error'])}"
        return
    usage = event.get("usage")
    if usage:
        rec.usage_frames = (usage.get("completion_tokens_details") or {}).get("audio_tokens")
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        audio = delta.get("audio") or {}
        if audio.get("data"):
            rec.add_audio(now, len(base64.b64decode(audio["data"])) // 2)
        rec.text_chars += len(delta.get("content") or "")
        if choice.get("finish_reason"):
            rec.finish_reason = choice["finish_reason"]


# -- Triton gRPC --------------------------------------------------------------------------------
def infer_request(arrays: dict[str, np.ndarray], request_id: str, model: str = "chroma",
                  sequence: Sequence | None = None) -> service_pb2.ModelInferRequest:
    """The ensemble's request; ``sequence`` names its conversation (what a stack with conversation
    affinity needs, and one without ignores)."""
    msg = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    msg.parameters["triton_enable_empty_final_response"].bool_param = True
    if sequence is not None:
        msg.parameters["sequence_id"].string_param = sequence.id
        msg.parameters["sequence_start"].bool_param = sequence.start
        msg.parameters["sequence_end"].bool_param = sequence.end
    for name, array in arrays.items():
        tensor = msg.inputs.add()
        tensor.name, tensor.datatype = name, triton_dtype(array)
        tensor.shape.extend(array.shape)
        if array.dtype == np.object_:
            raw = b"".join(struct.pack("<I", len(item)) + bytes(item) for item in array.reshape(-1))
        else:
            raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
        msg.raw_input_contents.append(raw)
    return msg


class GrpcPool:
    """A few ``grpc.aio`` channels (distinct connections), streams spread over them."""

    def __init__(self, url: str, streams_per_channel: int = 64):
        self.url, self.per_channel = url, streams_per_channel
        self.channels: list[grpc.aio.Channel] = []

    def stub(self, index: int) -> service_pb2_grpc.GRPCInferenceServiceStub:
        k = index // self.per_channel
        while len(self.channels) <= k:  # a distinct option keeps gRPC from sharing one connection
            opts = GRPC_OPTIONS + [("chroma.bench.channel", len(self.channels))]
            self.channels.append(grpc.aio.insecure_channel(self.url, options=opts))
        return service_pb2_grpc.GRPCInferenceServiceStub(self.channels[k])

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        self.channels = []


async def grpc_stream(stub, request: service_pb2.ModelInferRequest, rec: StreamRecord, timeout: float) -> None:
    finished = asyncio.Event()

    async def requests():
        yield request
        await finished.wait()  # keep our half open until the reply is complete

    call = stub.ModelStreamInfer(requests(), timeout=timeout)
    try:
        async for response in call:
            now = time.perf_counter()
            if response.error_message:
                rec.error = f"triton error: {' '.join(response.error_message.split())[:300]}"
                break
            reply = response.infer_response
            if reply.outputs:
                _grpc_outputs(InferResult(reply), now, rec)
            final = reply.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
        else:
            rec.error = rec.error or "the stream ended before the final response"
    except grpc.aio.AioRpcError as exc:
        rec.error = f"gRPC {exc.code().name}: {' '.join((exc.details() or '').split())[:300]}"
    except Exception as exc:  # noqa: BLE001
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        rec.done = time.perf_counter()
        finished.set()
        call.cancel()


def _grpc_outputs(result: InferResult, now: float, rec: StreamRecord) -> None:
    audio = result.as_numpy("audio")
    if audio is not None:
        rec.add_audio(now, int(audio.size))
    text = result.as_numpy("text")
    if text is not None and text.size:
        rec.text_chars += len(bytes(text.reshape(-1)[0]).decode(errors="replace"))
    finish = result.as_numpy("finish_reason")
    reason = bytes(finish.reshape(-1)[0]).decode() if finish is not None and finish.size else ""
    if reason:
        rec.finish_reason = reason
        usage = result.as_numpy("usage")
        if usage is not None and usage.size >= 3:
            rec.usage_frames = int(usage.reshape(-1)[2])
