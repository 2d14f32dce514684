"""scripts/profile_encoder.py on the tiny checkpoint (CPU): conversations through the audio
encoder's service, its clip cache reusing the resent clips, and the stages accounted for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_profile_encoder_times_a_conversations_stages(tiny_checkpoint, tmp_path):
    out = tmp_path / "encoder.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_encoder.py"), "--model", str(tiny_checkpoint),
                          "--device", "cpu", "--conversations", "2", "--turns", "3", "--history", "1", "--reps", "3",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    (setting,) = report["settings"]  # no GPU: the CPU alone
    assert setting["features_device"] == "cpu" and setting["requests"] == 6
    # a conversation's turns send 1, 2, 2 clips (at most one earlier): one new per turn, the earlier
    # one from the cache; the warm-up's two turns before them: 2 new, 1 reused
    assert setting["clip_counts"] == {"embedded": 2 + 2 * 3, "reused": 1 + 2 * 2}
    stages = setting["stage_ms_per_request"]
    assert set(stages) == {"voice", "features", "tower", "output"} and all(v > 0 for v in stages.values())
    assert sum(stages.values()) <= setting["wall_ms_mean"]
    assert report["one_clip"][0]["features_device"] == "cpu" and report["one_clip"][0]["ms_p50"] > 0
    assert "| cpu | 6 |" in run.stdout
