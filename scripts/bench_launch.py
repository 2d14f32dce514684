#!/usr/bin/env python3
"""Launch costs on one GPU, to tell a per-kernel cost from a per-step one (run it with and without
CUDA MPS: `MPS=on bash scripts/gpu_bench.sh launch`), and the sampler's cost per call
(sampling.sample vs the fused Triton kernel, each replayed from a CUDA graph).

Every timing is GPU time between CUDA events around graph replays (median of --repeats), except
`round_trip_us`: host wall time of one step's pattern (a small copy in, one graph, a copy out,
waiting on an event), as the engine does per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chroma_triton.sampling import sample, stream_keys, token_hashes  # noqa: E402
from chroma_triton.sampling_kernel import fused_sample  # noqa: E402


def graph_of(fn, warmup: int = 2) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def replay_us(graph: torch.cuda.CUDAGraph, repeats: int) -> float:
    """Median GPU time of one replay, in microseconds."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def kernels_in_graph(n: int, repeats: int) -> dict:
    """n dependent tiny kernels (one-element adds) and n bf16 matrix-vector products in a graph."""
    x = torch.zeros(1, device="cuda")
    tiny = graph_of(lambda: [x.add_(1.0) for _ in range(n)])
    v = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    state = {"v": v}

    def gemvs():
        y = state["v"]
        for _ in range(n // 4):
            y = y @ w
        return y
    gemv = graph_of(gemvs)
    t_tiny, t_gemv = replay_us(tiny, repeats), replay_us(gemv, repeats)
    return {"tiny_kernels": n, "tiny_us_per_kernel": t_tiny / n,
            "gemv_kernels": n // 4, "gemv_us_per_kernel": t_gemv / (n // 4)}


def round_trip(repeats: int) -> dict:
    """Host wall time of: pinned 7x1 int64 copy in, a graph of 50 tiny kernels, copy out, event wait."""
    host_in = torch.zeros(7, 1, dtype=torch.long).pin_memory()
    host_out = torch.zeros(9, dtype=torch.long).pin_memory()
    dev_in = torch.zeros(7, 1, dtype=torch.long, device="cuda")
    dev_out = torch.zeros(9, dtype=torch.long, device="cuda")
    g = graph_of(lambda: [dev_out.add_(dev_in[0, 0]) for _ in range(50)])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dev_in.copy_(host_in, non_blocking=True)
        g.replay()
        host_out.copy_(dev_out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return {"round_trip_us": statistics.median(times), "round_trip_p90_us": sorted(times)[int(0.9 * len(times))]}


def sampler_costs(rows_list: list[int], repeats: int, vocab: int = 2051) -> list[dict]:
    """One sampling call (top_k 50, k_max 64, temperature 0.9, top_p 1) per replay, both samplers."""
    out = []
    table = token_hashes(torch.arange(vocab, device="cuda"))
    for rows in rows_list:
        logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
        temp = torch.full((rows,), 0.9, device="cuda")
        top_k = torch.full((rows,), 50, device="cuda", dtype=torch.long)
        top_p = torch.ones(rows, device="cuda")
        keys = stream_keys(torch.arange(rows, device="cuda"), torch.zeros(rows, dtype=torch.long, device="cuda"), 1)
        res = {"rows": rows}
        res["pytorch_us"] = replay_us(graph_of(lambda: sample(logits, temp, top_k, top_p, keys, 64, table)), repeats)
        for warps in (2, 4, 8, 16):
            res[f"fused_{warps}w_us"] = replay_us(graph_of(
                lambda: fused_sample(logits, temp, top_k, top_p, keys, token_table=table, num_warps=warps)), repeats)
        out.append(res)
    return out


# One frame's matrix products at batch 1 (fused q/k/v and gate/up weights): the backbone's 16 layers,
# the depth decoder's 4 layers for 7 codebooks, and half a thinker step (36 layers, every other step)
FRAME_MATMULS = ([(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048)], 16), \
                ([(1024, 1536), (1024, 1024), (1024, 16384), (8192, 1024)], 28), \
                ([(2048, 2560), (2048, 2048), (2048, 22016), (11008, 2048)], 18)


def frame_matmuls(rows_list: list[int], repeats: int) -> list[dict]:
    """GPU time of one frame's matrix products (distinct weights, as in the model) per batch size,
    with this process's cuBLAS settings (CUBLAS_WORKSPACE_CONFIG, --blas)."""
    weights = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * 0.02
               for shapes, layers in FRAME_MATMULS for _ in range(layers) for k, n in shapes]
    out = []
    for rows in rows_list:
        inputs = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for k in {w.shape[0] for w in weights}}
        graph = graph_of(lambda: [inputs[w.shape[0]] @ w for w in weights])
        out.append({"rows": rows, "matmuls": len(weights), "us_per_frame": replay_us(graph, repeats)})
    return out


# (out features, in features, per frame at batch 1, bias): the model's weights as F.linear sees them
LINEAR_SHAPES = [("backbone qkv", 3072, 2048, 16, False), ("backbone o", 2048, 2048, 16, False),
                 ("backbone gate_up", 16384, 2048, 16, False), ("backbone down", 2048, 8192, 16, False),
                 ("backbone head", 2051, 2048, 1, False), ("decoder projection", 1024, 2048, 7, False),
                 ("decoder qkv", 1536, 1024, 28, False), ("decoder o", 1024, 1024, 28, False),
                 ("decoder gate_up", 16384, 1024, 28, False), ("decoder down", 1024, 8192, 28, False),
                 ("thinker qkv", 2560, 2048, 18, True), ("thinker o", 2048, 2048, 18, False),
                 ("thinker gate_up", 22016, 2048, 18, False), ("thinker down", 2048, 11008, 18, False),
                 ("thinker lm_head", 151936, 2048, 0.5, False)]
GEMV_CONFIGS = [(bn, bk, w) for bn in (4, 8, 16, 32) for bk in (128, 256, 512) for w in (4, 8)
                if bn * bk <= 64 * 32 * w]


def gemv_vs_cublas(rows: int, repeats: int) -> dict:
    """Per weight shape: F.linear (cuBLAS) against chroma_triton.model.gemv in each configuration,
    us per call over as many distinct weights as a frame reads (at most 16 copies, 1 GB)."""
    import torch.nn.functional as F

    from chroma_triton.model.gemv import gemv
    shapes, frame_cublas, frame_best = [], 0.0, 0.0
    for name, n, k, per_frame, has_bias in LINEAR_SHAPES:
        copies = max(1, min(16, int(per_frame), int(2**30 // (n * k * 2))))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, ws[0], b)
        row = {"shape": name, "n": n, "k": k, "per_frame": per_frame,
               "cublas_us": replay_us(graph_of(lambda: [F.linear(x, w, b) for w in ws]), repeats) / copies}
        best = None
        for bn, bk, warps in GEMV_CONFIGS:
            got = gemv(x, ws[0], b, bn, bk, warps)
            err = (got.float() - ref.float()).abs().max().item()
            t = replay_us(graph_of(lambda: [gemv(x, w, b, bn, bk, warps) for w in ws]), repeats) / copies
            if best is None or t < best[0]:
                best = (t, (bn, bk, warps), err)
        row.update(gemv_us=best[0], config=best[1], max_abs_diff=best[2])
        row["gb_per_s_cublas"] = n * k * 2 / row["cublas_us"] / 1e3
        row["gb_per_s_gemv"] = n * k * 2 / best[0] / 1e3
        frame_cublas += per_frame * row["cublas_us"]
        frame_best += per_frame * best[0]
        shapes.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows, "shapes": shapes, "frame_cublas_us": frame_cublas, "frame_gemv_us": frame_best}


# (name, kv heads, heads per kv head, new positions per row, head dim, cache length, calls per frame,
#  rows' last positions drawn from [lo, hi]): the trunks' step attention as trunk.Attention calls it
ATTENTION_SHAPES = [("backbone silent", 8, 4, 1, 64, 1536, 8, 160, 700), ("backbone talking", 8, 4, 3, 64, 1536, 8, 160, 700),
                    ("thinker", 2, 8, 1, 128, 1024, 18, 120, 420), ("decoder", 2, 4, 1, 128, 8, 28, 1, 7)]


def attention_costs(rows_list: list[int], repeats: int, key_bucket: int = 256) -> list[dict]:
    """Per trunk shape and batch: SDPA as the trunk calls it (keys up to the batch's key bucket, an
    additive mask) against chroma_triton.model.decode_attention (each row's keys up to its own last
    position), us per call (8 calls per graph), rows at mixed lengths and all at the longest."""
    import torch.nn.functional as F

    from chroma_triton.model.decode_attention import decode_attention
    from chroma_triton.model.trunk import causal_mask
    out = []
    g = torch.Generator().manual_seed(0)
    for rows in rows_list:
        for name, kvh, group, length, d, t, per_frame, lo, hi in ATTENTION_SHAPES:
            for spread in ("mixed", "equal"):
                last = torch.randint(lo, hi + 1, (rows,), generator=g) if spread == "mixed" else torch.full((rows,), hi)
                positions = (last[:, None] - length + 1 + torch.arange(length)).cuda()
                need = int(last.max()) + 1
                key_len = min(t, -(-need // key_bucket) * key_bucket) if t > key_bucket else t
                q = torch.randn(rows, kvh, group * length, d, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(rows, kvh, t, d, device="cuda", dtype=torch.bfloat16)
                v = torch.randn(rows, kvh, t, d, device="cuda", dtype=torch.bfloat16)
                mask = causal_mask(positions, key_len, group, torch.bfloat16)

                def sdpa():
                    return F.scaled_dot_product_attention(q, k[:, :, :key_len], v[:, :, :key_len], attn_mask=mask)
                want, got = sdpa(), decode_attention(q, k, v, positions)
                row = {"shape": name, "rows": rows, "lengths": spread, "key_len": key_len,
                       "mean_keys": float(last.float().mean()) + 1, "per_frame": per_frame,
                       "sdpa_us": replay_us(graph_of(lambda: [sdpa() for _ in range(8)]), repeats) / 8,
                       "kernel_us": replay_us(graph_of(lambda: [decode_attention(q, k, v, positions) for _ in range(8)]),
                                              repeats) / 8,
                       "max_abs_diff": float((got.float() - want.float()).abs().max())}
                out.append(row)
                print(json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", type=int, default=1000, help="kernels per graph for the per-kernel cost")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--sampler-rows", default="1,64,256")
    ap.add_argument("--matmul-rows", default="1,256", help="batch sizes of the frame-matmul timing")
    ap.add_argument("--blas", choices=("default", "cublas", "cublaslt"), default="default",
                    help="torch.backends.cuda.preferred_blas_library for this process")
    ap.add_argument("--only-matmuls", action="store_true")
    ap.add_argument("--gemv-rows", default="", help="e.g. 1,4: chroma_triton.model.gemv against cuBLAS per weight shape, then exit")
    ap.add_argument("--attention-rows", default="", help="e.g. 1,64,256: SDPA against "
                    "chroma_triton.model.decode_attention per trunk shape, then exit")
    ap.add_argument("--out", help="JSON report")
    args = ap.parse_args()
    torch.cuda.init()
    if args.attention_rows:
        report = attention_costs([int(r) for r in args.attention_rows.split(",")], args.repeats)
        for r in report:
            print(f"{r['shape']:>16} rows {r['rows']:>3} {r['lengths']:>5}: SDPA {r['sdpa_us']:7.1f} us, "
                  f"kernel {r['kernel_us']:7.1f} us (keys {r['mean_keys']:.0f} of {r['key_len']}), "
                  f"max diff {r['max_abs_diff']:.3g}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
        return
    if args.gemv_rows:
        report = [gemv_vs_cublas(int(r), args.repeats) for r in args.gemv_rows.split(",")]
        for r in report:
            print(f"rows {r['rows']}: one frame's products {r['frame_cublas_us']:.0f} us cuBLAS, "
                  f"{r['frame_gemv_us']:.0f} us gemv", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
        return
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    report = {"device": torch.cuda.get_device_name(), "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")),
              "torch": torch.__version__, "blas": args.blas,
              "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")}
    report["frame_matmuls"] = frame_matmuls([int(r) for r in args.matmul_rows.split(",")], args.repeats)
    if args.only_matmuls:
        print(json.dumps(report), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
        return
    report.update(kernels_in_graph(args.kernels, args.repeats))
    report.update(round_trip(args.repeats * 5))
    report["sampler"] = sampler_costs([int(r) for r in args.sampler_rows.split(",")], args.repeats)
    print(json.dumps(report, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
