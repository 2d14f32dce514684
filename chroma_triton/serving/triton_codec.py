"""The logic of the ``codec_decoder`` Triton model: code chunks -> 24 kHz PCM, stateless.

Every chunk ``chroma_lm`` sends repeats up to ``context_frames`` already-sent frames in front of
its new frames; Mimi's decoder is causal, so decoding context + new and keeping only the new
frames' samples continues the waveform without a seam. :func:`streaming_difference` measures how
far that is from decoding the whole utterance at once (reported in README.md ("Serving on Triton")).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidRequestError
from ..model.codec import Codec

MAX_DECODE_BATCH = 64  # chunks decoded together (bounds activation memory)


class CodecService:
    def __init__(self, codec: Codec, graph_frames: int = 0):
        """``graph_frames``: on a GPU, capture CUDA graphs for batches of chunks up to this many
        frames (context included) now, at load; 0 decodes eagerly."""
        self.codec = codec
        self.num_codebooks = codec.num_codebooks
        if graph_frames < 0:
            raise ValueError(f"cuda_graph_frames must be >= 0, got {graph_frames}")
        self.graphs = codec.use_cuda_graphs(graph_frames, MAX_DECODE_BATCH)

    def validate(self, codes: np.ndarray, context_frames: int) -> np.ndarray:
        """One request's codes as [frames, K] int64 (a leading batch dimension of 1 is dropped)."""
        codes = np.asarray(codes)
        if codes.size == 0:
            return np.zeros((0, self.num_codebooks), np.int64)
        codes = codes.reshape(-1, codes.shape[-1])
        if codes.shape[1] != self.num_codebooks:
            raise InvalidRequestError(f"audio_codes must have {self.num_codebooks} columns, got {codes.shape[1]}", "audio_codes")
        if not 0 <= context_frames <= len(codes):
            raise InvalidRequestError(f"context_frames {context_frames} outside 0..{len(codes)}", "context_frames")
        return codes.astype(np.int64)

    def decode(self, codes: np.ndarray, context_frames: int) -> np.ndarray:
        return self.decode_many([(codes, context_frames)])[0]

    def decode_many(self, chunks: list[tuple[np.ndarray, int]]) -> list[np.ndarray | Exception]:
        """Decode the chunks of several requests in one batched call; a chunk that fails
        validation gets its exception in its place and does not stop the others."""
        out: list[np.ndarray | Exception] = []
        good: list[tuple[int, np.ndarray, int]] = []
        for i, (codes, context) in enumerate(chunks):
            try:
                valid = self.validate(codes, context)
            except InvalidRequestError as exc:
                out.append(exc)
                continue
            out.append(np.zeros(0, np.float32))
            if len(valid) > context:
                good.append((i, valid, context))
        for start in range(0, len(good), MAX_DECODE_BATCH):
            part = good[start:start + MAX_DECODE_BATCH]
            audio = self.codec.decode_batch([(codes, context) for _, codes, context in part])
            for (i, _, _), samples in zip(part, audio):
                out[i] = np.ascontiguousarray(samples, dtype=np.float32)
        return out


@dataclass
class StreamingDifference:
    frames: int
    chunks: int
    samples: int
    max_abs: float
    rms: float
    signal_rms: float

    @property
    def snr_db(self) -> float:
        return float("inf") if self.rms == 0 else 20 * np.log10(max(self.signal_rms, 1e-12) / self.rms)


def chunk_plan(frames: int, first: int, chunk: int, context: int) -> list[tuple[int, int, int]]:
    """(start of context, start of new frames, end) per chunk, the way the engine cuts a stream."""
    plan, sent = [], 0
    while sent < frames:
        end = min(frames, sent + (first if sent == 0 else chunk))
        plan.append((sent - min(context, sent), sent, end))
        sent = end
    return plan


def streaming_difference(codec: Codec, codes: np.ndarray, chunks: list[tuple[np.ndarray, int]]) -> StreamingDifference:
    """Compare ``decode(all codes)`` with the concatenation of ``decode_chunk`` over ``chunks``
    (each ``(codes with left context, context_frames)``)."""
    whole = codec.decode(codes)
    streamed = np.concatenate([codec.decode_chunk(c, ctx) for c, ctx in chunks]) if chunks else np.zeros(0, np.float32)
    if len(streamed) != len(whole):
        raise AssertionError(f"streamed decode has {len(streamed)} samples, one-shot {len(whole)}")
    diff = streamed.astype(np.float64) - whole.astype(np.float64)
    return StreamingDifference(
        frames=len(codes), chunks=len(chunks), samples=len(whole),
        max_abs=float(np.abs(diff).max()) if diff.size else 0.0,
        rms=float(np.sqrt(np.mean(diff ** 2))) if diff.size else 0.0,
        signal_rms=float(np.sqrt(np.mean(whole.astype(np.float64) ** 2))) if whole.size else 0.0,
    )
