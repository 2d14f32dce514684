"""Audio that arrives in a request: base64, ``data:`` URIs and allow-listed local files.

The frontend never decodes audio (Triton's ``audio_encoder`` does); it turns each reference into
the file's bytes, and checks cheaply that the bytes are audio of an acceptable length
(:func:`chroma_triton.audio_io.audio_duration` reads only the header).

Local paths are the seed server's convenience (``"audio": "assets/question_audio.wav"``) and a
way to read any file the server can: so they are accepted only inside the folders given with
``--allowed-local-media-path``.  A path is resolved (symlinks and ``..`` included) before it is
checked, so neither traversal nor a symlink leads outside; with no folder configured no path is
read at all.  A relative path is looked up against the working directory the server started in,
each allowed folder and each allowed folder's parent, so ``assets/question_audio.wav`` works
whatever directory the server was started from when ``assets/`` is allowed.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
import sys
from pathlib import Path
from typing import Iterable

from chroma_triton.audio_io import AudioDecodeError, audio_duration

from .errors import InvalidRequest, PayloadTooLarge

PATH_MAX = 4096
_DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
_ENCODE_HINT = "send the audio file's bytes base64-encoded, or as a data: URI (data:audio/wav;base64,...)"


def _compact(value: str) -> str:
    """``value`` without whitespace (str.split's set, as the regex ``\\s``; 14x faster than it)."""
    return "".join(value.split())


if sys.version_info >= (3, 11):
    def _a2b_strict(text: str) -> bytes:
        """``base64.b64decode(text, validate=True)`` without its ASCII copy of ``text`` first
        (binascii reads an ASCII str in place): 0.2 ms less per 285 kB clip under the frontend's
        allocator setting, where that copy's fresh pages are the cost."""
        return binascii.a2b_base64(text, strict_mode=True)
else:  # pragma: no cover - Python 3.10 has no strict mode in binascii
    def _a2b_strict(text: str) -> bytes:
        return base64.b64decode(text, validate=True)


def _strict_base64(value: str) -> bytes | None:
    """The bytes of strict base64 (standard alphabet, length a multiple of 4, at most two '=' at
    the end; whitespace and line breaks are ignored), or None. The usual unbroken string is decoded
    as it is: removing whitespace first with a regex, over every character while holding the GIL
    the event loop's thread needs too, made the plan of the bench's request with its two clips
    inline take 8.2-8.5 ms instead of 1.1 ms (scripts/bench_frontend.py; docs/benchmarks.md,
    session 12)."""
    for text in (value, None):
        if text is None:
            text = _compact(value)
            if text == value:
                return None
        try:
            data = _a2b_strict(text)
        except (binascii.Error, ValueError):  # ValueError: a non-ASCII character
            continue
        # Python's strict decoder also takes surplus '=' after a complete group ("AAAA=")
        return data if len(text) % 4 == 0 and not text.endswith("===") else None
    return None


def decode_base64(value: str, param: str) -> bytes:
    """Strict base64 (see _strict_base64)."""
    data = _strict_base64(value)
    if data is None:
        raise InvalidRequest(f"{param} is not valid base64 ({_base64_problem(_compact(value))}); {_ENCODE_HINT}",
                             param=param, code="invalid_base64")
    return _not_empty(data, param)


def _not_empty(data: bytes, param: str) -> bytes:
    if not data:
        raise InvalidRequest(f"{param} is empty; {_ENCODE_HINT}", param=param, code="invalid_audio")
    return data


def _base64_problem(compact: str) -> str:
    """Why ``compact`` (no whitespace) is not strict base64, in the client's terms."""
    bad = next((c for c in compact.rstrip("=") if not (c.isascii() and (c.isalnum() or c in "+/"))), None)
    if bad is not None:
        return f"it contains {bad!r}, which is not a base64 character"
    if len(compact) % 4:
        return f"its length {len(compact)} is not a multiple of 4: padding missing or data cut short"
    if len(compact) - len(compact.rstrip("=")) > 2:
        return "it ends in more than two '='"
    try:
        base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        return str(exc)
    return "invalid base64"  # pragma: no cover - every other string decodes


def decode_data_uri(value: str, param: str) -> bytes:
    match = _DATA_URI.match(value)
    if match is None or not match.group("b64"):
        raise InvalidRequest(f"{param} is a malformed data URI; expected data:audio/<type>;base64,<data>",
                             param=param, code="invalid_base64")
    mime = (match.group("type") or "").lower()
    if mime and not (mime.startswith("audio/") or mime == "application/octet-stream"):
        raise InvalidRequest(f"{param} is a data URI of type {mime!r}; send audio (data:audio/wav;base64,...)",
                             param=param, code="invalid_audio")
    return decode_base64(value[match.end():], param)


class MediaResolver:
    """Turns audio references into bytes; owns the local-path allow-list and the size limit."""

    def __init__(self, allowed_roots: Iterable[str | os.PathLike], *, max_bytes: int):
        roots = []
        for root in allowed_roots:
            resolved = Path(os.path.realpath(os.path.expanduser(root)))
            if not resolved.is_dir():
                raise ValueError(f"--allowed-local-media-path {root!r} is not a directory")
            roots.append(resolved)
        self.roots: tuple[Path, ...] = tuple(dict.fromkeys(roots))
        self.max_bytes = max_bytes
        # the working directory at start-up: asking for it per request failed every path request
        # with a 500 (FileNotFoundError) once that folder had been removed or replaced (a redeploy)
        self.cwd = Path.cwd()

    # -- the three ways audio is given ---------------------------------------------------------
    def from_openai(self, data: str, param: str) -> bytes:
        """``input_audio.data``: base64 (as OpenAI) or a data URI."""
        return decode_data_uri(data, param) if data.startswith("data:") else decode_base64(data, param)

    def from_url(self, url: str, param: str) -> bytes:
        """``audio_url.url``: a data URI, ``file://`` or a plain path; no network fetches."""
        if url.startswith("data:"):
            return decode_data_uri(url, param)
        if re.match(r"[a-z][a-z0-9+.-]*://", url, re.I) and not url.startswith("file://"):
            raise InvalidRequest(f"{param}: remote URLs are not fetched by this server; {_ENCODE_HINT}",
                                 param=param, code="unsupported_url")
        return self.read_local(url.removeprefix("file://"), param)

    def from_seed(self, value: str, param: str) -> bytes:
        """The seed's strings: a data URI, a file in the allowed folders, else base64."""
        if value.startswith("data:"):
            return decode_data_uri(value, param)
        if value.startswith("file://"):
            return self.read_local(value[len("file://"):], param)
        if re.match(r"https?://", value, re.I):
            raise InvalidRequest(f"{param}: remote URLs are not fetched by this server; {_ENCODE_HINT}",
                                 param=param, code="unsupported_url")
        if _could_be_path(value) and self.roots:
            found = self._find(value)
            if isinstance(found, Path):
                return self._read(found, value, param)
        data = _strict_base64(value)
        if data is not None:
            return _not_empty(data, param)
        if not _could_be_path(value):
            return decode_base64(value, param)  # raises with the base64 problem
        # Neither base64 nor a readable file: say what fits best.
        b64_problem = _base64_problem(_compact(value))
        if not self.roots:
            raise InvalidRequest(
                f"{param} is not valid base64 ({b64_problem}), and this server reads no local files "
                f"(it was started without --allowed-local-media-path); {_ENCODE_HINT}",
                param=param, code="invalid_base64")
        if self._find(value) == "outside":
            raise self._not_allowed(value, param)
        raise InvalidRequest(
            f"{param}: {value!r} is neither a file in this server's allowed media folders nor valid base64 "
            f"({b64_problem}); give a path like 'assets/question_audio.wav' or {_ENCODE_HINT}",
            param=param, code="file_not_found")

    # -- local files -----------------------------------------------------------------------
    def read_local(self, value: str, param: str) -> bytes:
        if not self.roots:
            raise InvalidRequest(
                f"{param}: local file paths are disabled on this server (start it with "
                f"--allowed-local-media-path DIR); {_ENCODE_HINT}", param=param, code="local_path_not_allowed")
        if not _could_be_path(value):
            raise InvalidRequest(f"{param}: {value[:64]!r} is not a usable file path", param=param)
        found = self._find(value)
        if found == "outside":
            raise self._not_allowed(value, param)
        if found is None:
            raise InvalidRequest(f"{param}: file {value!r} not found in this server's allowed media folders",
                                 param=param, code="file_not_found")
        return self._read(found, value, param)

    def _find(self, value: str) -> Path | str | None:
        """The file ``value`` names inside an allowed root; "outside" when every reading of it
        leaves the roots; None when it would be inside but no such file exists."""
        raw = Path(os.path.expanduser(value))
        bases = [self.cwd, *self.roots, *(r.parent for r in self.roots)] if not raw.is_absolute() else [Path("/")]
        inside = escapes = False
        for base in dict.fromkeys(bases):
            try:
                candidate = Path(os.path.realpath(base / raw))
                if not any(candidate.is_relative_to(root) for root in self.roots):
                    # Something there that resolves outside (e.g. a symlink in an allowed folder)?
                    lexical = os.path.normpath(base / raw)
                    escapes |= any(Path(lexical).is_relative_to(r) for r in self.roots) and os.path.lexists(lexical)
                    continue
                inside = True
                if candidate.is_file():
                    return candidate
            except (OSError, ValueError):  # a name too long for the file system, ...
                continue
        # A path that climbs ("..") or starts at "/" or "~" and names no file inside: refused as
        # leaving the folders, whichever base would have put it back inside.
        if escapes or not inside or raw.is_absolute() or ".." in raw.parts:
            return "outside"
        return None

    def _read(self, path: Path, value: str, param: str) -> bytes:
        size = path.stat().st_size
        if size > self.max_bytes:
            raise PayloadTooLarge(f"{param}: file {value!r} is {size} bytes, the limit is {self.max_bytes}",
                                  param=param)
        if size == 0:
            raise InvalidRequest(f"{param}: file {value!r} is empty", param=param, code="invalid_audio")
        return path.read_bytes()

    @staticmethod
    def _not_allowed(value: str, param: str) -> InvalidRequest:
        return InvalidRequest(
            f"{param}: local path {value!r} is outside the folders this server may read "
            f"(--allowed-local-media-path); use a file inside them, or {_ENCODE_HINT}",
            param=param, code="local_path_not_allowed")


def _could_be_path(value: str) -> bool:
    return 0 < len(value) <= PATH_MAX and "\x00" not in value and "\n" not in value


def check_audio(data: bytes, param: str, max_seconds: float) -> float:
    """Duration of ``data`` in seconds from its header; 400 when it is not audio, a WAV file cut
    short, or too long."""
    try:
        seconds = audio_duration(data)
    except AudioDecodeError as exc:
        raise InvalidRequest(f"{param}: {exc}", param=param, code="invalid_audio") from None
    missing = wav_missing_bytes(data)
    if missing:
        raise InvalidRequest(
            f"{param}: the WAV file is truncated: its header promises {missing} more bytes of samples than it "
            f"holds (an upload cut short?); send the whole file", param=param, code="invalid_audio")
    cut = ogg_truncation(data) or mp3_truncation(data)
    if cut:
        raise InvalidRequest(f"{param}: {cut} (an upload cut short?); send the whole file", param=param,
                             code="invalid_audio")
    if seconds > max_seconds:
        raise InvalidRequest(
            f"{param}: audio is {seconds:.1f} s long, the limit is {max_seconds:g} s; send a shorter clip",
            param=param, code="audio_too_long")
    return seconds


#: Data sizes that streaming WAV writers put in the header when the length is not known yet.
_UNKNOWN_WAV_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)


def wav_missing_bytes(data: bytes) -> int:
    """How many bytes of sample data a RIFF/WAVE file's ``data`` chunk promises beyond the end of
    ``data``; 0 for complete files, for other formats, and for headers that leave the length open.

    libsndfile (and so the engine) silently decodes the part of a truncated WAV that is there, so
    a cut-off upload would be answered as if it were the whole question; this catches it.
    """
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return 0
    order = "<" if data[:4] == b"RIFF" else ">"
    offset = 12
    while offset + 8 <= len(data):
        chunk_id = data[offset:offset + 4]
        (size,) = struct.unpack(order + "I", data[offset + 4:offset + 8])
        if chunk_id == b"data":
            if size in _UNKNOWN_WAV_SIZES:
                return 0
            return max(0, size - (len(data) - offset - 8))
        offset += 8 + size + (size & 1)  # chunks are padded to an even size
    return 0


# -- truncated OGG and MP3 ---------------------------------------------------------------------------
# libsndfile decodes the part of a cut OGG or MP3 file that is there (a shorter clip, no error), so
# the frontend checks the containers' own framing: an OGG file ends with a complete page flagged
# "end of stream"; an MP3 file's last frame is complete, and its Xing/Info header (LAME writes one)
# says how many frames and bytes follow.


def ogg_truncation(data: bytes) -> str | None:
    """Why an OGG file is cut short, or None (complete, not OGG, or damaged in a way the decoder
    will report itself)."""
    if data[:4] != b"OggS":
        return None
    offset, ended = 0, False
    while offset < len(data):
        if data[offset:offset + 4] != b"OggS":
            return None  # not a page boundary: corrupt rather than cut; libsndfile decides
        if offset + 27 > len(data):
            return "the OGG file is truncated: its last page header is cut"
        segments = data[offset + 26]
        if offset + 27 + segments > len(data):
            return "the OGG file is truncated: its last page header is cut"
        body = sum(data[offset + 27:offset + 27 + segments])
        end = offset + 27 + segments + body
        if end > len(data):
            return f"the OGG file is truncated: its last page lacks {end - len(data)} bytes"
        ended = bool(data[offset + 5] & 0x04)
        offset = end
    return None if ended else "the OGG file is truncated: it ends without an end-of-stream page"


_L3_KBPS = {1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
            2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)}
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mp3_frame(data: bytes, offset: int) -> tuple[int, int, int] | None:
    """(frame length, MPEG version bits, channel mode) of an MPEG audio layer III frame header."""
    if offset + 4 > len(data) or data[offset] != 0xFF or data[offset + 1] & 0xE0 != 0xE0:
        return None
    b1, b2 = data[offset + 1], data[offset + 2]
    version, layer, kbps_index, rate_index = (b1 >> 3) & 3, (b1 >> 1) & 3, b2 >> 4, (b2 >> 2) & 3
    if version == 1 or layer != 1 or kbps_index in (0, 15) or rate_index == 3:
        return None  # not layer III (or free format): not checked
    kbps = _L3_KBPS[1 if version == 3 else 2][kbps_index]
    length = (144 if version == 3 else 72) * kbps * 1000 // _MPEG_RATES[version][rate_index] + ((b2 >> 1) & 1)
    return length, version, data[offset + 3] >> 6


def mp3_truncation(data: bytes) -> str | None:
    """Why an MP3 (MPEG-1/2/2.5 layer III) file is cut short, or None."""
    offset = 0
    if data[:3] == b"ID3" and len(data) >= 10:
        offset = 10 + ((data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]) + (10 if data[5] & 0x10 else 0)
    first = _mp3_frame(data, offset)
    if first is None:
        return None
    start, frames, promised = offset, 0, None
    length, version, mode = first
    side = (32 if mode != 3 else 17) if version == 3 else (17 if mode != 3 else 9)
    tag = offset + 4 + side
    if data[tag:tag + 4] in (b"Xing", b"Info") and tag + 8 <= len(data):
        flags = int.from_bytes(data[tag + 4:tag + 8], "big")
        field = tag + 8
        if flags & 1 and field + 4 <= len(data):
            promised = {"frames": int.from_bytes(data[field:field + 4], "big")}
            field += 4
        if flags & 2 and field + 4 <= len(data):
            promised = {**(promised or {}), "bytes": int.from_bytes(data[field:field + 4], "big")}
        offset += length  # the tag frame holds no audio
    while offset < len(data):
        frame = _mp3_frame(data, offset)
        if frame is None:
            break  # a trailing tag (ID3v1 "TAG", APE) or damage: not a cut
        if offset + frame[0] > len(data):
            return f"the MP3 file is truncated: its last frame lacks {offset + frame[0] - len(data)} bytes"
        frames += 1
        offset += frame[0]
    if promised and promised.get("frames", 0) > frames:
        return f"the MP3 file is truncated: its header promises {promised['frames']} frames, it holds {frames}"
    if promised and promised.get("bytes", 0) > len(data) - start:
        return (f"the MP3 file is truncated: its header promises {promised['bytes']} bytes, "
                f"it holds {len(data) - start}")
    return None
