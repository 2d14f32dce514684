"""Conversation in, reply text and speech out, in one process (no server).

`ChromaPipeline` wires the pieces the Triton models split between them: audio decoding and the
audio tower (user speech), Mimi encoding through the voice cache (reference voice), the prompt
builder, the engine, and Mimi decoding. The offline command and the tests use it directly.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .audio_io import content_hash, decode_audio
from .engine import AudioChunk, ChromaEngine, EngineOptions, Finished, GenerationRequest, RequestFailed, SamplingParams, TextDelta
from .errors import InvalidRequestError
from .model.loading import ChromaParts, load_parts
from .processor import PromptBuilder, normalize_messages
from .voice_cache import VoiceCache, bytes_key

MAX_USER_AUDIO_SECONDS = 300.0
MAX_PROMPT_AUDIO_SECONDS = 60.0


@dataclass
class GenerationResult:
    text: str
    codes: np.ndarray  # [frames, K]
    audio: np.ndarray  # float32 mono at sample_rate
    sample_rate: int
    finish_reason: str
    prompt_tokens: int
    text_tokens: int
    frames: int
    chunks: list[AudioChunk] = field(default_factory=list, repr=False)

    @property
    def audio_seconds(self) -> float:
        return len(self.audio) / self.sample_rate


class ChromaPipeline:
    def __init__(self, parts: ChromaParts, options: EngineOptions | None = None, voice_cache_size: int = 64):
        self.parts = parts
        self.cfg = parts.config
        self.prompts = PromptBuilder(parts.tokenizer, parts.special.audio)
        self.voices = VoiceCache(voice_cache_size)
        self.engine = ChromaEngine(parts, options).start()

    @classmethod
    def from_pretrained(cls, model_path, *, base_qwen_path=None, device="cpu", options: EngineOptions | None = None):
        return cls(load_parts(model_path, base_qwen_path=base_qwen_path, device=device), options)

    def close(self) -> None:
        self.engine.shutdown()

    # -- inputs -------------------------------------------------------------------------------
    def reference_codes(self, prompt_audio: Any) -> np.ndarray:
        codec = self.parts.codec
        if isinstance(prompt_audio, (bytes, bytearray, memoryview)):
            key = bytes_key(prompt_audio)
        elif isinstance(prompt_audio, (str, Path)):
            key = bytes_key(Path(prompt_audio).read_bytes()) if Path(prompt_audio).is_file() else str(prompt_audio)
        else:
            wav = decode_audio(prompt_audio, codec.sample_rate, max_seconds=MAX_PROMPT_AUDIO_SECONDS)
            key = content_hash(wav, codec.sample_rate)

        def encode() -> np.ndarray:
            wav = decode_audio(prompt_audio, codec.sample_rate, max_seconds=MAX_PROMPT_AUDIO_SECONDS)
            codes = codec.encode(wav)
            if len(codes) == 0:
                raise InvalidRequestError("prompt_audio is too short to hold one 80 ms frame", "prompt_audio")
            return codes

        return self.voices.get_or_encode(key, encode)

    def prepare(self, messages, prompt_audio, prompt_text: str, sampling: SamplingParams | None = None) -> GenerationRequest:
        template_msgs, audios = normalize_messages(messages)
        tower = self.parts.audio_tower
        embeds = [tower.embed(decode_audio(a, tower.sampling_rate, max_seconds=MAX_USER_AUDIO_SECONDS)) for a in audios]
        ids = self.prompts.thinker_ids(template_msgs, [e.shape[0] for e in embeds])
        if not isinstance(prompt_text, str) or not prompt_text.strip():
            raise InvalidRequestError("prompt_text (the transcript of prompt_audio) must be a non-empty string", "prompt_text")
        return GenerationRequest(
            thinker_ids=ids,
            prompt_text_ids=self.prompts.text_ids(prompt_text),
            prompt_codes=self.reference_codes(prompt_audio),
            audio_embeds=torch.cat(embeds) if embeds else None,
            sampling=sampling or SamplingParams(),
            request_id=uuid.uuid4().hex,
        )

    # -- generation ---------------------------------------------------------------------------
    def stream(self, request: GenerationRequest) -> Iterator[TextDelta | AudioChunk | Finished]:
        """Engine events; a failure is raised (RequestFailed.exception(): InvalidRequestError, CapacityError or EngineError)."""
        stream = self.engine.submit(request)
        try:
            for event in stream:
                if isinstance(event, RequestFailed):
                    raise event.exception()
                yield event
        finally:
            stream.cancel()  # no-op once finished; frees the row if the caller stopped early

    def generate(self, messages, prompt_audio, prompt_text, sampling: SamplingParams | None = None) -> GenerationResult:
        request = self.prepare(messages, prompt_audio, prompt_text, sampling)
        chunks, text, finished = [], [], None
        for event in self.stream(request):
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, AudioChunk):
                chunks.append(event)
            elif isinstance(event, Finished):
                finished = event
        k = self.cfg.num_codebooks
        codes = np.concatenate([c.codes[c.context_frames:] for c in chunks]) if chunks else np.zeros((0, k), np.int64)
        return GenerationResult(
            text="".join(text), codes=codes, audio=self.parts.codec.decode(codes), sample_rate=self.cfg.sample_rate,
            finish_reason=finished.reason, prompt_tokens=finished.prompt_tokens, text_tokens=finished.text_tokens,
            frames=finished.audio_frames, chunks=chunks,
        )
