"""The offline command, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent


def generate(*args, model=None):
    cmd = [sys.executable, "-m", "chroma_triton", "generate", "--audio", str(ROOT / "assets/question_audio.wav"), *args]
    if model:
        cmd += ["--model", str(model)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    return proc


def test_same_seed_same_bytes_and_duration(tiny_checkpoint, tmp_path):
    outs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        out = tmp_path / f"{name}.wav"
        proc = generate("--prompt-audio", str(ROOT / "assets/ref_audio.wav"),
                        "--prompt-text", (ROOT / "assets/ref_audio.txt").read_text().strip(),
                        "--seed", str(seed), "--max-tokens", "20", "--out", str(out), model=tiny_checkpoint)
        assert proc.returncode == 0, proc.stderr
        line = json.loads(proc.stdout.strip().splitlines()[-1])
        assert set(line) >= {"text", "audio_seconds", "frames", "finish_reason"}
        info = sf.info(str(out))
        assert info.samplerate == 24000 and info.channels == 1
        assert info.frames == line["frames"] * 1920
        assert abs(line["audio_seconds"] - line["frames"] * 0.08) < 1e-6
        assert line["finish_reason"] in ("stop", "length")
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_demo_checkpoint_is_loudly_labelled(tmp_path):
    out = tmp_path / "demo.flac"
    proc = generate("--text", "hello", "--seed", "1", "--max-tokens", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "NOISE" in proc.stderr and "demo checkpoint" in proc.stderr
    assert sf.info(str(out)).format == "FLAC"


def test_prompt_audio_without_text_is_refused(tmp_path):
    proc = generate("--prompt-audio", str(ROOT / "assets/ref_audio.wav"), "--out", str(tmp_path / "x.wav"))
    assert proc.returncode != 0 and "go together" in proc.stderr


def test_bad_audio_file_is_a_clear_error(tiny_checkpoint, tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all")
    proc = subprocess.run([sys.executable, "-m", "chroma_triton", "generate", "--model", str(tiny_checkpoint),
                           "--audio", str(junk), "--out", str(tmp_path / "o.wav")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
