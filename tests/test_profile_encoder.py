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
                          "--device", "cpu", "--conversations", "2", "--turns", "3", "--history", "1", "--batch", "2",
                          "--threads", "2", "--reps", "3", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    # no GPU: log-mels on the CPU, with one preparing thread and with two
    assert [(s["features_device"], s["prepare_threads"]) for s in report["settings"]] == [("cpu", 1), ("cpu", 2)]
    for setting in report["settings"]:
        assert setting["requests"] == 6 and setting["batches"] == 3  # each turn of both conversations together
        # a conversation's turns send 1, 2, 2 clips (at most one earlier): one new per turn, the
        # earlier one from the cache; the warm-up's two turns of two conversations before them
        assert setting["clip_counts"] == {"embedded": 2 * 2 + 2 * 3, "reused": 2 * 1 + 2 * 2, "shared": 0}
        stages = setting["stage_ms_per_request"]
        assert set(stages) == {"voice", "features", "tower", "output"} and all(v > 0 for v in stages.values())
        assert 0 < setting["batch_wall_ms_p50"] <= setting["batch_wall_ms_max"]
    assert report["one_clip"][0]["features_device"] == "cpu" and report["one_clip"][0]["ms_p50"] > 0
    assert "| cpu | 1 | 6 |" in run.stdout and "| cpu | 2 | 6 |" in run.stdout
