#!/usr/bin/env python3
"""Where `audio_encoder`'s time goes for conversations' turns, in process (no Triton): the service
`audio_encoder` serves with (CUDA graphs for the tower as served), fed the requests of
conversations that resend their earlier clips with each turn, as `bench_serving.py --conversations`
does. Per setting (`prepare_threads` 1 and `--threads`; on a GPU also `features_device` cpu and
auto): the wall time per request of `encode_batch` over batches of `--batch` requests (the same
turn of that many conversations, as Triton's dynamic batcher hands them over under load) and the
work per request by stage (voice, features, tower, output); then one clip's log-mel alone.

    python scripts/profile_encoder.py --model /root/chroma-full --device cuda --batch 6 --out encoder.json

Each setting gets a fresh service (an empty clip cache) and conversations of its own: turn t sends
the clips of turns max(0, t - history) .. t, so after the first turn one clip is new per request.
Pin the host's thread pools as the launcher does (OMP_NUM_THREADS=1 on GPUs) to see the served
process's numbers.
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


def conversation_batches(count: int, turns: int, history: int, batch: int, first_tag: int) -> list[list[list[bytes]]]:
    """Batches of requests (each request its clips): turn by turn, `batch` conversations at a time
    (tags unique to each clip of each conversation)."""
    out = []
    for t in range(turns):
        for start in range(0, count, batch):
            out.append([[tagged_clip(QUESTION, ((first_tag + c) << 16) | j) for j in range(max(0, t - history), t + 1)]
                        for c in range(start, min(count, start + batch))])
    return out


def run_setting(parts, on_device: bool, threads: int, batches, warmup) -> dict:
    where = parts.audio_tower.use_device_features(on_device)
    voice = (VOICE.read_bytes(), VOICE.with_suffix(".txt").read_text().strip())
    # the rows in the dtype a stack on this device sends (bf16 on GPUs: --audio-embeds-dtype auto)
    service = AudioEncoderService(parts, voice, prepare_threads=threads, embeds_dtype=parts.dtype)

    def encode(batch):
        for result in service.encode_batch([EncoderInput(clips, voice[0], voice[1]) for clips in batch]):
            if isinstance(result, Exception):
                raise result

    for batch in warmup:
        encode(batch)
    before, walls = service.stage_seconds(), []
    for batch in batches:
        start = time.perf_counter()
        encode(batch)
        walls.append((time.perf_counter() - start) * 1e3)
    after = service.stage_seconds()
    n = sum(len(b) for b in batches)
    return {"features_device": where, "prepare_threads": threads, "requests": n, "batches": len(batches),
            "ms_per_request": sum(walls) / n, "batch_wall_ms_p50": statistics.median(walls),
            "batch_wall_ms_max": max(walls),
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
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=8, help="turns per conversation")
    ap.add_argument("--history", type=int, default=7, help="earlier turns a request resends at most")
    ap.add_argument("--batch", type=int, default=1, help="requests per encode_batch (conversations at a time)")
    ap.add_argument("--threads", type=int, default=4, help="prepare_threads compared with 1")
    ap.add_argument("--cuda-graph-windows", type=int, default=64, help="as audio_encoder's parameter (0: eager)")
    ap.add_argument("--reps", type=int, default=50, help="repetitions of the one-clip log-mel timing")
    ap.add_argument("--out", default=None, help="JSON file for the numbers")
    args = ap.parse_args()

    if args.device.startswith("cuda:"):  # "cuda": the current GPU
        torch.cuda.set_device(args.device)
    parts = load_parts(args.model, parts={"audio_tower", "codec"}, device=args.device)
    graphs = parts.audio_tower.use_cuda_graphs(args.cuda_graph_windows)
    devices = [False, True] if parts.audio_tower.device.type == "cuda" else [False]
    settings = [(on_device, threads) for on_device in devices for threads in sorted({1, args.threads})]
    report = {"model": args.model, "device": str(parts.audio_tower.device), "tower_graphs": graphs,
              "torch_threads": torch.get_num_threads(), "conversations": args.conversations, "turns": args.turns,
              "history": args.history, "batch": args.batch, "settings": [], "one_clip": []}
    for i, (on_device, threads) in enumerate(settings):
        # tags of their own: setting i's conversations from (i + 1) << 24, its warm-up's from (i + 1) << 36
        batches = conversation_batches(args.conversations, args.turns, args.history, args.batch, first_tag=(i + 1) << 24)
        warmup = conversation_batches(args.batch, 2, args.history, args.batch, first_tag=(i + 1) << 36)
        report["settings"].append(run_setting(parts, on_device, threads, batches, warmup))
    for on_device in devices:
        report["one_clip"].append(one_clip_features(parts.audio_tower, on_device, args.reps))

    print(f"audio_encoder in process on {report['device']} ({graphs} tower graphs, {report['torch_threads']} "
          f"torch threads): {args.conversations} conversations x {args.turns} turns, up to {args.history} earlier "
          f"clips, {args.batch} request(s) per batch")
    print("| features on | prepare threads | requests | ms per request | batch wall ms p50 (max) | "
          "voice | features | tower | output (work ms per request) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in report["settings"]:
        st = s["stage_ms_per_request"]
        print(f"| {s['features_device']} | {s['prepare_threads']} | {s['requests']} | {s['ms_per_request']:.2f} | "
              f"{s['batch_wall_ms_p50']:.2f} ({s['batch_wall_ms_max']:.2f}) | {st['voice']:.2f} | {st['features']:.2f} | "
              f"{st['tower']:.2f} | {st['output']:.2f} |")
    for c in report["one_clip"]:
        print(f"one {c['clip_s']:.2f} s clip's log-mel on {c['features_device']}: {c['ms_p50']:.2f} ms p50 "
              f"({c['ms_min']:.2f} min)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
