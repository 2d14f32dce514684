"""Audio decoding and encoding shared by the engine, the Triton models and the OpenAI frontend.

Everything that enters the server as audio (uploaded files, reference voices, arrays from Python
callers) goes through :func:`decode_audio`, which returns float32 mono samples in [-1, 1] at the
rate the caller asks for, or raises :class:`AudioDecodeError` with a message that can be shown to
the client as is.  Everything that leaves the server goes through :func:`encode_audio`.

Only numpy, soundfile (libsndfile) and soxr are used, so this module is cheap to import in the
frontend process, which never loads torch.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from dataclasses import dataclass
from typing import Union

import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "Audio",
    "AudioDecodeError",
    "AudioInput",
    "SUPPORTED_OUTPUT_FORMATS",
    "audio_duration",
    "content_hash",
    "decode_audio",
    "encode_audio",
]

_ACCEPTED_HINT = "send a WAV, FLAC, OGG or MP3 file"
_NO_SAMPLES = "audio has no samples (0 s long); send a recording with speech in it"
# libsndfile reports bad input as LibsndfileError (a RuntimeError); soundfile's own checks of what
# libsndfile returns can raise the others.  Callers are promised AudioDecodeError only.
_READ_ERRORS = (RuntimeError, ValueError, TypeError, EOFError, OSError)
_MAX_CHANNELS = 8

# Output format -> (libsndfile container, subtype, sample rates the codec accepts or None for any).
_CODECS = {
    "wav": ("WAV", "PCM_16", None),
    "flac": ("FLAC", "PCM_16", None),
    "ogg": ("OGG", "VORBIS", None),
    "opus": ("OGG", "OPUS", (8000, 12000, 16000, 24000, 48000)),
    "mp3": ("MP3", "MPEG_LAYER_III", (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)),
}

#: Formats :func:`encode_audio` can write with the installed libsndfile ("pcm16" is raw int16).
SUPPORTED_OUTPUT_FORMATS: tuple[str, ...] = tuple(
    fmt for fmt, (container, subtype, _) in _CODECS.items() if subtype in sf.available_subtypes(container)
) + ("pcm16",)


class AudioDecodeError(ValueError):
    """The input is not usable audio; the message says what is wrong and what to send instead."""


@dataclass(frozen=True)
class Audio:
    """Samples that are already decoded, with their sample rate.

    ``samples`` is 1-D (mono) or 2-D with a channel axis of at most 8 entries, either
    (frames, channels) as soundfile returns it or (channels, frames) as torch does.
    Float samples are taken to be in [-1, 1]; integer samples are scaled by their type's range.
    """

    samples: np.ndarray
    rate: int


#: What :func:`decode_audio` and :func:`audio_duration` accept: encoded bytes, a file path,
#: or decoded samples as :class:`Audio` or an ``(samples, rate)`` tuple.
AudioInput = Union[bytes, bytearray, memoryview, str, os.PathLike, Audio, tuple]


def decode_audio(data: AudioInput, target_rate: int, *, max_seconds: float | None = None) -> np.ndarray:
    """Decode ``data`` to float32 mono samples in [-1, 1] at ``target_rate``.

    Channels are averaged, the rate is converted with soxr (quality "HQ").  A file that libsndfile
    can read only in part (a WAV or MP3 cut short) gives what is there; one it cannot read at all
    (a FLAC or OGG cut short, garbage) raises.  ``max_seconds`` bounds the input duration; for
    files only that much is decoded before the input is rejected.

    Raises:
        AudioDecodeError: empty, unreadable, zero-length, non-finite or too long input, or an
            unsupported array shape or sample type.
    """
    _check_rate(target_rate, "target_rate")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds!r}")
    if isinstance(data, (Audio, tuple)):
        frames, rate = _array_frames(data)
    else:
        frames, rate = _read_file(data, max_seconds)
    mono = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
    _check_samples(mono, rate, max_seconds)
    if rate != target_rate:
        mono = soxr.resample(mono, rate, target_rate, quality="HQ")
    return np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False)


def audio_duration(data: AudioInput) -> float:
    """Return the duration of ``data`` in seconds.

    Files are not decoded: the duration comes from the header (libsndfile's ``info``), so for a
    truncated file it is the length the header promises.

    Raises:
        AudioDecodeError: empty, unreadable or zero-length input, or an unsupported array.
    """
    if isinstance(data, (Audio, tuple)):
        frames, rate = _array_frames(data)
        n = len(frames)
    else:
        source, head = _file_source(data)
        try:
            info = sf.info(source)
        except _READ_ERRORS as exc:
            raise _unreadable_error(head, exc) from exc
        n, rate = info.frames, info.samplerate
    if n == 0:
        raise AudioDecodeError(_NO_SAMPLES)
    return n / rate


def encode_audio(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """Encode float samples in [-1, 1] as ``fmt`` (one of :data:`SUPPORTED_OUTPUT_FORMATS`).

    ``samples`` is 1-D (mono) or (frames, channels).  Values are clipped to [-1, 1] first, so
    overshoot saturates instead of wrapping around.  "wav" and "flac" are PCM16, "ogg" is Vorbis,
    "opus" is Opus in OGG, "pcm16" is headerless little-endian int16 (interleaved if several
    channels).  Opus and MP3 accept only some rates; other rates are resampled to the nearest
    higher accepted one (or the highest), and the container records the rate used.

    Raises:
        ValueError: an unsupported format, a bad rate, non-finite samples or more than 2 dimensions.
    """
    fmt = fmt.lower()
    if fmt not in SUPPORTED_OUTPUT_FORMATS:
        raise ValueError(f"unsupported output format {fmt!r}; supported: {', '.join(SUPPORTED_OUTPUT_FORMATS)}")
    _check_rate(rate, "rate")
    if fmt == "pcm16":
        return to_pcm16(samples).tobytes()
    x = _checked_float32(samples)
    x = np.clip(x, -1.0, 1.0)
    container, subtype, rates = _CODECS[fmt]
    codec_rate = _codec_rate(rate, rates)
    if codec_rate != rate:
        x = soxr.resample(x, rate, codec_rate, quality="HQ")
    buf = io.BytesIO()
    sf.write(buf, x, codec_rate, format=container, subtype=subtype)
    return buf.getvalue()


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] as little-endian int16 (x 32767, rounded half to even, clipped).

    Streaming calls this once per audio event on the frontend's event loop, so it makes one float
    temporary and the int16 array, and checks for NaN and infinity through the minimum and maximum
    (which carry them) instead of a mask: allocations of this size are mapped afresh there.

    Raises:
        ValueError: non-finite samples or more than 2 dimensions.
    """
    x = _checked_float32(samples)
    y = np.clip(x, -1.0, 1.0)  # the one temporary; scaled and rounded in place
    np.multiply(y, np.float32(32767.0), out=y)
    np.rint(y, out=y)
    return y.astype("<i2", order="C")  # C order whatever the input's: callers take its buffer


def _checked_float32(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"samples must be 1-D or (frames, channels), got shape {x.shape}")
    if x.size and not (np.isfinite(x.min()) and np.isfinite(x.max())):
        raise ValueError("samples contain NaN or infinity")
    return x


def content_hash(samples: np.ndarray, rate: int) -> str:
    """Return a sha256 hex digest of ``rate``, the shape and the float32 samples.

    Used as a cache key for reference voices: equal audio gives equal keys whatever its dtype,
    and any change to a sample or to the rate gives a different key.
    """
    x = np.ascontiguousarray(samples, dtype="<f4")
    digest = hashlib.sha256(f"{int(rate)}:{x.shape}:".encode())
    digest.update(x.tobytes())
    return digest.hexdigest()


def _check_rate(rate: int, name: str) -> None:
    if isinstance(rate, bool) or int(rate) != rate or rate <= 0:
        raise ValueError(f"{name} must be a positive integer (Hz), got {rate!r}")


def _codec_rate(rate: int, accepted: tuple[int, ...] | None) -> int:
    """The rate to encode at: ``rate`` if the codec takes it, else the next higher one it takes."""
    if accepted is None or rate in accepted:
        return rate
    return next((r for r in accepted if r > rate), accepted[-1])


def _file_source(data) -> tuple[io.BytesIO | str, bytes]:
    """Return something soundfile can open for ``data`` and its first bytes (for error messages)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if memoryview(data).nbytes == 0:
            raise AudioDecodeError(f"audio is empty (0 bytes); {_ACCEPTED_HINT}")
        buf = io.BytesIO(data)
        head = buf.read(16)
        buf.seek(0)
        return buf, head
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not os.path.isfile(path):
            raise AudioDecodeError(f"audio file not found: {path!r}")
        with open(path, "rb") as f:
            head = f.read(16)
        if not head:
            raise AudioDecodeError(f"audio file {path!r} is empty (0 bytes); {_ACCEPTED_HINT}")
        return path, head
    if isinstance(data, np.ndarray):
        raise AudioDecodeError("a bare array has no sample rate; pass Audio(samples, rate) or (samples, rate)")
    raise AudioDecodeError(
        f"cannot read audio from {type(data).__name__}; pass encoded bytes, a file path, Audio(samples, rate) "
        "or (samples, rate)"
    )


def _read_file(data, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Decode an encoded file (bytes or path) to float32 (frames, channels) and its rate.

    With ``max_seconds``, at most one frame past the limit is decoded, so an over-long upload
    costs no more than the limit to reject.
    """
    source, head = _file_source(data)
    try:
        with sf.SoundFile(source) as f:
            rate, declared = f.samplerate, f.frames
            limit = None if max_seconds is None else math.floor(max_seconds * rate)
            frames = f.read(-1 if limit is None else limit + 1, dtype="float32", always_2d=True)
    except _READ_ERRORS as exc:
        raise _unreadable_error(head, exc) from exc
    if limit is not None and len(frames) > limit:
        raise _too_long_error(max(declared, len(frames)) / rate, max_seconds)
    return frames, rate


def _array_frames(data: Audio | tuple) -> tuple[np.ndarray, int]:
    """Convert decoded samples to float32 (frames, channels) and validate the rate."""
    if isinstance(data, tuple):
        if len(data) != 2:
            raise AudioDecodeError(f"expected a (samples, rate) tuple, got a tuple of {len(data)} items")
        data = Audio(*data)
    try:
        _check_rate(data.rate, "sample rate")
    except (TypeError, ValueError) as exc:
        raise AudioDecodeError(f"invalid sample rate {data.rate!r}; give the rate in Hz as a positive integer") from exc
    try:
        samples = np.asarray(data.samples)
    except ValueError as exc:  # ragged nested lists
        raise AudioDecodeError(f"samples are not a rectangular array ({exc})") from exc
    x = _to_float32(samples)
    return _frames_by_channels(x), int(data.rate)


def _to_float32(x: np.ndarray) -> np.ndarray:
    """Scale samples to float32 in [-1, 1]: floats as they are, integers by their type's range."""
    kind = x.dtype.kind
    if kind == "f":
        return x.astype(np.float32, copy=False)
    if kind in "iu":
        half_range = float(2 ** (8 * x.dtype.itemsize - 1))
        offset = half_range if kind == "u" else 0.0  # unsigned PCM (uint8) is centred on half its range
        return ((x - offset) / half_range).astype(np.float32)
    raise AudioDecodeError(f"unsupported sample type {x.dtype}; use float32 in [-1, 1] or int16")


def _frames_by_channels(x: np.ndarray) -> np.ndarray:
    """Return ``x`` as (frames, channels); the channel axis of a 2-D array is the shorter one."""
    if x.ndim == 1:
        return x[:, None]
    if x.ndim == 2 and min(x.shape) <= _MAX_CHANNELS:
        return x if x.shape[1] <= x.shape[0] else x.T
    raise AudioDecodeError(
        f"unsupported audio array shape {x.shape}; use 1-D (mono) or 2-D with at most "
        f"{_MAX_CHANNELS} channels, (frames, channels) or (channels, frames)"
    )


def _check_samples(mono: np.ndarray, rate: int, max_seconds: float | None) -> None:
    if mono.size == 0:
        raise AudioDecodeError(_NO_SAMPLES)
    if not np.isfinite(mono).all():
        raise AudioDecodeError("audio contains NaN or infinite samples; send finite samples in [-1, 1]")
    if max_seconds is not None and len(mono) / rate > max_seconds:
        raise _too_long_error(len(mono) / rate, max_seconds)


def _too_long_error(seconds: float, max_seconds: float) -> AudioDecodeError:
    return AudioDecodeError(
        f"audio is too long: {seconds:.2f} s, the limit is {max_seconds:g} s; send a shorter clip"
    )


def _sniff_format(head: bytes) -> str | None:
    """Name the container by its magic bytes (only the formats we advertise), or None."""
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "WAV"
    if head[:4] == b"fLaC":
        return "FLAC"
    if head[:4] == b"OggS":
        return "OGG"
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "MP3"
    return None


def _reason(exc: Exception) -> str:
    """libsndfile's own words, without soundfile's "Error opening <_io.BytesIO object at 0x…>: "
    prefix (an object representation means nothing to a client)."""
    text = getattr(exc, "error_string", None) or str(exc)
    text = re.sub(r"^Error opening <[^>]*>: ", "", str(text))
    return re.sub(r"<_io\.\w+ object at 0x[0-9a-fA-F]+>", "the data", text).strip() or type(exc).__name__


def _unreadable_error(head: bytes, exc: Exception) -> AudioDecodeError:
    """Explain why libsndfile could not read a file, using its magic bytes to guess what it is."""
    fmt = _sniff_format(head)
    if fmt is not None:
        return AudioDecodeError(
            f"could not decode the {fmt} audio, the file looks truncated or corrupt ({_reason(exc)}); "
            f"re-encode it or {_ACCEPTED_HINT}"
        )
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return AudioDecodeError(
            f"data is text, not an audio file (it starts with {head[:12]!r}); base64-encoded audio "
            f"must be decoded first; {_ACCEPTED_HINT}"
        )
    return AudioDecodeError(f"data is not a recognised audio file (it starts with {head[:8]!r}); {_ACCEPTED_HINT}")
