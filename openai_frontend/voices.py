"""Named voices: a folder of ``<name>.wav`` clips with ``<name>.txt`` transcripts.

``audio.voice`` picks one; the voice ``default`` is used when a request names no voice and
gives no ``prompt_text``/``prompt_audio``.  The clips are read once at start-up and sent to
Triton with each request (its ``audio_encoder`` caches their codes by content hash, so a voice is
encoded once per server).  Without a ``default`` voice in the folder, empty bytes are sent and
Triton uses its own default voice.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from chroma_triton.audio_io import AudioDecodeError, audio_duration

log = logging.getLogger("openai_frontend")

DEFAULT_VOICE = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")


@dataclass(frozen=True)
class Voice:
    name: str
    audio: bytes
    transcript: str
    duration_seconds: float


class VoiceLibrary:
    def __init__(self, voices: dict[str, Voice]):
        self._voices = dict(sorted(voices.items()))

    @classmethod
    def load(cls, folder: str | Path | None, max_seconds: float) -> "VoiceLibrary":
        """Read every ``<name>.{wav,flac,mp3,ogg}`` + ``<name>.txt`` pair; a bad pair stops start-up."""
        if folder is None:
            return cls({})
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"voices folder {folder} does not exist")
        voices = {}
        for clip in sorted(folder.iterdir()):
            if clip.suffix.lower() not in _AUDIO_SUFFIXES or not _NAME.fullmatch(clip.stem):
                continue
            transcript_file = clip.with_suffix(".txt")
            if not transcript_file.is_file():
                raise ValueError(f"voice {clip.stem!r}: {transcript_file} (the clip's transcript) is missing")
            transcript = transcript_file.read_text(encoding="utf-8").strip()
            if not transcript:
                raise ValueError(f"voice {clip.stem!r}: {transcript_file} is empty")
            data = clip.read_bytes()
            try:
                seconds = audio_duration(data)
            except AudioDecodeError as exc:
                raise ValueError(f"voice {clip.stem!r}: {clip}: {exc}") from exc
            if seconds > max_seconds:
                raise ValueError(f"voice {clip.stem!r}: {clip} is {seconds:.1f} s, longer than {max_seconds:g} s")
            if clip.stem in voices:
                raise ValueError(f"voice {clip.stem!r} has more than one clip in {folder}")
            voices[clip.stem] = Voice(clip.stem, data, transcript, seconds)
        log.info("voices from %s: %s", folder, ", ".join(voices) or "none")
        return cls(voices)

    def names(self) -> list[str]:
        return list(self._voices)

    def get(self, name: str) -> Voice | None:
        return self._voices.get(name)

    def __iter__(self):
        return iter(self._voices.values())

    def __len__(self) -> int:
        return len(self._voices)
