"""Mimi codec (transformers' `MimiModel`): reference audio -> codes, codes -> 24 kHz audio.

Streaming decode is stateless: each chunk is decoded together with up to `context_frames`
frames before it and only the new part is kept. Mimi's decoder is causal, so enough left
context reproduces the one-shot decode; what remains differs only through the decoder
transformer's attention to frames older than the context (measured in tests/docs).

Decoding goes through :class:`MimiDecode` (transformers' modules without their host syncs). On a
GPU, :meth:`Codec.use_cuda_graphs` replays batched chunk decodes as CUDA graphs, one per
(rows, frames) bucket: one launch and one read-back per batch instead of hundreds of kernel
launches and a dozen syncs, which matters most when another process keeps the GPU busy.
"""

from __future__ import annotations

import numpy as np
import torch

from .mimi_decode import MimiDecode

FRAME_BUCKET = 8  # batched decodes pad their length to a multiple of this many frames


class Codec:
    def __init__(self, mimi: torch.nn.Module, num_codebooks: int, codebook_size: int, sample_rate: int, frame_size: int):
        self.mimi = mimi
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.sample_rate = sample_rate
        self.frame_size = frame_size
        p = next(mimi.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._decode = MimiDecode(mimi)
        self._graphs = None  # a StepRunner once use_cuda_graphs ran
        self._graph_frames = 0

    def use_cuda_graphs(self, max_frames: int, max_rows: int) -> int:
        """Decode batches of up to ``max_rows`` chunks of up to ``max_frames`` frames (context
        included) through CUDA graphs, all captured now; longer chunks decode eagerly. Returns the
        number of graphs (0 off a GPU or with ``max_frames`` 0)."""
        if self.device.type != "cuda" or max_frames <= 0:
            return 0
        from ..engine.graphs import StepRunner, batch_buckets  # the engine package imports this module

        # graphs share one memory pool: decode_batch reads each replay's output before the next
        self._graphs = StepRunner(True, shared_pool=True, device=self.device)
        self._graph_frames = -(-max_frames // FRAME_BUCKET) * FRAME_BUCKET
        silence = np.zeros((0, self.num_codebooks), np.int64)
        for rows in batch_buckets(1 << (max_rows - 1).bit_length()):  # decode_batch's row counts
            for frames in range(FRAME_BUCKET, self._graph_frames + 1, FRAME_BUCKET):
                filler = np.zeros((frames, self.num_codebooks), np.int64)
                self.decode_batch([(filler, 0)] + [(silence, 0)] * (rows - 1))
        return len(self._graphs)

    @torch.inference_mode()
    def encode(self, wav: np.ndarray) -> np.ndarray:
        """Mono float32 at `sample_rate` -> codes [frames, num_codebooks] (int64)."""
        x = torch.as_tensor(wav, dtype=torch.float32).to(self.device, self.dtype)[None, None]
        codes = self.mimi.encode(x, num_quantizers=self.num_codebooks).audio_codes  # [1, K, T]
        return codes[0, : self.num_codebooks].T.contiguous().cpu().numpy().astype(np.int64)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        """codes [frames, K] -> float32 mono [frames * frame_size]; codes are clamped to the codebook."""
        c = torch.as_tensor(codes, dtype=torch.long)
        if c.ndim != 2 or c.shape[1] != self.num_codebooks:
            raise ValueError(f"codes must have shape [frames, {self.num_codebooks}], got {tuple(c.shape)}")
        if c.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        c = c.clamp(0, self.codebook_size - 1).T[None].to(self.device)
        audio = self._decode(c)  # [1, 1, samples]
        return audio[0, 0].float().cpu().numpy()

    @torch.inference_mode()
    def decode_batch(self, chunks: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """Decode several chunks (codes [context + new, K], context_frames) in one batched call;
        returns each chunk's new samples, as `decode_chunk` would. Shorter chunks are padded on the
        right: Mimi's decoder is causal, so padding after a chunk cannot change its samples."""
        if not chunks:
            return []
        for codes, context in chunks:
            if codes.ndim != 2 or codes.shape[1] != self.num_codebooks:
                raise ValueError(f"codes must have shape [frames, {self.num_codebooks}], got {tuple(codes.shape)}")
            if not 0 <= context <= len(codes):
                raise ValueError(f"context_frames {context} outside 0..{len(codes)}")
        longest = max(len(c) for c, _ in chunks)
        if longest == 0:
            return [np.zeros(0, dtype=np.float32) for _ in chunks]
        # a few shapes only (lengths in steps of 8 frames; on a GPU, where idle rows cost little,
        # batch sizes in powers of two): the process's memory settles after the first of each
        # instead of growing with every new shape
        frames = -(-longest // FRAME_BUCKET) * FRAME_BUCKET
        rows = 1 << (len(chunks) - 1).bit_length() if self.device.type == "cuda" else len(chunks)
        batch = np.zeros((rows, self.num_codebooks, frames), dtype=np.int64)
        for i, (codes, _) in enumerate(chunks):
            batch[i, :, : len(codes)] = np.clip(codes, 0, self.codebook_size - 1).T
        c = torch.from_numpy(batch).to(self.device)
        if self._graphs is not None and frames <= self._graph_frames:
            audio_t = self._graphs(("decode", rows, frames), self._decode, c)
        else:
            audio_t = self._decode(c)
        audio = audio_t[:, 0].float().cpu().numpy()  # [B, samples]
        fs = self.frame_size
        return [np.ascontiguousarray(audio[i, context * fs: len(codes) * fs]) for i, (codes, context) in enumerate(chunks)]

    def decode_chunk(self, codes: np.ndarray, context_frames: int) -> np.ndarray:
        """Decode [context + new, K] codes and return only the new frames' samples."""
        if not 0 <= context_frames <= len(codes):
            raise ValueError(f"context_frames {context_frames} outside 0..{len(codes)}")
        return self.decode(codes)[context_frames * self.frame_size :]
