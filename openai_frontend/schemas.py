"""Request and response models: the seed server's API and OpenAI's audio-chat API in one schema.

Only syntax is checked here (types, ranges, known names); rules that need more than one field
or the server's state (both-or-neither prompt, voices, files, durations) live in
:mod:`openai_frontend.media` and :mod:`openai_frontend.chat`.  Validation errors become
400 ``invalid_request_error`` bodies whose ``param`` is the offending field (``app.py``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chroma_triton.audio_io import SUPPORTED_OUTPUT_FORMATS

MAX_INT32 = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_MESSAGES = 256

#: Output formats a client may ask for; "pcm" is an alias of OpenAI's "pcm16".
OUTPUT_FORMATS: tuple[str, ...] = SUPPORTED_OUTPUT_FORMATS
FORMAT_ALIASES = {"pcm": "pcm16"}
#: Formats accepted in ``input_audio.format`` (decoding sniffs the bytes; this only catches typos).
INPUT_FORMATS = ("wav", "mp3", "flac", "ogg", "opus")


def normalize_output_format(value: str) -> str:
    fmt = FORMAT_ALIASES.get(value.lower(), value.lower())
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unsupported audio format {value!r}; use one of: {', '.join(OUTPUT_FORMATS)}")
    return fmt


class _Model(BaseModel):
    # Unknown fields are ignored, as the seed server and most OpenAI-compatible servers do.
    # Strict types, as OpenAI's API: "10" is not an integer and "yes" not a boolean (an integer
    # is still accepted where a number is expected).
    model_config = ConfigDict(extra="ignore", strict=True)


# -- content parts ------------------------------------------------------------------------------
class TextPart(_Model):
    type: Literal["text"]
    text: str


class SeedAudioPart(_Model):
    """The seed server's audio part: base64, a ``data:`` URI, or a local path (allow-listed)."""

    type: Literal["audio"]
    audio: str = Field(description="base64 audio file, data URI, or a path inside --allowed-local-media-path")


class InputAudio(_Model):
    data: str = Field(description="base64-encoded audio file (a data URI is accepted too)")
    format: str | None = Field(None, description="wav, mp3, flac, ogg or opus (informative: the bytes are sniffed)")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in INPUT_FORMATS:
            raise ValueError(f"unsupported input audio format {value!r}; use one of: {', '.join(INPUT_FORMATS)}")
        return value


class InputAudioPart(_Model):
    """OpenAI's audio input part."""

    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURL(_Model):
    url: str = Field(description="data URI or a path inside --allowed-local-media-path; remote URLs are not fetched")


class AudioURLPart(_Model):
    """The ``audio_url`` part some OpenAI-compatible servers (vLLM) accept."""

    type: Literal["audio_url"]
    audio_url: AudioURL


ContentPart = Annotated[Union[TextPart, SeedAudioPart, InputAudioPart, AudioURLPart], Field(discriminator="type")]


class AssistantAudioRef(_Model):
    id: str = Field(description="id of an audio reply this server gave earlier (message.audio.id)")


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    audio: AssistantAudioRef | None = Field(None, description="assistant turns only: refer to an earlier audio reply")
    name: str | None = None


# -- request options ----------------------------------------------------------------------------
class AudioOutput(_Model):
    """OpenAI's ``audio`` parameter: which voice speaks and the file format of the reply."""

    voice: str = Field("default", description="a named voice of this server (GET /v1/voices)")
    format: str = Field("wav", description=f"one of {', '.join(OUTPUT_FORMATS)} ('pcm' = 'pcm16')")

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        return normalize_output_format(value)


class StreamOptions(_Model):
    include_usage: bool | None = False


class ChatCompletionRequest(_Model):
    """``POST /v1/chat/completions``: the seed's fields, OpenAI's audio-chat fields, and ``top_k``."""

    model: str = Field(description="'chroma' (GET /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    # Seed fields.
    prompt_text: str | None = Field(None, description="transcript of prompt_audio; give both or neither")
    prompt_audio: str | None = Field(None, description="reference voice clip: base64, data URI or allowed local path")
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32, description="audio frames of 80 ms (default 1000)")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    return_audio: bool | None = True
    audio_format: str | None = Field("wav", description="format of the top-level 'audio' (seed field)")
    stream: bool | None = False
    # OpenAI fields.
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutput | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32, description="wins over max_tokens")
    n: int | None = Field(1, description="only 1 is supported")
    user: str | None = None
    # Extension.
    top_k: int | None = Field(None, ge=0, le=MAX_INT32, description="0 disables; default: the checkpoint's")
    # Accepted only at their neutral values: anything else would be silently ignored otherwise.
    stop: Union[str, list[str], None] = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None

    @field_validator("audio_format")
    @classmethod
    def _audio_format(cls, value: str | None) -> str | None:
        return None if value is None else normalize_output_format(value)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError(f"only n=1 is supported (one reply per request), got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _no_stop(cls, value):
        if value:
            raise ValueError("stop sequences are not supported by this model; remove 'stop'")
        return None

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value:
            raise ValueError("penalties are not supported by this model; remove it or set it to 0")
        return None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value:
            raise ValueError("logprobs are not supported by this model; remove it or set it to false")
        return None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value):
        if value:
            raise ValueError("tools are not supported by this model; remove 'tools'")
        return None

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "chroma",
                    "messages": [{"role": "user", "content": [{"type": "audio", "audio": "assets/question_audio.wav"}]}],
                    "max_tokens": 100,
                },
                {
                    "model": "chroma",
                    "modalities": ["text", "audio"],
                    "audio": {"voice": "default", "format": "wav"},
                    "messages": [{"role": "user", "content": [
                        {"type": "input_audio", "input_audio": {"data": "<base64 wav>", "format": "wav"}}]}],
                },
            ]
        },
    )


# -- responses ----------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class MessageAudio(BaseModel):
    id: str
    data: str = Field(description="base64 audio file in 'format'")
    format: str
    transcript: str
    expires_at: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = Field(description="the reply transcript")
    audio: MessageAudio | None = None
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str
    logprobs: None = None


class CompletionTokensDetails(BaseModel):
    text_tokens: int
    audio_tokens: int = Field(description="audio frames of 80 ms")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="text tokens + audio frames")
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    audio: str | None = Field(None, description="seed field: base64 audio file in audio_format")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chroma"
    root: str | None = None
    parent: str | None = None
    permission: list = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["healthy", "unhealthy"]
    model_loaded: bool
    detail: str | None = None


class VoiceCard(BaseModel):
    id: str
    object: Literal["voice"] = "voice"
    transcript: str
    duration_seconds: float


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoiceCard]
