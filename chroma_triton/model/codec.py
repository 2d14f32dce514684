"""Mimi codec (transformers' `MimiModel`): reference audio -> codes, codes -> 24 kHz audio.

Streaming decode: each chunk comes with up to `context_frames` frames before it. The quantizer,
the upsampling and the decoder transformer run over context + new frames (the transformer's
attention needs the history); the SEANet decoder, most of the work, runs either over the same
frames with zeros before them (a stateless chunk: only the new part is kept) or over the new
frames alone, continuing from the state its stream's previous chunk left (a carried chunk,
:class:`StreamingSeanet`). Both give the one-shot decode's samples for the SEANet part; what
remains differs from it only through the transformer's attention to frames older than the
context (measured in tests/docs).

Decoding goes through :class:`MimiDecode` (transformers' modules without their host syncs). On a
GPU, :meth:`Codec.use_cuda_graphs` replays batched chunk decodes as CUDA graphs, one per
(rows, frames) bucket of each half: two launches and one read-back per batch instead of hundreds
of kernel launches and a dozen syncs, which matters most when another process keeps the GPU busy.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .mimi_decode import MimiDecode
from .seanet_stream import StreamingSeanet

def upload(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """int64 host arrays -> tensors on ``device`` in one copy. To a GPU the copy is asynchronous
    (from pinned memory): a copy from pageable memory would first wait for the GPU work queued
    before it."""
    flat = np.concatenate([np.ascontiguousarray(a, np.int64).ravel() for a in arrays])
    host = torch.from_numpy(flat)
    if device.type == "cuda":
        packed = host.pin_memory().to(device, non_blocking=True)
    else:
        packed = host.to(device)
    out, at = [], 0
    for a in arrays:
        out.append(packed[at: at + a.size].view(a.shape))
        at += a.size
    return out


FRAME_BUCKET = 8  # batched decodes pad the transformer's length to a multiple of this many frames
SEANET_BUCKET = 2  # ... and the SEANet decoder's to a multiple of this many (it costs far more per frame)
SPLIT_SAVING = 0.2  # seanet_groups' least saving of work for a second SEANet call


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
        self._seanet = StreamingSeanet(mimi.decoder, mimi.config)
        self.state_size = self._seanet.state_size  # one stream's carried SEANet state (values)
        self._steps_per_frame = frame_size // self._seanet.upsampling  # SEANet input steps per frame
        self._graphs = None  # a StepRunner once use_cuda_graphs ran
        self.split_saving = SPLIT_SAVING  # 1: never split
        # the decoder transformer's float32 matrix products on TF32 tensor cores (the SEANet decoder's
        # convolutions use TF32 already: cuDNN's default); set before use_cuda_graphs, which captures them
        self.matmul_tf32 = False
        self._graph_frames = 0

    @torch.inference_mode()  # captured outside it, each graph's outputs would keep autograd's saved activations
    def use_cuda_graphs(self, max_frames: int, max_rows: int) -> int:
        """Decode batches of up to ``max_rows`` chunks of up to ``max_frames`` frames (context
        included) through CUDA graphs, all captured now; longer chunks decode eagerly. Returns the
        number of graphs (0 off a GPU or with ``max_frames`` 0)."""
        if self.device.type != "cuda" or max_frames <= 0:
            return 0
        from ..engine.graphs import StepRunner, batch_buckets  # the engine package imports this module

        # graphs share one memory pool: decode_carried reads each replay's output before the next
        self._graphs = StepRunner(True, shared_pool=True, device=self.device)
        self._graph_frames = -(-max_frames // FRAME_BUCKET) * FRAME_BUCKET
        hidden = self.mimi.config.hidden_size
        for rows in batch_buckets(1 << (max_rows - 1).bit_length()):  # decode_carried's row counts
            for frames in range(FRAME_BUCKET, self._graph_frames + 1, FRAME_BUCKET):
                self._embed(torch.zeros(rows, self.num_codebooks, frames, dtype=torch.long, device=self.device))
            for frames in range(SEANET_BUCKET, self._graph_frames + 1, SEANET_BUCKET):
                steps = frames * self._steps_per_frame
                self._run_seanet(torch.zeros(rows, hidden, steps, device=self.device, dtype=self.dtype),
                                 torch.zeros(rows, dtype=torch.long, device=self.device),
                                 torch.zeros(rows, self.state_size, device=self.device, dtype=self.dtype))
        return len(self._graphs)

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        if self._graphs is not None and codes.shape[-1] <= self._graph_frames:
            return self._graphs(("embed", *codes.shape[::2]), self._embed_eager, codes)
        return self._embed_eager(codes)

    def _embed_eager(self, codes: torch.Tensor) -> torch.Tensor:
        """The quantizer, upsampling and decoder transformer (run, or captured into a graph, with
        ``matmul_tf32``'s precision; the process's setting is restored after)."""
        if not self.matmul_tf32 or self.device.type != "cuda":
            return self._decode.embed(codes)
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return self._decode.embed(codes)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before

    def _run_seanet(self, x: torch.Tensor, lengths: torch.Tensor, state: torch.Tensor):
        if self._graphs is not None and x.shape[-1] <= self._graph_frames * self._steps_per_frame:
            return self._graphs(("seanet", x.shape[0], x.shape[-1]), self._seanet, x, lengths, state)
        return self._seanet(x, lengths, state)

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

    def decode_batch(self, chunks: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """Decode several chunks (codes [context + new, K], context_frames) in one batched call;
        returns each chunk's new samples, as `decode_chunk` would."""
        return self.decode_carried([(codes, context, False) for codes, context in chunks], keep_state=False)[0]

    def _rows(self, n: int) -> int:
        """Rows a call of ``n`` chunks is padded to: on a GPU, where idle rows cost little, powers
        of two (a few shapes, one CUDA graph each); elsewhere none."""
        return 1 << (n - 1).bit_length() if self.device.type == "cuda" else n

    @torch.inference_mode()
    def decode_carried(self, chunks: list[tuple[np.ndarray, int, bool]], state: torch.Tensor | None = None,
                       keep_state: bool = True, follows: list[int] | None = None
                       ) -> tuple[list[np.ndarray], torch.Tensor | None]:
        """Decode chunks ``(codes [context + new, K], context_frames, carried)`` in one batched call.

        A carried chunk continues from its row of ``state`` (``[len(chunks), state_size]``, the
        state its stream's previous chunk returned): the SEANet decoder runs over its new frames
        only. Any other chunk runs it over all its frames from a zero state, as a stream's start.
        ``follows[i] = j`` (default -1: none) says chunk ``i`` continues chunk ``j`` of this batch
        (its stream's next chunk, queued with it): ``i``'s new frames then go through the SEANet
        decoder in ``j``'s row, right after ``j``'s, as if ``i`` were carried from the state ``j``
        leaves. Returns each chunk's new samples and the SEANet state at the end of each chunk's
        row (``[len(chunks), state_size]``, on the codec's device: a chunk's own end state unless
        a chunk follows it; None without ``keep_state``).

        The transformer runs once over all chunks (each over its context and new frames); the
        SEANet decoder once, or twice when its rows' lengths differ enough (:func:`seanet_groups`).
        Rows are padded on the right to a common length: every part of the decode is causal, and
        each row's state is taken at its own end, so padding changes no row's samples."""
        n = len(chunks)
        if state is not None and tuple(state.shape) != (n, self.state_size):
            raise ValueError(f"state must have shape [{n}, {self.state_size}], got {tuple(state.shape)}")
        for codes, context, carried in chunks:
            if codes.ndim != 2 or codes.shape[1] != self.num_codebooks:
                raise ValueError(f"codes must have shape [frames, {self.num_codebooks}], got {tuple(codes.shape)}")
            if not 0 <= context <= len(codes):
                raise ValueError(f"context_frames {context} outside 0..{len(codes)}")
        chains = _chains(follows if follows is not None else [-1] * n)
        longest = max((len(c) for c, _, _ in chunks), default=0)
        if longest == 0:
            empty = torch.zeros(n, self.state_size, device=self.device, dtype=self.dtype)
            kept = (empty if state is None else state.clone()) if keep_state else None
            return [np.zeros(0, dtype=np.float32) for _ in chunks], kept
        # lengths in buckets of frames: the process's memory settles after the first of each shape
        # instead of growing with every new one
        frames = -(-longest // FRAME_BUCKET) * FRAME_BUCKET
        batch = np.zeros((self._rows(n), self.num_codebooks, frames), dtype=np.int64)
        for i, (codes, _, _) in enumerate(chunks):
            batch[i, :, : len(codes)] = np.clip(codes, 0, self.codebook_size - 1).T
        # the SEANet part of each chunk: from its first new frame when it continues a state (its
        # stream's, or the chunk before it in its row), else from its first frame (context too)
        spf = self._steps_per_frame
        starts = np.array([ctx * spf if on or (follows is not None and follows[i] >= 0) else 0
                           for i, (_, ctx, on) in enumerate(chunks)], np.int64)
        lengths = np.array([len(codes) * spf for codes, _, _ in chunks], np.int64) - starts
        row_lengths = np.array([lengths[chain].sum() for chain in chains], np.int64)
        groups = seanet_groups(row_lengths, self._rows, SEANET_BUCKET * spf, self.split_saving)
        offsets = np.zeros(n, np.int64)  # each chunk's first step in its row
        layouts = [self._row_layout(chunks, [chains[c] for c in members], steps, starts, lengths, offsets)
                   for members, steps in groups]
        # one upload, before any GPU work of this batch: the only wait is for the samples at the end
        codes_t, *flat_t = upload([batch, *(a for layout in layouts for a in layout)], self.device)
        on_device = [_RowLayout(*flat_t[k: k + len(_RowLayout._fields)])
                     for k in range(0, len(flat_t), len(_RowLayout._fields))]
        embedded = self._embed(codes_t)  # [rows, hidden, frames * spf]
        inputs = []  # every call's SEANet input, taken before any SEANet replay may reuse `embedded`'s memory
        for rows in on_device:
            x = embedded[rows.source_row, :, rows.source_step].transpose(1, 2)  # [rows, hidden, steps]
            before = torch.zeros(len(rows.head), self.state_size, device=self.device, dtype=self.dtype)
            if state is not None:
                # where, not a product: a state nobody carries (any row) may hold anything, even NaN
                before = torch.where(rows.carried[:, None].bool(), state.index_select(0, rows.head).to(self.dtype), before)
            inputs.append((x, before))
        after = torch.empty(n, self.state_size, device=self.device, dtype=self.dtype) if keep_state else None
        flat = []  # each call's samples, copied out of the graph's memory before the next replay
        for (members, _), rows, (x, before) in zip(groups, on_device, inputs):
            audio_t, after_t = self._run_seanet(x, rows.length, before)
            flat.append(audio_t[: len(members), 0].reshape(-1).to(torch.float32, copy=True))
            if after is not None:  # every chunk gets its row's end state
                after.index_copy_(0, rows.owner, after_t.index_select(0, rows.owner_row))
        audio = (flat[0] if len(flat) == 1 else torch.cat(flat)).cpu().numpy()
        hop = self._seanet.upsampling
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * n
        at = 0  # the row's first sample in `audio`
        for members, steps in groups:
            for c in members:
                for i in chains[c]:
                    codes, context, _ = chunks[i]
                    first = offsets[i] + context * spf - starts[i]  # past a stateless chunk's context
                    out[i] = np.ascontiguousarray(audio[at + first * hop: at + (first + (len(codes) - context) * spf) * hop])
                at += steps * hop
        return out, after

    def _row_layout(self, chunks, row_chains: list[list[int]], steps: int, starts: np.ndarray,
                    lengths: np.ndarray, offsets: np.ndarray) -> "_RowLayout":
        """One SEANet call's rows (padded to ``self._rows``), each a chain of chunks one after the
        other: where each row step's input is in the transformer's output, and each row's length,
        first chunk and whether that chunk carries a state. Fills ``offsets`` (a chunk's first
        step in its row). Padding rows read chunk 0's first step, have no length and no state."""
        rows = self._rows(len(row_chains))
        layout = _RowLayout(np.zeros((rows, steps), np.int64), np.zeros((rows, steps), np.int64),
                            np.zeros(rows, np.int64), np.zeros(rows, np.int64), np.zeros(rows, np.int64),
                            np.array([i for chain in row_chains for i in chain], np.int64),
                            np.array([r for r, chain in enumerate(row_chains) for _ in chain], np.int64))
        for r, chain in enumerate(row_chains):
            at = 0
            for i in chain:
                layout.source_row[r, at: at + lengths[i]] = i
                layout.source_step[r, at: at + lengths[i]] = starts[i] + np.arange(lengths[i])
                offsets[i] = at
                at += lengths[i]
            layout.length[r], layout.head[r], layout.carried[r] = at, chain[0], bool(chunks[chain[0]][2])
        return layout

    def decode_chunk(self, codes: np.ndarray, context_frames: int) -> np.ndarray:
        """Decode [context + new, K] codes and return only the new frames' samples."""
        if not 0 <= context_frames <= len(codes):
            raise ValueError(f"context_frames {context_frames} outside 0..{len(codes)}")
        return self.decode(codes)[context_frames * self.frame_size :]


class _RowLayout(NamedTuple):
    """One SEANet call's rows (arrays on the host, then the same on the device)."""

    source_row: np.ndarray  # [rows, steps]: each step's chunk (its row of the transformer's output) ...
    source_step: np.ndarray  # [rows, steps]: ... and step there
    length: np.ndarray  # [rows]: the row's true length in steps
    head: np.ndarray  # [rows]: the row's first chunk (whose state it starts from)
    carried: np.ndarray  # [rows]: 1 if that chunk continues a state, else 0 (zeros)
    owner: np.ndarray  # [chunks in the call]: each chunk ...
    owner_row: np.ndarray  # ... and its row


def seanet_groups(lengths: np.ndarray, rows_of, bucket: int, saving: float = SPLIT_SAVING) -> list[tuple[list[int], int]]:
    """Split a batch's rows into one or two SEANet calls: ``[(row indices, steps)]``, ``steps``
    each group's longest length rounded up to ``bucket``. A call's work is its padded rows
    (``rows_of(count)``) times its steps, so one long row (a stream's start, decoded with its
    context) makes every short one (a carried chunk, its new frames only) as long as it. Two
    calls, split at the length that makes the least work, are taken when they save at least
    ``saving`` of the one call's work (a second call costs its own launches)."""
    def padded(length: int) -> int:  # at least one bucket: a call has steps even if its rows have none
        return max(1, -(-int(length) // bucket)) * bucket

    if len(lengths) == 0:
        return []
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [(list(range(len(lengths))), padded(lengths[order[-1]]))]  # one call keeps the batch's row order
    best_work = rows_of(len(order)) * best[0][1]
    limit = best_work * (1 - saving)
    for cut in range(1, len(order)):
        if padded(lengths[order[cut - 1]]) == padded(lengths[order[cut]]):  # a cut between equals only splits rows
            continue
        short, long = order[:cut], order[cut:]
        work = rows_of(len(short)) * padded(lengths[short[-1]]) + rows_of(len(long)) * padded(lengths[long[-1]])
        if work <= limit and work < best_work:
            best, best_work = [(short, padded(lengths[short[-1]])), (long, padded(lengths[long[-1]]))], work
    return best


def _chains(follows: list[int]) -> list[list[int]]:
    """Chunks in SEANet rows: ``follows[i] = j`` puts chunk ``i`` right after chunk ``j``; each
    chain starts at a chunk that follows none."""
    after: dict[int, int] = {}
    for i, j in enumerate(follows):
        if j < 0:
            continue
        if not j < len(follows) or j == i or j in after:
            raise ValueError(f"follows: chunk {i} cannot follow {j} (each chunk follows at most one other, "
                             "and is followed by at most one)")
        after[j] = i
    chains = []
    for i, j in enumerate(follows):
        if j < 0:
            chains.append([i])
            while chains[-1][-1] in after:
                chains[-1].append(after[chains[-1][-1]])
    if sum(map(len, chains)) != len(follows):
        raise ValueError("follows: the chunks' order has a cycle")
    return chains
