"""The logic of the ``codec_decoder`` Triton model: code chunks -> 24 kHz PCM.

Every chunk ``chroma_lm`` sends repeats up to ``context_frames`` already-sent frames in front of
its new frames; Mimi's decoder is causal, so decoding context + new and keeping only the new
frames' samples continues the waveform without a seam. With ``stream_key`` and ``start_frame``
(the ensemble passes both) a chunk whose stream was decoded here up to its start continues from
the SEANet state that left (:mod:`.codec_streams`), so only the decoder transformer sees the
context again. :func:`streaming_difference` measures how far chunked decoding is from decoding the
whole utterance at once (reported in README.md ("Serving on Triton")).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidRequestError
from ..model.codec import Codec, upload
from .codec_streams import StreamStates
from .peer_states import PeerStates

MAX_DECODE_BATCH = 64  # chunks decoded together (bounds activation memory)
HOW = ("carried", "adopted", "restarted", "stateless")  # how chunks decode (CodecService.counts)


@dataclass
class CodecChunk:
    codes: np.ndarray  # [context + new, K] (a leading batch dimension of 1 allowed)
    context: int = 0
    stream: str = ""  # the stream's key ("": decode statelessly, keep nothing)
    start_frame: int = -1  # the stream's index of the first new frame (-1: unknown)


class CodecService:
    def __init__(self, codec: Codec, graph_frames: int = 0, stream_states: int = 0, matmul_tf32: bool = False,
                 peers: PeerStates | None = None):
        """``graph_frames``: on a GPU, capture CUDA graphs for batches of chunks up to this many
        frames (context included) now, at load; 0 decodes eagerly. ``stream_states``: how many
        streams' SEANet states to keep between their chunks (0: every chunk stateless).
        ``matmul_tf32``: the decoder transformer's matrix products on TF32 tensor cores (set on
        ``codec`` here, before its graphs are captured; False leaves the process's setting).
        ``peers``: the states shared with the server's other codec instances (with stream states)."""
        self.codec = codec
        codec.matmul_tf32 = matmul_tf32
        self.num_codebooks = codec.num_codebooks
        if graph_frames < 0:
            raise ValueError(f"cuda_graph_frames must be >= 0, got {graph_frames}")
        if stream_states and stream_states < MAX_DECODE_BATCH:
            raise ValueError(f"stream_states must be 0 or >= {MAX_DECODE_BATCH} (a batch's chunks), got {stream_states}")
        self.streams = (StreamStates(stream_states, codec.state_size, codec.device, codec.dtype, peers)
                        if stream_states else None)
        # chunks decoded: carried (continued from a state: their stream's, or the chunk before them
        # in their SEANet row), adopted (continued from the state another instance left: peers),
        # restarted (past a stream's start, decoded over their context like a stateless one: no
        # state to continue, or a row too long to follow in), stateless (the rest)
        self._decoded = dict.fromkeys(HOW, 0)
        self.graphs = codec.use_cuda_graphs(graph_frames, MAX_DECODE_BATCH)
        # a SEANet row's frames at most (chunks of a stream queued together share a row): within
        # the graphs; without graphs, their default length (a longer row pads every row of its call)
        self.max_row_frames = graph_frames or 24

    def validate(self, chunk: CodecChunk) -> CodecChunk:
        """The chunk with codes as [frames, K] int64 (a leading batch dimension of 1 is dropped)."""
        codes = np.asarray(chunk.codes)
        if codes.size == 0:
            codes = np.zeros((0, self.num_codebooks), np.int64)
        codes = codes.reshape(-1, codes.shape[-1])
        if codes.shape[1] != self.num_codebooks:
            raise InvalidRequestError(f"audio_codes must have {self.num_codebooks} columns, got {codes.shape[1]}", "audio_codes")
        if not 0 <= chunk.context <= len(codes):
            raise InvalidRequestError(f"context_frames {chunk.context} outside 0..{len(codes)}", "context_frames")
        if chunk.start_frame < -1:
            raise InvalidRequestError(f"start_frame must be >= 0 (-1: none), got {chunk.start_frame}", "start_frame")
        return CodecChunk(codes.astype(np.int64), chunk.context, chunk.stream, chunk.start_frame)

    def decode(self, codes: np.ndarray, context_frames: int) -> np.ndarray:
        return self.decode_many([CodecChunk(codes, context_frames)])[0]

    def counts(self) -> dict[str, int]:
        return dict(self._decoded)

    def forget(self, stream: str) -> None:
        """Drop a stream's state (it was cancelled: no chunk of it will be decoded again)."""
        if self.streams is not None:
            self.streams.forget(stream)

    def decode_many(self, chunks: list[CodecChunk]) -> list[np.ndarray | Exception]:
        """Decode the chunks of several requests in one batched call; a chunk that fails
        validation gets its exception in its place and does not stop the others."""
        out: list[np.ndarray | Exception] = []
        good: list[tuple[int, CodecChunk]] = []
        for i, chunk in enumerate(chunks):
            try:
                valid = self.validate(chunk)
            except InvalidRequestError as exc:
                out.append(exc)
                continue
            out.append(np.zeros(0, np.float32))
            if len(valid.codes) > valid.context:
                good.append((i, valid))
        for start in range(0, len(good), MAX_DECODE_BATCH):
            part = good[start:start + MAX_DECODE_BATCH]
            for (i, _), samples in zip(part, self._decode_part([c for _, c in part])):
                out[i] = np.ascontiguousarray(samples, dtype=np.float32)
        return out

    def _keeps_state(self, chunk: CodecChunk) -> bool:
        return self.streams is not None and bool(chunk.stream) and chunk.start_frame >= 0

    def _decode_part(self, chunks: list[CodecChunk]) -> list[np.ndarray]:
        """One batched decode. Several chunks of one stream (queued while the codec was behind)
        stay in it: each that starts where the one before it ends follows it in its SEANet row
        (:meth:`Codec.decode_carried`'s ``follows``), so they decode as a carried stream would,
        one after the other, in one call. A chunk that cannot follow decodes statelessly over its
        context: after a gap, when its context frames are not that chunk's frames, or when its row
        would pass ``max_row_frames``. The stream keeps the state of its furthest chunk. One call
        per batch either way: rounds would make a codec that fell behind slower still."""
        keeps = [self._keeps_state(c) for c in chunks]
        if not any(keeps):
            self._decoded["stateless"] += len(chunks)
            return self.codec.decode_batch([(c.codes, c.context) for c in chunks])
        adopted = self._adopt(chunks, keeps)
        slots, follows = self._plan_rows(chunks, keeps)
        carried = [slot is not None for slot in slots]
        for c, keep, on, followed in zip(chunks, keeps, carried, follows):
            how = ("carried" if on or followed >= 0 else "restarted" if keep and c.start_frame > 0 else "stateless")
            if on and (c.stream, c.start_frame) in adopted:
                how = "adopted"
            self._decoded[how] += 1
        state = self.streams.gather(slots)
        audio, after = self.codec.decode_carried([(c.codes, c.context, on) for c, on in zip(chunks, carried)], state,
                                                 follows=follows)
        furthest: dict[str, int] = {}  # stream -> index of its chunk that ends last
        for i, (c, keep) in enumerate(zip(chunks, keeps)):
            if keep and (c.stream not in furthest or c.start_frame >= chunks[furthest[c.stream]].start_frame):
                furthest[c.stream] = i
        kept = list(furthest.values())
        (rows,) = upload([np.array(kept)], after.device)
        self.streams.store([chunks[i].stream for i in kept],
                           [chunks[i].start_frame + len(chunks[i].codes) - chunks[i].context for i in kept],
                           after.index_select(0, rows))
        return audio

    def _adopt(self, chunks: list[CodecChunk], keeps: list[bool]) -> set[tuple[str, int]]:
        """Take over from the peers the states of the streams in the batch whose first chunk
        (by start frame) has none here; return those (stream, start frame) pairs."""
        if self.streams.peers is None:
            return set()
        first: dict[str, int] = {}
        for c, keep in zip(chunks, keeps):
            if keep and c.start_frame > 0 and c.start_frame < first.get(c.stream, c.start_frame + 1):
                first[c.stream] = c.start_frame
        wanted = [(key, frame) for key, frame in first.items() if self.streams.slot_for(key, frame) is None]
        self.streams.adopt(wanted, keep=frozenset(c.stream for c, keep in zip(chunks, keeps) if keep))
        return {(key, frame) for key, frame in wanted if self.streams.slot_for(key, frame) is not None}

    def _plan_rows(self, chunks: list[CodecChunk], keeps: list[bool]) -> tuple[list[int | None], list[int]]:
        """Per chunk: the state slot it continues (its stream's state ends where it starts) and
        the chunk of the batch it follows in a SEANet row (-1: none). A chunk that continues the
        stored state heads a row of its own, even if it could follow another chunk of the batch
        (one sent again, say): the stored state is the exact one."""
        slots: list[int | None] = [None] * len(chunks)
        follows = [-1] * len(chunks)
        streams: dict[str, list[int]] = {}
        for i, (c, keep) in enumerate(zip(chunks, keeps)):
            if keep:
                streams.setdefault(c.stream, []).append(i)
        for key, members in streams.items():
            members.sort(key=lambda i: chunks[i].start_frame)
            row = 0  # the SEANet frames of the row being built
            for pos, b in enumerate(members):
                chunk = chunks[b]
                new = len(chunk.codes) - chunk.context
                slots[b] = self.streams.slot_for(key, chunk.start_frame)
                if slots[b] is not None:
                    row = new  # carried: its new frames only
                elif pos > 0 and _continues(chunks[members[pos - 1]], chunk) and row + new <= self.max_row_frames:
                    follows[b] = members[pos - 1]
                    row += new
                else:
                    row = len(chunk.codes)  # heads a row of its own, over its context
        return slots, follows


def _continues(prev: CodecChunk, chunk: CodecChunk) -> bool:
    """``chunk`` starts where ``prev`` ends, and its context frames are ``prev``'s last frames (as
    far as ``prev`` has them)."""
    if chunk.start_frame != prev.start_frame + len(prev.codes) - prev.context:
        return False
    k = min(chunk.context, len(prev.codes))
    return np.array_equal(chunk.codes[chunk.context - k: chunk.context], prev.codes[len(prev.codes) - k:])


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


def streaming_difference(codec: Codec, codes: np.ndarray, chunks: list[tuple[np.ndarray, int]],
                         carried: bool = False) -> StreamingDifference:
    """Compare ``decode(all codes)`` with the concatenation of the chunks' decodes (each chunk
    ``(codes with left context, context_frames)``, in stream order): stateless ones
    (``decode_chunk``), or with ``carried`` the way codec_decoder serves one stream, each chunk
    continuing from the SEANet state the previous one left."""
    whole = codec.decode(codes)
    if carried:
        service, start, pieces = CodecService(codec, stream_states=MAX_DECODE_BATCH), 0, []
        for c, ctx in chunks:
            pieces += service.decode_many([CodecChunk(c, ctx, "difference", start)])
            start += len(c) - ctx
    else:
        pieces = [codec.decode_chunk(c, ctx) for c, ctx in chunks]
    streamed = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if len(streamed) != len(whole):
        raise AssertionError(f"streamed decode has {len(streamed)} samples, one-shot {len(whole)}")
    diff = streamed.astype(np.float64) - whole.astype(np.float64)
    return StreamingDifference(
        frames=len(codes), chunks=len(chunks), samples=len(whole),
        max_abs=float(np.abs(diff).max()) if diff.size else 0.0,
        rms=float(np.sqrt(np.mean(diff ** 2))) if diff.size else 0.0,
        signal_rms=float(np.sqrt(np.mean(whole.astype(np.float64) ** 2))) if whole.size else 0.0,
    )
