#!/usr/bin/env python3
"""Where `audio_encoder`'s time goes for a conversation's turns, in process (no Triton): the
service `audio_encoder` serves with (CUDA graphs for the tower as served), fed the requests of
conversations that resend their earlier clips with each turn, as `bench_serving.py --conversations`
does. Per setting of `features_device`: the wall time of a request's `encode_batch` and its
stages (voice, features, tower, output); then one clip's log-mel alone, on the CPU and on the GPU.

    python scripts/profile_encoder.py --model /root/chroma-full --device cuda --out encoder.json

Each setting gets a fresh service (an empty clip cache) and the same conversations: turn t sends
the clips of turns max(0, t - history) .. t, so after the first turn one clip is new per request.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from chroma_triton.audio_io import decode_audio  # noqa: E402
from chroma_triton.bench.clients import tagged_clip  # noqa: E402
from chroma_triton.model.loading import load_parts  # noqa: E402
from chroma_triton.serving.triton_audio_encoder import AudioEncoderService, EncoderInput  # noqa: E402

QUESTION, VOICE = ROOT / "assets/question_audio.wav", ROOT / "assets/ref_audio.wav"


def conversations(count: int, turns: int, history: int, first_tag: int) -> list[list[bytes]]:
    """Each request's clips, conversation by conversation, turn by turn (tags unique to each clip)."""
    out = []
    for c in range(count):
        tag = (first_tag + c) << 16
        for t in range(turns):
            out.append([tagged_clip(QUESTION, tag | j) for j in range(max(0, t - history), t + 1)])
    return out


def run_setting(parts, on_device: bool, requests: list[list[bytes]], warmup: list[list[bytes]]) -> dict:
    where = parts.audio_tower.use_device_features(on_device)
    voice = (VOICE.read_bytes(), VOICE.with_suffix(".txt").read_text().strip())
    service = AudioEncoderService(parts, voice)
    for clips in warmup:
        service.encode_batch([EncoderInput(clips, voice[0], voice[1])])
    before, walls = service.stage_seconds(), []
    for clips in requests:
        start = time.perf_counter()
        (result,) = service.encode_batch([EncoderInput(clips, voice[0], voice[1])])
        walls.append((time.perf_counter() - start) * 1e3)
        if isinstance(result, Exception):
            raise result
    after = service.stage_seconds()
    n = len(requests)
    return {"features_device": where, "requests": n, "wall_ms_p50": statistics.median(walls),
            "wall_ms_mean": statistics.fmean(walls), "wall_ms_max": max(walls),
            "stage_ms_per_request": {k: (after[k] - before[k]) * 1e3 / n for k in after},
            "clip_counts": service.clip_counts()}


def one_clip_features(tower, on_device: bool, reps: int) -> dict:
    where = tower.use_device_features(on_device)
    wav = decode_audio(QUESTION.read_bytes(), tower.sampling_rate)
    tower.features(wav)  # first call: the window, the filters, kernels
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        tower.features(wav)
        times.append((time.perf_counter() - start) * 1e3)
    return {"features_device": where, "clip_s": len(wav) / tower.sampling_rate,
            "ms_p50": statistics.median(times), "ms_min": min(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (scripts/make_checkpoint.py makes one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=8, help="turns per conversation")
    ap.add_argument("--history", type=int, default=7, help="earlier turns a request resends at most")
    ap.add_argument("--cuda-graph-windows", type=int, default=64, help="as audio_encoder's parameter (0: eager)")
    ap.add_argument("--reps", type=int, default=50, help="repetitions of the one-clip log-mel timing")
    ap.add_argument("--out", default=None, help="JSON file for the numbers")
    args = ap.parse_args()

    if args.device.startswith("cuda:"):  # "cuda": the current GPU
        torch.cuda.set_device(args.device)
    parts = load_parts(args.model, parts={"audio_tower", "codec"}, device=args.device)
    graphs = parts.audio_tower.use_cuda_graphs(args.cuda_graph_windows)
    settings = [False, True] if parts.audio_tower.device.type == "cuda" else [False]
    report = {"model": args.model, "device": str(parts.audio_tower.device), "tower_graphs": graphs,
              "torch_threads": torch.get_num_threads(), "conversations": args.conversations, "turns": args.turns,
              "history": args.history, "settings": [], "one_clip": []}
    for i, on_device in enumerate(settings):
        requests = conversations(args.conversations, args.turns, args.history, first_tag=1 + 100 * i)
        warmup = conversations(1, 2, args.history, first_tag=99 + 100 * i)
        report["settings"].append(run_setting(parts, on_device, requests, warmup))
    for on_device in settings:
        report["one_clip"].append(one_clip_features(parts.audio_tower, on_device, args.reps))

    print(f"audio_encoder in process on {report['device']} ({graphs} tower graphs, {report['torch_threads']} "
          f"torch threads): {args.conversations} conversations x {args.turns} turns, up to {args.history} earlier clips")
    print("| features on | requests | wall ms p50 / mean / max | voice | features | tower | output (ms per request) |")
    print("|---|---|---|---|---|---|---|")
    for s in report["settings"]:
        st = s["stage_ms_per_request"]
        print(f"| {s['features_device']} | {s['requests']} | {s['wall_ms_p50']:.2f} / {s['wall_ms_mean']:.2f} / "
              f"{s['wall_ms_max']:.2f} | {st['voice']:.2f} | {st['features']:.2f} | {st['tower']:.2f} | {st['output']:.2f} |")
    for c in report["one_clip"]:
        print(f"one {c['clip_s']:.2f} s clip's log-mel on {c['features_device']}: {c['ms_p50']:.2f} ms p50 "
              f"({c['ms_min']:.2f} min)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
