"""Tests for chroma_triton.audio_io: decoding, encoding, errors, hashing and the committed assets."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from chroma_triton.audio_io import (
    SUPPORTED_OUTPUT_FORMATS,
    Audio,
    AudioDecodeError,
    audio_duration,
    content_hash,
    decode_audio,
    encode_audio,
)

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
SOURCE_RATE = 44100
LOSSLESS = ("wav", "flac")
# Encoder delay/padding an MP3 or Vorbis decoder may leave in, in source frames
# (one MP3 granule pair + decoder delay); libsndfile trims it when the LAME tag is present.
CODEC_SLACK_FRAMES = 1152 + 529


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def stereo_sine(seconds: float = 1.0) -> np.ndarray:
    """440 Hz in both channels at different levels: (frames, 2) at 44.1 kHz, mono mean amplitude 0.4."""
    s = sine(440, seconds, SOURCE_RATE, 1.0)
    return np.stack([0.6 * s, 0.2 * s], axis=1)


def peak_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def wav_bytes(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "opus", "mp3"])
@pytest.mark.parametrize("target_rate", [16000, 24000])
def test_round_trip_stereo_44k_to_mono(fmt, target_rate):
    data = encode_audio(stereo_sine(1.0), SOURCE_RATE, fmt)
    y = decode_audio(data, target_rate)

    assert y.dtype == np.float32 and y.ndim == 1
    slack = 2 if fmt in LOSSLESS else CODEC_SLACK_FRAMES * target_rate // SOURCE_RATE
    assert abs(len(y) - target_rate) <= slack
    assert abs(peak_frequency(y, target_rate) - 440) < 2
    assert rms(y) == pytest.approx(0.4 / np.sqrt(2), rel=0.05)  # mean of 0.6 and 0.2 amplitude
    assert np.abs(y).max() <= 1.0


@pytest.mark.parametrize("fmt", [f for f in SUPPORTED_OUTPUT_FORMATS if f != "pcm16"])
def test_encode_audio_output_is_readable(fmt):
    x = sine(300, 0.5, 24000)
    data = encode_audio(x, 24000, fmt)
    info = sf.info(io.BytesIO(data))
    expected = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG", "opus": "OGG", "mp3": "MP3"}[fmt]
    assert info.format == expected
    assert info.samplerate == 24000 and info.channels == 1
    assert audio_duration(data) == pytest.approx(0.5, abs=0.03)


def test_supported_output_formats_with_installed_libsndfile():
    # libsndfile >= 1.1 writes MP3 and Opus; the soundfile wheel bundles such a build.
    assert set(SUPPORTED_OUTPUT_FORMATS) == {"wav", "flac", "ogg", "opus", "mp3", "pcm16"}


def test_encode_resamples_to_a_rate_the_codec_accepts():
    data = encode_audio(sine(440, 0.5, 22050), 22050, "opus")
    assert sf.info(io.BytesIO(data)).samplerate == 24000
    assert abs(peak_frequency(decode_audio(data, 16000), 16000) - 440) < 3


def test_pcm16_is_raw_little_endian_int16():
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1.7, -3.0], dtype=np.float32)
    data = encode_audio(x, 24000, "pcm16")
    assert len(data) == 2 * len(x)
    assert np.frombuffer(data, "<i2").tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767]


def test_to_pcm16_matches_clip_then_scale_then_round():
    """The streaming path's int16 conversion (one temporary, no mask) gives the same samples as the
    plain formula, rounding halves to even, at the clip edges, in 2-D and for no samples."""
    from chroma_triton.audio_io import to_pcm16

    rng = np.random.default_rng(0)
    halves = (np.arange(-40, 40, dtype=np.float32) + 0.5) / np.float32(32767.0)
    edges = np.array([1.0, -1.0, 1.0000001, -1.0000001, 3e38, -3e38, 0.0, -0.0], dtype=np.float32)
    for x in (rng.standard_normal(48_000).astype(np.float32) * 0.7, halves, edges,
              rng.standard_normal((500, 2)).astype(np.float32), rng.standard_normal((2, 500)).astype(np.float32).T,
              np.zeros(0, np.float32)):
        expected = np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2")
        got = to_pcm16(x)
        assert got.dtype == np.dtype("<i2") and got.shape == x.shape and np.array_equal(got, expected)
        assert got.flags.c_contiguous and bytes(memoryview(got).cast("B")) == expected.tobytes()
    for bad in (np.float32(np.inf), np.float32(-np.inf), np.float32(np.nan)):
        x = np.zeros(100, np.float32)
        x[37] = bad
        for fmt in ("pcm16", "wav"):
            with pytest.raises(ValueError, match="NaN or infinity"):
                encode_audio(x, 24000, fmt)


def test_encode_clips_instead_of_wrapping():
    x = np.full(1000, 1.5, dtype=np.float32)
    y = decode_audio(encode_audio(x, 16000, "wav"), 16000)
    assert np.allclose(y, 1.0, atol=1e-4)


def test_encode_rejects_unknown_format_listing_supported():
    with pytest.raises(ValueError, match="supported: wav, flac"):
        encode_audio(sine(440, 0.1, 16000), 16000, "aac")


@pytest.mark.parametrize(
    "samples, rate, match",
    [
        (np.array([0.0, np.nan]), 16000, "NaN"),
        (np.zeros((2, 2, 2)), 16000, "1-D or"),
        (np.zeros(10), 0, "positive integer"),
    ],
)
def test_encode_rejects_bad_input(samples, rate, match):
    with pytest.raises(ValueError, match=match):
        encode_audio(samples, rate, "wav")


# --- decoding details --------------------------------------------------------------------------


@pytest.mark.parametrize("source_rate, target_rate", [(44100, 16000), (8000, 24000), (48000, 24000)])
def test_resampling_keeps_frequency_and_length(source_rate, target_rate):
    y = decode_audio(Audio(sine(440, 1.0, source_rate), source_rate), target_rate)
    assert len(y) == target_rate
    assert abs(peak_frequency(y, target_rate) - 440) < 1.5
    assert rms(y[100:-100]) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_same_rate_is_unchanged():
    x = sine(440, 0.2, 24000)
    y = decode_audio((x, 24000), 24000)
    assert np.array_equal(x, y) and y is not x


def test_stereo_is_averaged_in_either_layout():
    left, right = np.full(100, 0.6, np.float32), np.full(100, -0.2, np.float32)
    frames_first = decode_audio(Audio(np.stack([left, right], axis=1), 16000), 16000)
    channels_first = decode_audio(Audio(np.stack([left, right], axis=0), 16000), 16000)
    assert np.allclose(frames_first, 0.2) and np.allclose(channels_first, 0.2)


@pytest.mark.parametrize(
    "samples, expected",
    [
        (np.array([16384, -32768, 0], dtype=np.int16), [0.5, -1.0, 0.0]),
        (np.array([2**30, -(2**31)], dtype=np.int32), [0.5, -1.0]),
        (np.array([128, 0, 192], dtype=np.uint8), [0.0, -1.0, 0.5]),
        (np.array([0.25, -0.25], dtype=np.float64), [0.25, -0.25]),
    ],
)
def test_integer_samples_are_scaled(samples, expected):
    y = decode_audio((samples, 8000), 8000)
    assert y.dtype == np.float32
    assert np.allclose(y, expected)


def test_float_overshoot_is_clipped():
    assert decode_audio((np.array([1.5, -2.0, 0.5]), 8000), 8000).tolist() == [1.0, -1.0, 0.5]


def test_int16_wav_file_matches_its_samples():
    x = np.array([0, 8192, -16384, 32767], dtype=np.int16)
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="WAV", subtype="PCM_16")
    assert np.allclose(decode_audio(buf.getvalue(), 16000), x / 32768.0)


def test_accepts_bytearray_memoryview_str_and_pathlike(tmp_path):
    data = wav_bytes(sine(440, 0.25, 16000), 16000)
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    expected = decode_audio(data, 16000)
    for source in (bytearray(data), memoryview(data), str(path), path):
        assert np.array_equal(decode_audio(source, 16000), expected)


def test_truncated_wav_decodes_what_is_there():
    data = wav_bytes(sine(440, 1.0, 16000), 16000)
    y = decode_audio(data[: 44 + 2 * 8000], 16000)  # header + the first 0.5 s
    assert len(y) == 8000


def test_audio_duration():
    x = sine(440, 1.5, 16000)
    assert audio_duration(wav_bytes(x, 16000)) == pytest.approx(1.5)
    assert audio_duration(encode_audio(x, 16000, "mp3")) == pytest.approx(1.5, abs=0.05)
    assert audio_duration(Audio(x, 16000)) == pytest.approx(1.5)
    assert audio_duration((np.zeros((2, 24000)), 24000)) == pytest.approx(1.0)


def test_max_seconds_accepts_audio_within_the_limit():
    assert len(decode_audio(wav_bytes(sine(440, 2.0, 16000), 16000), 16000, max_seconds=2.0)) == 32000


def test_module_import_does_not_load_torch():
    code = "import sys, chroma_triton.audio_io; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- errors ------------------------------------------------------------------------------------


def _decode_error(data, **kwargs) -> str:
    with pytest.raises(AudioDecodeError) as info:
        decode_audio(data, 16000, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("empty", [b"", bytearray(), memoryview(b"")])
def test_empty_bytes(empty):
    msg = _decode_error(empty)
    assert "empty (0 bytes)" in msg and "WAV, FLAC, OGG or MP3" in msg
    with pytest.raises(AudioDecodeError, match="empty"):
        audio_duration(empty)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert "empty (0 bytes)" in _decode_error(empty)
    assert "not found" in _decode_error(tmp_path / "missing.wav")


def test_bytes_that_are_not_audio():
    noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    assert "not a recognised audio file" in _decode_error(noise)
    with pytest.raises(AudioDecodeError, match="not a recognised audio file"):
        audio_duration(noise)


def test_text_gets_a_base64_hint():
    assert "base64" in _decode_error(b"UklGRiQAAABXQVZFZm10IBAAAAABAAEA")


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_truncated_compressed_file_is_a_clear_error(fmt):
    data = encode_audio(stereo_sine(1.0), SOURCE_RATE, fmt)
    msg = _decode_error(data[: len(data) // 2])
    assert f"could not decode the {fmt.upper()} audio" in msg and "truncated or corrupt" in msg


def test_header_only_wav_is_a_clear_error():
    msg = _decode_error(wav_bytes(sine(440, 1.0, 16000), 16000)[:30])
    assert "could not decode the WAV audio" in msg
    assert "object at 0x" not in msg and "Error opening" not in msg, msg  # libsndfile's reason, no repr


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "opus", "mp3"])
def test_corrupt_files_never_raise_other_exception_types(fmt):
    data = encode_audio(stereo_sine(0.5), SOURCE_RATE, fmt)
    rng = np.random.default_rng(1)
    for _ in range(20):
        broken = bytearray(data[: rng.integers(1, len(data))])
        for i in rng.integers(0, len(broken), 10):
            broken[i] = rng.integers(0, 256)
        try:
            y = decode_audio(bytes(broken), 16000)
        except AudioDecodeError:
            continue
        assert y.dtype == np.float32 and np.isfinite(y).all()


def test_zero_length_audio():
    assert "no samples" in _decode_error(wav_bytes(np.zeros(0, np.float32), 16000))
    assert "no samples" in _decode_error(Audio(np.zeros(0, np.float32), 16000))
    with pytest.raises(AudioDecodeError, match="no samples"):
        audio_duration(wav_bytes(np.zeros(0, np.float32), 16000))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(bad):
    x = sine(440, 0.1, 16000)
    x[10] = bad
    assert "NaN or infinite" in _decode_error(Audio(x, 16000))


def test_too_long_file_gives_limit_and_duration():
    msg = _decode_error(wav_bytes(sine(440, 3.0, 16000), 16000), max_seconds=2)
    assert "too long: 3.00 s" in msg and "limit is 2 s" in msg


def test_too_long_array_gives_limit_and_duration():
    msg = _decode_error(Audio(sine(440, 2.5, 8000), 8000), max_seconds=1.5)
    assert "too long: 2.50 s" in msg and "limit is 1.5 s" in msg


@pytest.mark.parametrize(
    "data, match",
    [
        (Audio(np.zeros((2, 3, 100)), 16000), "unsupported audio array shape"),
        (Audio(np.zeros((100, 20)), 16000), "unsupported audio array shape"),
        (Audio(np.float32(0.5), 16000), "unsupported audio array shape"),
        (Audio(np.zeros(100, dtype=np.complex64), 16000), "unsupported sample type"),
        (Audio(np.zeros(100, dtype=bool), 16000), "unsupported sample type"),
        (Audio([[0.0, 0.1], [0.2]], 16000), "not a rectangular array"),
        (Audio(np.zeros(100), 0), "invalid sample rate"),
        (Audio(np.zeros(100), 16000.5), "invalid sample rate"),
        ((np.zeros(100), 16000, 1), "tuple of 3 items"),
        (np.zeros(100), "no sample rate"),
        (12345, "cannot read audio from int"),
    ],
)
def test_unsupported_inputs(data, match):
    assert match in _decode_error(data)


# --- content hash ------------------------------------------------------------------------------


def test_content_hash_is_stable_and_sensitive():
    x = sine(440, 0.5, 24000)
    key = content_hash(x, 24000)
    assert len(key) == 64 and key == content_hash(x.copy(), 24000)
    assert key == content_hash(x.astype(np.float64), 24000)  # same audio, other dtype
    changed = x.copy()
    changed[100] += 1e-3
    assert content_hash(changed, 24000) != key
    assert content_hash(x, 16000) != key
    assert content_hash(x[:-1], 24000) != key


# --- committed assets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, rate, min_s, max_s",
    [("question_audio.wav", 16000, 3.0, 4.5), ("ref_audio.wav", 24000, 5.0, 8.0)]
    + [(f"voices/{v}.wav", 24000, 4.0, 8.0) for v in ("default", "bright", "deep")],
)
def test_assets(name, rate, min_s, max_s):
    path = ASSETS / name
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (rate, 1, "PCM_16")
    assert min_s <= audio_duration(path) <= max_s
    assert path.stat().st_size < 400_000
    assert rms(decode_audio(path, rate)) > 0.01  # speech, not silence
    transcript = path.with_suffix(".txt").read_text(encoding="utf-8")
    lines = transcript.splitlines()
    assert len(lines) == 1 and lines[0] == lines[0].strip() and len(lines[0].split()) >= 5
