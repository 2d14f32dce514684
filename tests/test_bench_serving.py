"""scripts/bench_serving.py against the real stack (launcher: tritonserver + frontend, tiny demo
checkpoint, CPU), briefly: both paths at 1 and 2 streams, few frames. Checks that the JSON is
complete and internally consistent; no timing thresholds (the numbers depend on the machine)."""

from __future__ import annotations

import base64
import os
import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chroma_triton.bench.procs import cpu_deltas, mentions, role_of
from chroma_triton.bench.stats import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, StreamRecord, all_busy_window, summarize

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 8


def test_workload_with_history_sends_conversations_of_growing_length():
    from chroma_triton.bench.clients import Workload, parse_turns
    from chroma_triton.bench.conversation import HISTORY_REPLY
    from chroma_triton.serving.protocol import MESSAGES, parse_messages, resolve_audio_parts

    plain, history = Workload(), Workload(history_turns=parse_turns("0-2"))
    assert [history.turns(s) for s in range(6)] == [0, 1, 2, 0, 1, 2] and plain.turns(5) == 0
    assert [Workload(history_turns=parse_turns("7")).turns(s) for s in range(3)] == [7, 7, 7]
    assert [Workload(history_turns=(2, 3)).turns(s) for s in range(3)] == [2, 3, 2]
    for bad in ("x", "3-1", "-2", "3-"):
        with pytest.raises(ValueError):
            parse_turns(bad)
    for seed in range(3):
        body = history.chat_body(seed)["messages"]
        assert [m["role"] for m in body] == ["user", "assistant"] * seed + ["user"]
        assert all(m["content"] == HISTORY_REPLY for m in body if m["role"] == "assistant")
        arrays = history.ensemble_arrays(seed)  # every user turn names the one question clip
        messages, used = resolve_audio_parts(parse_messages(arrays[MESSAGES][0].decode()), 1)
        assert len(messages) == 2 * seed + 1 and used == [0] * (seed + 1)
    assert plain.chat_body(4)["messages"] == history.chat_body(3)["messages"]  # the README's request


def test_conversations_grow_by_a_turn_each_round_with_clips_of_their_own():
    import base64
    import io

    import numpy as np
    import soundfile as sf

    from chroma_triton.bench.clients import Sequence, Turn, Workload
    from chroma_triton.serving.protocol import MESSAGES, USER_AUDIO, parse_messages, resolve_audio_parts

    w = Workload(history_turns=(0, 2), conversations=True)
    rounds = [w.user_clips(99, Turn(run=5, stream=3, round=r)) for r in range(4)]
    # stream 3 starts 3 mod 3 = 0 turns deep: min(round, 2) earlier turns, then this one
    assert [len(c) for c in rounds] == [1, 2, 3, 3]
    assert rounds[1][:1] == rounds[0] and rounds[2][:2] == rounds[1]  # a turn resends the earlier clips
    assert rounds[3][:2] == rounds[2][1:]  # ...but the oldest once the window (2 earlier turns) is full
    assert len(set(rounds[2])) == 3  # every turn its own clip
    assert [w.turns(0, Turn(5, s, 0)) for s in range(4)] == [0, 1, 2, 0]  # levels mix shallow and deep ones
    deep = [w.user_clips(99, Turn(run=5, stream=2, round=r)) for r in range(2)]
    assert [len(c) for c in deep] == [3, 3] and deep[1][:2] == deep[0][1:]
    others = w.user_clips(99, Turn(run=5, stream=2, round=2)) + w.user_clips(99, Turn(run=6, stream=3, round=2))
    assert not set(others) & set(rounds[2])  # nor shared with another conversation or run
    original, _ = sf.read(w.question, dtype="int16")
    tagged, rate = sf.read(io.BytesIO(rounds[2][2]), dtype="int16")
    noise = tagged.astype(float) - original
    assert rate == 16000 and len(tagged) == len(original)
    assert 0.005 < np.sqrt(np.mean(noise ** 2) / np.mean(original.astype(float) ** 2)) < 0.02  # a faint hiss (-40 dB)
    body = w.chat_body(7, Turn(5, 3, 2))  # inline on the frontend path too
    sent = [base64.b64decode(m["content"][0]["audio"]) for m in body["messages"] if m["role"] == "user"]
    assert sent == rounds[2]
    arrays = w.ensemble_arrays(7, Turn(5, 3, 2))
    assert list(arrays[USER_AUDIO].reshape(-1)) == rounds[2]
    _, used = resolve_audio_parts(parse_messages(arrays[MESSAGES][0].decode()), 3)
    assert used == [0, 1, 2]
    assert Workload(history_turns=(0, 2)).user_clips(7, Turn(5, 2, 2)) is None  # without conversations: by seed
    # over gRPC each stream names its conversation, started by the run's first round (conversation
    # affinity); a request of no conversation is a sequence of its own, ended at once
    assert [w.sequence(Turn(5, 3, r)) for r in (0, 1)] == [Sequence("bench-5-3", True, False),
                                                            Sequence("bench-5-3", False, False)]
    assert Workload().sequence(Turn(5, 3, 1)) == Sequence("bench-5-3-1", True, True)


def test_tagged_clips_reach_every_row_of_the_embeddings(tiny_checkpoint):
    """What the thinker's prefix cache matches is the audio tower's output: two conversations'
    clips must differ there in every row (in the tower's float32 and in the bf16 served on GPUs),
    and a clip sent again (the next turn resends the history) must give the same rows."""
    import torch

    from chroma_triton.audio_io import decode_audio
    from chroma_triton.bench.clients import Workload, tagged_clip
    from chroma_triton.model.loading import load_parts

    question = Workload().question
    for dtype in (torch.float32, torch.bfloat16):
        tower = load_parts(tiny_checkpoint, parts={"audio_tower"}, dtype=dtype).audio_tower

        def rows(tag: int) -> torch.Tensor:
            wav = decode_audio(tagged_clip(question, tag), tower.sampling_rate, max_seconds=60)
            return tower.embed_many([tower.features(wav)])[0]

        first, again, other = rows(1 << 16), rows(1 << 16), rows(2 << 16)
        assert torch.equal(first, again)
        assert first.shape == other.shape and not (first == other).all(-1).any(), dtype


def test_stream_record_math():
    rec = StreamRecord(sent=10.0)
    rec.add_audio(10.2, 2 * FRAME_SAMPLES)  # first chunk: 160 ms of audio, playback starts at 10.2
    rec.add_audio(10.3, 2 * FRAME_SAMPLES)  # due at 10.36: in time
    rec.add_audio(10.6, 4 * FRAME_SAMPLES)  # due at 10.52: 80 ms late
    rec.add_audio(10.7, 0)  # no audio: not a chunk
    assert rec.ttfa_s == pytest.approx(0.2)
    assert rec.ms_per_frame() == pytest.approx(400 / 6)
    count, worst = rec.underruns()
    assert count == 1 and worst == pytest.approx(80)
    level = summarize([rec, StreamRecord(sent=10.0, error="boom")], 10.0, 11.0)
    assert level["errors"] == 1 and level["ok_streams"] == 1 and level["underrun_streams"] == 1
    assert level["audio_s_total"] == pytest.approx(8 * FRAME_SAMPLES / SAMPLE_RATE)
    assert level["rtf_p50"] == pytest.approx(400 / 6 / FRAME_MS)
    assert rec.late_chunks() == [(2, pytest.approx(80))]
    assert level["underrun_chunk_index_counts"] == {"2": 1} and level["underrun_at_s"] == [pytest.approx(0.6)]


def test_all_busy_window_and_its_throughput():
    def req(stream, rnd, sent, chunks, done):
        rec = StreamRecord(sent=sent, stream=stream, round=rnd, done=done)
        for t in chunks:
            rec.add_audio(t, FRAME_SAMPLES)
        return rec

    # stream 0: two requests back to back (0-4 s, 4-9 s); stream 1: one request, first audio at 2 s, done at 6 s
    records = [req(0, 0, 0.0, [1.0, 2.5, 3.5], 4.0), req(0, 1, 4.0, [5.0, 7.0, 8.5], 9.0),
               req(1, 0, 0.0, [2.0, 3.0, 5.5], 6.0)]
    assert all_busy_window(records) == (2.0, 6.0)  # the last first audio .. the first stream's end
    level = summarize(records, 0.0, 9.0)
    assert level["streams"] == 2 and level["requests"] == 3
    # chunks in (2, 6]: 2.5, 3.5, 5.0 (stream 0) and 3.0, 5.5 (stream 1): 5 frames in 4 s
    assert level["busy_window_s"] == pytest.approx(4.0)
    assert level["audio_s_per_s_all_busy"] == pytest.approx(5 * FRAME_MS / 1000 / 4.0)
    # a stream whose first request failed counts from its first audio; one with no audio is left out
    failed_first = [StreamRecord(sent=0.0, stream=1, round=0, done=0.5, error="boom"), req(1, 1, 0.5, [3.0], 6.0)]
    assert all_busy_window([records[0], records[1], *failed_first]) == (3.0, 6.0)
    assert all_busy_window([records[0], records[1], StreamRecord(sent=0.0, stream=1, error="x")]) == (1.0, 9.0)
    # a stream that ended before another one started: no window
    assert all_busy_window([req(0, 0, 0.0, [0.5], 1.0), req(1, 0, 0.0, [2.0], 3.0)]) is None
    assert summarize([req(0, 0, 0.0, [0.5], 1.0)], 0.0, 1.0)["audio_s_per_s_all_busy"] is None  # window < 1 s


def test_engine_summary_sums_the_instances_counters():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serving_script", ROOT / "scripts" / "bench_serving.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    engine_summary = bench.engine_summary

    level = {"underrun_chunks": 7, "triton_counters_delta": {
        "chroma_lm_prefills_total{chroma_lm}": 3.0, "chroma_lm_prefill_seconds_total{chroma_lm}": 0.3,
        "chroma_lm_prefill_estimate_seconds_total{chroma_lm}": 0.25,
        "chroma_lm_prefill_overrun_seconds_total{chroma_lm}": 0.07,
        "chroma_lm_forced_admissions_total{chroma_lm}": 2.0, "chroma_lm_late_chunks_total{chroma_lm}": 4.0,
        "chroma_lm_late_chunk_seconds_total{chroma_lm}": 0.5, "nv_inference_count{chroma_lm}": 9.0,
        "chroma_lm_gc_full_collections_total{chroma_lm}": 2.0, "chroma_lm_gc_full_seconds_total{chroma_lm}": 0.4,
        "chroma_lm_gc_seconds_total{chroma_lm}": 0.45, "chroma_lm_prefill_graph_prompts_total{chroma_lm}": 5.0,
        "chroma_lm_prefill_eager_prompts_total{chroma_lm}": 1.0, "chroma_lm_prefill_prefix_prompts_total{chroma_lm}": 6.0,
        "chroma_lm_prefill_prefix_tokens_total{chroma_lm}": 1536.0,
        "chroma_lm_prefill_prefix_graph_prompts_total{chroma_lm}": 4.0}}
    assert engine_summary(level) == ("3 prefills (0.30 s; pacer's estimates 0.25 s, overrun 0.07 s), 2 forced "
                                     "admissions, 4 chunks late at the engine (0.50 s in all); client saw 7 late chunk(s); "
                                     "2 full garbage collections (0.40 s; all collections 0.45 s); prompts 5 through "
                                     "graphs, 1 eager, 6 after a stored prefix (4 of them through graphs; 1536 positions reused)")
    assert engine_summary({}).startswith("–")  # nothing scraped is not zero
    copied = {**level, "triton_counters_delta": {**level["triton_counters_delta"],
              "chroma_lm_prefix_imports_total{chroma_lm}": 2.0, "chroma_lm_prefix_import_tokens_total{chroma_lm}": 512.0,
              "chroma_lm_prefix_import_seconds_total{chroma_lm}": 0.004}}  # shared_thinker_prefixes
    assert engine_summary(copied).endswith("1536 positions reused; 2 copied from another instance, 512 positions in "
                                           "0.00 s, 0 thrown away)")
    level["triton_counters_delta"].update({"chroma_lm_thinker_prefix_returns_held_total{chroma_lm}": 42.0,
                                           "chroma_lm_thinker_prefix_returns_dropped_total{chroma_lm}": 5.0})
    level["triton_gauges_peak"] = {"chroma_lm_thinker_prefix_bytes{chroma_lm}": 2 * (1 << 30),  # the scrape sums instances
                                   "chroma_lm_thinker_prefix_bound_bytes{chroma_lm}": 8 * (1 << 30)}
    assert engine_summary(level).endswith("1536 positions reused); thinker prefix cache: 42 turns came back to their "
                                          "stored prompt, 5 to a dropped one, peak 2.00 of 8.00 GiB")


def test_server_process_roles_and_cpu():
    stub = "/opt/tritonserver/backends/python/triton_python_backend_stub"
    assert role_of([stub, "/root/stack-dp1/repo/chroma_lm/1/model.py", "shm", "1048576"]) == "chroma_lm"
    assert role_of(["/usr/local/bin/tritonserver", "--model-repository=/x"]) == "tritonserver"
    assert role_of(["/venv/bin/python", "-m", "openai_frontend", "--port", "8000"]) == "frontend"
    assert role_of(["/venv/bin/python", "-m", "pytest"]) is None and role_of([]) is None
    assert mentions("/root/stack-a/repo/chroma_lm/1/model.py", "/root/stack-a")
    assert mentions("--model-repository=/root/stack-a/repo", "/root/stack-a") and mentions("/root/stack-a", "/root/stack-a/")
    assert not mentions("/root/stack-ab/repo", "/root/stack-a") and not mentions("x/root/stack-a", "/root/stack-a")
    tick = os.sysconf("SC_CLK_TCK")  # what cpu_deltas divides /proc's ticks by
    before = {1: {"role": "chroma_lm", "ticks": 0, "threads": {1: 0, 2: 0}},
              2: {"role": "chroma_lm", "ticks": 0, "threads": {3: 0}},
              3: {"role": "tritonserver", "ticks": 0, "threads": {4: 0}}}
    after = {1: {"role": "chroma_lm", "ticks": 3 * tick, "threads": {1: 2 * tick, 2: tick}},
             2: {"role": "chroma_lm", "ticks": tick, "threads": {3: tick, 9: tick // 2}},  # 9: a thread born mid-level
             3: {"role": "tritonserver", "ticks": 2 * tick, "threads": {4: 2 * tick}},
             4: {"role": "frontend", "ticks": tick, "threads": {}}}  # not there before: left out
    out = cpu_deltas(before, after, wall_s=2.0, top_threads=2)
    assert set(out) == {"chroma_lm", "tritonserver"}
    assert out["chroma_lm"]["processes"] == 2 and out["chroma_lm"]["cpu_s"] == pytest.approx(4.0)
    assert out["chroma_lm"]["cores"] == pytest.approx(2.0)
    assert out["chroma_lm"]["hot_threads_cores"] == [1.0, 0.5]  # the two hottest of both instances
    assert out["tritonserver"]["cores"] == pytest.approx(1.0)


@pytest.mark.triton
def test_bench_serving_against_the_stack(triton_install, tmp_path):
    from chroma_triton.demo import demo_checkpoint

    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_serving.py"), "--start", "--model", str(demo_checkpoint()),
           "--workdir", str(tmp_path / "stack"), "--concurrency", "1,2", "--max-tokens", str(MAX_TOKENS),
           "--warmup", "1", "--no-level-warmup", "--baseline-frames", "3", "--keep-streams", "--out", str(out),
           "--client-procs", "2",  # the 2-stream levels run one stream in each of two client processes
           "--rounds", "2",  # ...each sending two requests one after the other (one stream too)
           "--history-turns", "0-1", "--conversations",  # stream 0 starts with no history, stream 1 one turn deep
           # both paths name their conversations (the frontend by its messages, gRPC by stream)
           "--launcher-arg=--conversation-affinity=on",
           "--server-match", str(tmp_path / "stack")]  # this stack's processes only
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| frontend | 2 x 2 |" in proc.stdout and "| grpc | 1 x 2 |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["history_turns"] == [0, 1] and report["conversations"] is True
    assert "sequence_batching" in (tmp_path / "stack/server/model_repository/chroma_lm/config.pbtxt").read_text()
    starts = [lv["started_unix"] for lv in report["levels"]]
    assert starts == sorted(starts) and time.time() - 600 < starts[0] <= starts[-1] < time.time()

    base = report["baseline_naive"]
    assert base["frames"] > 0 and base["ms_per_frame"] > 0
    assert base["rtf"] == pytest.approx(base["ms_per_frame"] / FRAME_MS)
    assert [(lv["path"], lv["concurrency"]) for lv in report["levels"]] == [
        ("frontend", 1), ("frontend", 2), ("grpc", 1), ("grpc", 2)]
    assert [lv["client_procs"] for lv in report["levels"]] == [1, 2, 1, 2]
    assert [lv["rounds"] for lv in report["levels"]] == [2, 2, 2, 2]
    for lv in report["levels"]:
        c = lv["concurrency"]
        n = c * lv["rounds"]  # requests
        assert lv["errors"] == 0 and lv["streams"] == c and lv["ok_streams"] == lv["requests"] == n, lv["error_samples"]
        # every request got whole frames, as many as the server reported, at most max_tokens
        assert lv["streams_with_sample_count_mismatch"] == 0
        assert lv["frames_received"] == lv["frames_reported"] <= n * MAX_TOKENS
        assert lv["triton_counters_delta"]["chroma_lm_audio_frames_total{chroma_lm}"] == lv["frames_received"]
        # conversation affinity: every request reached Triton once; the frontend started each
        # conversation it had not named (stream 1 of the 2-stream level starts a turn deep, and its
        # round 1 drops its oldest turn: a new first message, a new conversation), the gRPC client
        # each stream's at its first round, so Triton refused none
        assert lv["triton_counters_delta"]["nv_inference_request_success{audio_encoder}"] == n
        assert not lv["triton_counters_delta"].get("nv_inference_request_failure{chroma}")
        # --conversations: round 1 resends round 0's latest clip, which the encoder's clip cache holds
        # (stream 0: 1 clip, then 2; stream 1: 2, then 2 with the oldest dropped); the next run's
        # conversations are new, so nothing carries over from a warm-up or level before
        clips = {how: lv["triton_counters_delta"].get(f"chroma_audio_encoder_clips_total{{audio_encoder,{how}}}")
                 for how in ("embedded", "reused")}
        assert clips == ({"embedded": 2, "reused": 1} if c == 1 else {"embedded": 5, "reused": 2}), clips
        # the encoder's time by stage: every request decoded clips and built its output; the tower ran
        stages = {k.split(",")[1].rstrip("}"): v for k, v in lv["triton_counters_delta"].items()
                  if k.startswith("chroma_audio_encoder_seconds_total{")}
        assert set(stages) == {"voice", "features", "tower", "output"} and all(v > 0 for v in stages.values()), stages
        # the shipped config's thinker_prefix_cache_mib "auto": 4 GiB where memory is not measured
        bound = lv["triton_gauges_peak"]["chroma_lm_thinker_prefix_bound_bytes{chroma_lm}"]
        assert (4 << 30) - (1 << 20) < bound <= 4 << 30  # whole pages of it once a prompt is stored
        assert "thinker prefix cache: " in proc.stdout
        chunks = [v for k, v in lv["triton_counters_delta"].items() if k.startswith("chroma_codec_chunks_total{")]
        assert sum(chunks) > 0
        # this stack's processes, found by their command lines (CPU time comes in 10 ms ticks: a
        # short level may leave one process at 0, but not all of them)
        cpu = lv["server_cpu"]
        assert {"tritonserver", "chroma_lm", "audio_encoder", "codec_decoder", "frontend"} <= set(cpu), cpu
        assert cpu["chroma_lm"]["processes"] == 1 and cpu["frontend"]["processes"] >= 1
        assert all(v["cpu_s"] >= 0 for v in cpu.values()) and sum(v["cpu_s"] for v in cpu.values()) > 0
        assert lv["audio_s_total"] == pytest.approx(lv["frames_received"] * FRAME_MS / 1000)
        assert lv["audio_s_per_s"] == pytest.approx(lv["audio_s_total"] / lv["wall_s"])
        assert 0 < lv["ttfa_ms_p50"] <= lv["ttfa_ms_p90"] <= lv["ttfa_ms_p99"] <= lv["ttfa_ms_max"] < lv["wall_s"] * 1000
        streams = lv["per_stream"]
        assert len(streams) == n and all(s["usage_frames"] * FRAME_SAMPLES == s["samples"] for s in streams)
        if lv["ms_per_frame_p50"] is not None:
            assert lv["ms_per_frame_p50"] <= lv["ms_per_frame_worst"]
            assert lv["rtf_p50"] == pytest.approx(lv["ms_per_frame_p50"] / FRAME_MS)
            assert lv["realtime_margin_min"] == pytest.approx(FRAME_MS / lv["ms_per_frame_worst"])
            assert lv["x_naive_per_stream_p50"] == pytest.approx(base["ms_per_frame"] / lv["ms_per_frame_p50"])
        assert 0 <= lv["underrun_streams"] <= n  # requests with an underrun
        assert lv["gpu_mem_peak_mib"] is None or all(v >= 0 for v in lv["gpu_mem_peak_mib"].values())
        assert math.isfinite(lv["client_loop_lag_ms_max"])


def test_perf_analyzer_recipe_inputs(tmp_path):
    """scripts/perf_analyzer.sh with a stand-in binary: the input data is the README request in
    Triton's serialized BYTES form, the arguments ask for gRPC streaming, the export is summarized."""
    fake = tmp_path / "perf_analyzer"
    fake.write_text("#!/bin/sh\n"
                    "[ \"$1\" = --version ] && { echo 'Perf Analyzer Version fake'; exit 0; }\n"
                    f"echo \"$@\" >> {tmp_path}/args\n"
                    "while [ $# -gt 0 ]; do [ \"$1\" = --profile-export-file ] && "
                    "echo '{\"experiments\":[{\"requests\":[{\"timestamp\":0,\"response_timestamps\":[2000000,9000000]}]}]}' > \"$2\"; "
                    "shift; done\n")
    fake.chmod(0o755)
    out = tmp_path / "pa"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "perf_analyzer.sh"), "-u", "h:1", "-c", "1 3", "-n", "7",
                           "-o", str(out), "--", "--collect-metrics"], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PERF_ANALYZER": str(fake), "CHROMA_PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "first response ms p50/p90/p99 2/2/2; last response ms 9/9/9" in proc.stdout
    calls = (tmp_path / "args").read_text().splitlines()
    assert len(calls) == 2 and all("-m chroma -i grpc -u h:1 --streaming" in c and c.endswith("--collect-metrics")
                                   for c in calls)
    assert "--concurrency-range 3:3" in calls[1] and "--measurement-request-count 6" in calls[1]
    data = json.loads((out / "input_data.json").read_text())["data"]
    assert [d["seed"]["content"] for d in data] == [[s] for s in range(8)]

    def unpack(tensor) -> bytes:
        raw = base64.b64decode(tensor["b64"])
        (n,) = struct.unpack("<I", raw[:4])
        assert len(raw) == 4 + n and tensor["shape"] == [1]
        return raw[4:]

    first = data[0]
    assert unpack(first["user_audio"]) == (ROOT / "assets" / "question_audio.wav").read_bytes()
    assert unpack(first["prompt_audio"]) == (ROOT / "assets" / "ref_audio.wav").read_bytes()
    assert unpack(first["prompt_text"]).decode() == (ROOT / "assets" / "ref_audio.txt").read_text().strip()
    assert json.loads(unpack(first["messages"]))[0]["content"] == [{"type": "audio", "audio_index": 0}]
    assert first["max_tokens"] == {"content": [7], "shape": [1]}


def test_an_unknown_spy_role_is_refused_before_anything_runs():
    """--spy-roles names server roles; a misspelt one would record nothing, so it is an error."""
    run = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "scripts" / "bench_serving.py"),
                          "--spy-levels", "1", "--spy-roles", "frontend,audio_encodr", "--out", "/dev/null"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "unknown role(s) audio_encodr" in run.stderr, run.stderr[-500:]
