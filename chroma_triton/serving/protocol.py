"""The tensor interface of the Triton models, and helpers to read and write it.

Pure numpy (no ``triton_python_backend_utils``), so the model adapters stay thin and everything
here is unit-testable without a server. The frontend can import this module too (it is cheap:
numpy and the standard library only).

Ensemble ``chroma`` (see README.md ("Serving on Triton") for the full table):

    inputs   messages [1] BYTES (JSON), user_audio [-1] BYTES (optional), prompt_audio [1] BYTES
             (optional), prompt_text [1] BYTES (optional), max_tokens [1] INT32, temperature [1] FP32,
             top_k [1] INT32, top_p [1] FP32, seed [1] INT64 (all optional)
    outputs  text [1] BYTES, audio [-1] FP32, finish_reason [1] BYTES, usage [3] INT32

Errors: a Triton error whose message contains ``invalid request: ...`` (the client's fault) or
``internal error: ...``. Triton's ensemble scheduler puts ``in ensemble 'chroma', `` in front of
a composing model's message, so clients should use :func:`classify_error` rather than
``startswith``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidRequestError

INVALID_PREFIX = "invalid request: "
INTERNAL_PREFIX = "internal error: "

SAMPLE_RATE = 24000

# ensemble inputs
MESSAGES = "messages"
USER_AUDIO = "user_audio"
PROMPT_AUDIO = "prompt_audio"
PROMPT_TEXT = "prompt_text"
SAMPLING_INPUTS = {  # name -> (numpy dtype, Triton dtype)
    "max_tokens": (np.int32, "INT32"),
    "temperature": (np.float32, "FP32"),
    "top_k": (np.int32, "INT32"),
    "top_p": (np.float32, "FP32"),
    "seed": (np.int64, "INT64"),
}
# ensemble outputs
TEXT = "text"
AUDIO = "audio"
FINISH_REASON = "finish_reason"
USAGE = "usage"
# internal tensors
AUDIO_EMBEDS = "audio_embeds"
AUDIO_TOKEN_COUNTS = "audio_token_counts"
PROMPT_CODES = "prompt_codes"
VOICE_TEXT = "voice_text"
AUDIO_CODES = "audio_codes"
CONTEXT_FRAMES = "context_frames"
START_FRAME = "start_frame"
STREAM_KEY = "stream_key"

FINISH_REASONS = ("stop", "length", "cancelled")

_ENSEMBLE_PREFIX = re.compile(r"^(in ensemble '[^']*', )+")


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def error_message(exc: BaseException) -> str:
    """The message a model sends for ``exc``: ``invalid request: ...`` or ``internal error: ...``."""
    if isinstance(exc, InvalidRequestError) or _is_audio_decode_error(exc):
        return INVALID_PREFIX + str(exc)
    return INTERNAL_PREFIX + (str(exc) or type(exc).__name__)


def classify_error(message: str) -> tuple[str, str]:
    """Triton error text -> (``"invalid_request"`` | ``"internal"``, message without prefixes).

    Strips Triton's ``in ensemble 'NAME', `` prefix(es). Anything without one of our prefixes
    (Triton's own errors, e.g. a wrong input name or dtype) counts as invalid request when Triton
    rejected the request shape, else as internal.
    """
    text = _ENSEMBLE_PREFIX.sub("", str(message).strip())
    # tritonclient renders errors as "[StatusCode.X] message"
    text = re.sub(r"^\[StatusCode\.\w+\]\s*", "", text)
    text = _ENSEMBLE_PREFIX.sub("", text)
    if text.startswith(INVALID_PREFIX):
        return "invalid_request", text[len(INVALID_PREFIX):]
    if text.startswith(INTERNAL_PREFIX):
        return "internal", text[len(INTERNAL_PREFIX):]
    lowered = text.lower()
    if any(k in lowered for k in ("unexpected inference input", "expected", "unexpected shape", "datatype", "missing")):
        return "invalid_request", text
    return "internal", text


def _is_audio_decode_error(exc: BaseException) -> bool:
    from ..audio_io import AudioDecodeError

    return isinstance(exc, AudioDecodeError)


# ---------------------------------------------------------------------------------------------
# reading inputs
# ---------------------------------------------------------------------------------------------
def as_bytes_list(array: np.ndarray | None) -> list[bytes]:
    """A BYTES tensor (any shape, e.g. [n] or [1, n] from a batching model) -> list of bytes."""
    if array is None:
        return []
    out = []
    for item in np.asarray(array, dtype=object).reshape(-1):
        if isinstance(item, str):
            item = item.encode("utf-8")
        out.append(bytes(item))
    return out


def as_text(array: np.ndarray | None, name: str, default: str | None = None) -> str | None:
    """A one-element BYTES tensor -> str (UTF-8); ``default`` when absent."""
    if array is None:
        return default
    items = as_bytes_list(array)
    if len(items) != 1:
        raise InvalidRequestError(f"{name} must hold exactly one element, got {len(items)}", name)
    try:
        return items[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{name} must be UTF-8 text", name) from None


def as_scalar(array: np.ndarray | None, name: str):
    """A one-element numeric tensor -> Python int/float; None when absent."""
    if array is None:
        return None
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise InvalidRequestError(f"{name} must hold exactly one value, got {flat.size}", name)
    value = flat[0].item()
    if isinstance(value, float) and not np.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, got {value}", name)
    return value


def parse_messages(raw: str) -> list[dict]:
    """The ``messages`` JSON -> list of message dicts (shape checked later by ``normalize_messages``)."""
    try:
        messages = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequestError(f"messages must be a JSON list of chat messages: {exc}", "messages") from None
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty JSON list of chat messages", "messages")
    return messages


def resolve_audio_parts(messages: list[dict], num_audio: int) -> tuple[list[dict], list[int]]:
    """Turn ``{"type": "audio", "audio_index": i}`` parts into the form ``normalize_messages``
    takes (``{"type": "audio", "audio": i}``), checking each index against ``user_audio``.

    Returns (messages, referenced indices in order of appearance)."""
    out, used = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(m["content"]):
            if isinstance(part, dict) and part.get("type") in ("audio", "input_audio"):
                where = f"messages[{i}].content[{j}]"
                idx = part.get("audio_index")
                if not isinstance(idx, int) or isinstance(idx, bool):
                    raise InvalidRequestError(
                        f"{where}: an audio part must be {{\"type\": \"audio\", \"audio_index\": i}} with i the "
                        f"position of the clip in user_audio", where)
                if not 0 <= idx < num_audio:
                    raise InvalidRequestError(
                        f"{where}: audio_index {idx} is out of range; the request carries {num_audio} "
                        f"user_audio clip(s)", where)
                parts.append({"type": "audio", "audio": idx})
                used.append(idx)
            else:
                parts.append(part)
        out.append({**m, "content": parts})
    return out, used


# ---------------------------------------------------------------------------------------------
# writing outputs
# ---------------------------------------------------------------------------------------------
def bytes_tensor(*items: str | bytes) -> np.ndarray:
    return np.array([i.encode("utf-8") if isinstance(i, str) else i for i in items], dtype=np.object_)


@dataclass
class LMResponse:
    """One streamed response of ``chroma_lm``."""

    text: str = ""
    codes: np.ndarray | None = None  # [context + new, K]
    context_frames: int = 0
    start_frame: int = 0  # the stream's index of the chunk's first new frame
    finish_reason: str = ""
    usage: tuple[int, int, int] = (0, 0, 0)
    final: bool = False

    def tensors(self, num_codebooks: int, stream_key: str) -> dict[str, np.ndarray]:
        """The response's output tensors. The four codec_decoder inputs carry a leading batch
        dimension of 1: codec_decoder is a batching model (its dynamic batcher groups the chunks of
        many streams into one decode)."""
        codes = self.codes if self.codes is not None else np.zeros((0, num_codebooks), np.int32)
        return {
            TEXT: bytes_tensor(self.text),
            AUDIO_CODES: np.ascontiguousarray(codes, dtype=np.int32)[None],
            CONTEXT_FRAMES: np.array([[self.context_frames]], np.int32),
            START_FRAME: np.array([[self.start_frame]], np.int32),
            FINISH_REASON: bytes_tensor(self.finish_reason),
            USAGE: np.array(self.usage, np.int32),
            STREAM_KEY: bytes_tensor(stream_key)[None],
        }

    @property
    def new_frames(self) -> int:
        return 0 if self.codes is None else len(self.codes) - self.context_frames


def ensemble_inputs(messages: Any, user_audio: list[bytes] = (), prompt_audio: bytes | None = None,
                    prompt_text: str | None = None, **sampling) -> dict[str, np.ndarray]:
    """Client-side helper: the arrays to send to ``chroma`` (names -> numpy), optional ones left out
    when not given. ``messages`` may be a list (JSON-encoded here) or a JSON string."""
    raw = messages if isinstance(messages, (str, bytes)) else json.dumps(messages)
    out = {MESSAGES: bytes_tensor(raw)}
    if user_audio:
        out[USER_AUDIO] = np.array([bytes(a) for a in user_audio], dtype=np.object_)
    if prompt_audio is not None:
        out[PROMPT_AUDIO] = np.array([bytes(prompt_audio)], dtype=np.object_)
    if prompt_text is not None:
        out[PROMPT_TEXT] = bytes_tensor(prompt_text)
    for name, value in sampling.items():
        if value is None:
            continue
        if name not in SAMPLING_INPUTS:
            raise TypeError(f"unknown sampling input {name!r}; choose from {sorted(SAMPLING_INPUTS)}")
        out[name] = np.array([value], SAMPLING_INPUTS[name][0])
    return out


def triton_dtype(array: np.ndarray) -> str:
    if array.dtype == np.object_:
        return "BYTES"
    return {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
            np.dtype(np.bool_): "BOOL"}[array.dtype]
