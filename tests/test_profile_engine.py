"""scripts/profile_engine.py on the tiny checkpoint (CPU): the engine's thread runs the profiler
between steps, marks its steps and batched prefills, and the report ties CPU ops to them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def test_profile_engine_reports_steps_and_prefills(tiny_checkpoint, tmp_path):
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_engine.py"), "--model", str(tiny_checkpoint),
                          "--device", "cpu", "--rows", "4", "--steady-s", "0.3", "--steady-frames", "400",  # outlasts the windows at ~18 ms a step
                          "--prefills", "1,3", "--prefill-rounds", "2", "--set", "max_prefills_per_step=3",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["options"]["max_batch"] == 4 and report["options"]["max_prefills_per_step"] == 3
    steady = report["steady"]
    assert steady["rows"] == 4 and steady["rows_at_end"] == 4  # profiled with every row running
    step = steady["ranges"]["chroma.step"]
    assert step["count"] >= 2 and step["count"] == steady["window"]["steps"]
    assert step["cpu_ops"] > 100 and any(op["op"] == "aten::mm" for op in step["top_cpu_ops_ms"])
    assert 0 < step["wall_ms_median"] < steady["profiled_s"] * 1000
    ranges = report["prefill"]["ranges"]
    assert "chroma.prefill[1]" in ranges  # a lone request: a prefill of one
    assert sum(r["count"] for r in ranges.values()) == report["prefill"]["prefills"]
    assert sum(int(name[len("chroma.prefill["):-1]) * r["count"] for name, r in ranges.items()) == 2 * (1 + 3)
    assert "steady chroma.step" in run.stdout and "prefill chroma.prefill[1]" in run.stdout


def test_new_turns_take_their_history_from_the_thinker_prefix_cache(tiny_checkpoint, tmp_path):
    """--prefill-new-turns with the thinker prefix cache: the turn before is stored first, and every
    request of the groups, its last clip its own, prefills only what follows the shared history
    (a rest graph's padded bucket, run eagerly on the CPU)."""
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_engine.py"), "--model", str(tiny_checkpoint),
                          "--device", "cpu", "--rows", "0", "--prefills", "1,2", "--prefill-rounds", "2",
                          "--prefill-turns", "3", "--prefill-new-turns", "--set", "max_prefills_per_step=2",
                          "--set", "thinker_prefix_cache_mib=16", "--set", "thinker_prefix_min_tokens=64",
                          "--set", "prefill_graphs=true", "--thinker-max-len", "1024", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    prompts = json.loads(out.read_text())["prefill"]["prompts"]
    assert prompts["prefill_prefix_prompts"] == 2 * (1 + 2) == prompts["prefill_prefix_graph_prompts"], prompts
    assert prompts["prefill_graph_prompts"] + prompts["prefill_eager_prompts"] == 0
    assert prompts["prefill_prefix_tokens"] >= 6 * 64
    assert "prefill phase's prompts:" in run.stdout


def test_an_engine_gone_idle_is_woken_to_stop_the_profiler(tiny_checkpoint, tmp_path):
    """Requests that end before the profiled window does: the engine's thread, waiting for work,
    is given a short request so that it comes round to stop the profiler; the report says how many
    rows were still running."""
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_engine.py"), "--model", str(tiny_checkpoint),
                          "--device", "cpu", "--rows", "2", "--steady-s", "1.5", "--steady-frames", "12",
                          "--settle-s", "0", "--prefills", "", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    steady = json.loads(out.read_text())["steady"]
    assert steady["rows_at_end"] == 0 and steady["ranges"]["chroma.step"]["count"] >= 1


def test_chrome_trace_reading():
    from profile_engine import self_times, summarize_ranges, union_us

    assert union_us([(0, 10), (5, 15), (20, 30)]) == 25
    ops = [{"ts": 0, "dur": 10}, {"ts": 1, "dur": 4}, {"ts": 2, "dur": 1}, {"ts": 6, "dur": 3}]
    assert self_times(ops) == {0: 3, 1: 3, 2: 1, 3: 3}
    trace = {"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": "chroma.step", "tid": 1, "ts": 0, "dur": 100},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 1, "dur": 20},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "tid": 2, "ts": 1, "dur": 50},  # another thread
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "tid": 1, "ts": 30, "dur": 5, "args": {"correlation": 7}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "tid": 1, "ts": 40, "dur": 50, "args": {"correlation": 8}},
        {"ph": "X", "cat": "kernel", "name": "gemv", "ts": 35, "dur": 30, "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "gemv", "ts": 60, "dur": 30, "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "other", "ts": 35, "dur": 30, "args": {"correlation": 99}},
    ]}
    r = summarize_ranges(trace, "chroma.step")["chroma.step"]
    assert r["count"] == 1 and r["cpu_ops"] == 1 and r["top_cpu_ops_ms"] == [{"op": "aten::mm", "ms": 0.02}]
    assert r["kernels"] == 2 and r["gpu_ms"] == 0.06 and r["gpu_busy_ms"] == 0.055
    assert r["host_sync_ms"] == 0.05 and r["launches"] == {"cudaGraphLaunch": 1, "cudaStreamSynchronize": 1}
