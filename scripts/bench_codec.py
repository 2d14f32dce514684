"""codec_decoder's decode alone on one GPU: its CUDA graphs (count, capture time, memory) and a
batch's decode time, stateless (context + new frames through the SEANet decoder) against carried
(new frames only, continuing each stream's state), and a carried batch with one restarted chunk
in it, split into two SEANet calls against one.

    python scripts/bench_codec.py                      # Mimi at its real sizes, random weights
    python scripts/bench_codec.py --model /data/chroma-full --rows 64,32 --new 10 --context 12

Prints one line per measurement; no Triton, no other process on the GPU (under load the codec
shares it with chroma_lm: see scripts/bench_serving.py for that).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from chroma_triton.model.codec import FRAME_BUCKET, SPLIT_SAVING

GIB = 2**30


def memory(tag: str) -> None:
    free, total = torch.cuda.mem_get_info()
    print(f"{tag}: GPU used {(total - free) / GIB:.2f} GiB, reserved {torch.cuda.memory_reserved() / GIB:.2f}, "
          f"allocated {torch.cuda.memory_allocated() / GIB:.2f}", flush=True)


def load_codec(model: str | None):
    if model:
        from chroma_triton.model.loading import load_parts

        return load_parts(model, parts={"codec"}, device="cuda").codec
    from transformers import MimiConfig, MimiModel

    from chroma_triton.model.codec import Codec

    mimi = MimiModel(MimiConfig(num_quantizers=32)).cuda().eval()  # kyutai/mimi's sizes
    with torch.no_grad():  # random codebooks (transformers' init leaves them at zero: audio that ignores the codes)
        for name, buffer in mimi.named_buffers():
            if name.endswith("codebook.embed_sum"):
                buffer.normal_()
    return Codec(mimi, num_codebooks=8, codebook_size=2048, sample_rate=24000, frame_size=1920)


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


@torch.inference_mode()  # the graphs' static inputs are inference tensors
def measure(codec, args, tag: str) -> None:
    rng = np.random.default_rng(0)
    frames = args.context + args.new
    spf = codec._steps_per_frame
    hidden = codec.mimi.config.hidden_size
    for rows in (int(r) for r in args.rows.split(",")):
        chunks = [(rng.integers(0, codec.codebook_size, size=(frames, codec.num_codebooks)), args.context)
                  for _ in range(rows)]
        state = torch.zeros(rows, codec.state_size, device="cuda")
        stateless = timed(lambda: codec.decode_batch(chunks), args.repeats)
        carried = timed(lambda: codec.decode_carried([(c, ctx, True) for c, ctx in chunks], state), args.repeats)
        # one chunk restarted (its stream's state lost) among carried ones: its context and new
        # frames in a SEANet call of their own, against every row as long as it in one call
        mixed = [(c, ctx, i > 0) for i, (c, ctx) in enumerate(chunks)]
        split = timed(lambda: codec.decode_carried(mixed, state), args.repeats)
        codec.split_saving = 1.0
        one_call = timed(lambda: codec.decode_carried(mixed, state), args.repeats)
        codec.split_saving = SPLIT_SAVING
        print(f"[{tag}] {rows} chunks of {args.context} + {args.new} frames: stateless {stateless:.2f} ms, "
              f"carried {carried:.2f} ms per batch ({carried / stateless:.2f}x); one restarted among them: "
              f"{split:.2f} ms in two SEANet calls, {one_call:.2f} ms in one")
        # the two halves alone (graph replays): the transformer over context + new frames, the
        # SEANet decoder over them (stateless) or over the new frames only (carried)
        padded = -(-frames // FRAME_BUCKET) * FRAME_BUCKET  # the transformer's frames, as decode_carried pads them
        codes = torch.randint(0, codec.codebook_size, (codec._rows(rows), codec.num_codebooks, padded), device="cuda")
        embed = timed(lambda: codec._embed(codes), args.repeats)
        seanet = {}
        for name, length in (("stateless", frames), ("carried", args.new)):
            x = torch.randn(codec._rows(rows), hidden, length * spf, device="cuda")
            lengths = torch.full((codec._rows(rows),), length * spf, device="cuda")
            zeros = torch.zeros(codec._rows(rows), codec.state_size, device="cuda")
            seanet[name] = timed(lambda: codec._run_seanet(x, lengths, zeros), args.repeats)
        print(f"[{tag}]   halves: transformer (quantizer, upsampling, decoder transformer) {embed:.2f} ms; "
              f"SEANet decoder {seanet['stateless']:.2f} ms stateless, {seanet['carried']:.2f} ms carried")


def difference(got: np.ndarray, want: np.ndarray) -> str:
    got, want = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    err = got - want
    snr = 20 * np.log10(np.sqrt(np.mean(want ** 2)) / max(np.sqrt(np.mean(err ** 2)), 1e-30))
    return f"max abs {np.abs(err).max():.2e}, RMS {np.sqrt(np.mean(err ** 2)):.2e}, signal RMS {np.sqrt(np.mean(want ** 2)):.3g}, SNR {snr:.1f} dB"


@torch.inference_mode()
def transformer_change(codec, codes: torch.Tensor) -> np.ndarray:
    """What the decoder transformer adds to its input (eager): the part TF32 can change."""
    mimi = codec.mimi
    x = mimi.upsample(mimi.quantizer.decode(codes))
    return (codec._embed_eager(codes) - x).float().cpu().numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a checkpoint (default: a random Mimi at its real sizes)")
    p.add_argument("--graph-frames", type=int, default=24, help="codec_decoder's cuda_graph_frames")
    p.add_argument("--rows", default="64,32,8", help="chunks per batch")
    p.add_argument("--new", type=int, default=10, help="new frames per chunk (chroma_lm's chunk_frames)")
    p.add_argument("--context", type=int, default=12, help="context frames per chunk (chroma_lm's context_frames)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tf32", action="store_true",
                   help="then again with the transformer's matrix products in TF32 (codec_decoder's matmul_tf32), "
                        "with the samples' difference from float32")
    args = p.parse_args()

    codec = load_codec(args.model)
    print(f"cuDNN TF32 (the convolutions): {torch.backends.cudnn.allow_tf32}; "
          f"matmul TF32 (process default): {torch.backends.cuda.matmul.allow_tf32}")
    memory("loaded")
    start = time.perf_counter()
    graphs = codec.use_cuda_graphs(args.graph_frames, 64)
    torch.cuda.synchronize()
    print(f"{graphs} CUDA graphs captured in {time.perf_counter() - start:.1f} s")
    memory("graphs captured")
    measure(codec, args, "float32")
    memory("after the decodes")
    if args.tf32:
        rng = np.random.default_rng(1)
        chunks = [(rng.integers(0, codec.codebook_size, size=(args.context + args.new, codec.num_codebooks)), args.context)
                  for _ in range(64)]
        codes = torch.as_tensor(np.stack([c.T for c, _ in chunks]), device="cuda")
        reference = np.concatenate(codec.decode_batch(chunks))
        change = transformer_change(codec, codes)
        codec.matmul_tf32 = True
        codec._graphs = None  # the float32 graphs go; the TF32 ones replace them
        torch.cuda.empty_cache()
        codec.use_cuda_graphs(args.graph_frames, 64)
        print(f"TF32 against float32, 64 chunks: samples {difference(np.concatenate(codec.decode_batch(chunks)), reference)}; "
              f"the transformer's change to its input {difference(transformer_change(codec, codes), change)}")
        measure(codec, args, "tf32")


if __name__ == "__main__":
    main()
