"""Triton adapter of codec_decoder; the logic is chroma_triton.serving.triton_codec."""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from chroma_triton.serving import protocol as P
from chroma_triton.serving.cancel_board import CancelBoard
from chroma_triton.serving.codec_trace import CodecTrace
from chroma_triton.serving.gc_pauses import freeze_if_asked
from chroma_triton.serving.model_args import ModelArgs, configure_logging, input_array, load_model_parts
from chroma_triton.serving.peer_states import PeerStates
from chroma_triton.serving.triton_codec import CodecChunk, CodecService


class TritonPythonModel:
    def initialize(self, args):
        configure_logging()
        a = ModelArgs.from_triton(args)
        path, parts = load_model_parts(a, {"codec"})
        self.board = CancelBoard()  # the streams chroma_lm saw cancelled ("gone")
        stream_states, shared = a.int("stream_states", 4096), a.int("shared_stream_states", 0)
        if shared < 0:
            raise ValueError(f"shared_stream_states must be >= 0, got {shared}")
        # the server's other instances (one per GPU) read the states this one writes, and back
        self.peers = (PeerStates.open(self.board.folder, a.instance_name, shared, parts.codec.state_size)
                      if shared and stream_states else None)
        self.service = CodecService(parts.codec, graph_frames=a.int("cuda_graph_frames", 24),
                                    stream_states=stream_states, matmul_tf32=a.bool("matmul_tf32", True),
                                    peers=self.peers)
        self._skip_family = pb_utils.MetricFamily(
            name="chroma_codec_skipped_chunks_total", kind=pb_utils.MetricFamily.COUNTER,
            description="Chunks not decoded because their stream had been cancelled")
        labels = {"model": a.name, "instance": a.instance_name}
        self.skipped = self._skip_family.Metric(labels=labels)
        self._chunk_family = pb_utils.MetricFamily(
            name="chroma_codec_chunks_total", kind=pb_utils.MetricFamily.COUNTER,
            description="Chunks decoded, by how: carried (continued a state: their stream's, or the chunk "
                        "before them in the same batch), adopted (continued the state another instance left), "
                        "restarted (past a stream's start, decoded over their context), stateless (the rest)")
        self.chunk_counters = {how: self._chunk_family.Metric(labels={**labels, "how": how})
                               for how in self.service.counts()}
        trace_path = a.instance_path("trace_path")
        self.trace = CodecTrace(trace_path) if trace_path else None
        freeze_if_asked(a)  # once loaded, its graphs captured: none of that is garbage
        shares = f", stream states shared through {self.peers.own.path}" if self.peers is not None else ""
        print(f"[{a.instance_name}] ready on {a.device}: {path} ({self.service.graphs} CUDA graphs{shares})", flush=True)

    def execute(self, requests):
        # The dynamic batcher hands over the chunks of several streams: decode them in one call.
        started = time.time()
        responses = [None] * len(requests)
        chunks, slots = [], []
        skipped = 0
        for i, request in enumerate(requests):
            try:
                # the client left: its ensemble request was cancelled while this chunk waited in the
                # queue; nobody will hear it, so do not decode it. Triton flags the chunks created
                # after the cancel, and the dynamic batcher drops those before they get here;
                # chroma_lm marks the stream gone for those created before. (Not
                # request.is_cancelled(): a round trip to the server per chunk, for chunks the
                # batcher has already dropped.)
                key = P.as_text(input_array(request, P.STREAM_KEY), P.STREAM_KEY, "")
                gone = self.board.is_gone(key)
                if not gone:
                    start = P.as_scalar(input_array(request, P.START_FRAME), P.START_FRAME)
                    chunk = CodecChunk(input_array(request, P.AUDIO_CODES),
                                       int(P.as_scalar(input_array(request, P.CONTEXT_FRAMES), P.CONTEXT_FRAMES) or 0),
                                       key, -1 if start is None else int(start))
            except Exception as exc:  # noqa: BLE001
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(P.error_message(exc)))
                continue
            if gone:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(P.AUDIO, np.zeros((1, 0), np.float32))])
                self.service.forget(key)
                skipped += 1
                continue
            chunks.append(chunk)
            slots.append(i)
        if skipped:
            self.skipped.increment(skipped)
        counts = self.service.counts()
        decode_start = time.perf_counter()
        try:
            decoded = self.service.decode_many(chunks)
        except Exception as exc:  # noqa: BLE001 - the batched decode failed: every chunk in it fails
            decoded = [exc] * len(chunks)
        decoded_s = time.perf_counter() - decode_start
        new = {how: count - counts[how] for how, count in self.service.counts().items()}
        for how, count in new.items():
            if count:
                self.chunk_counters[how].increment(count)
        for i, audio in zip(slots, decoded):
            if isinstance(audio, Exception):
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(P.error_message(audio)))
            else:  # [1, samples]: this model batches, so its output keeps the request's batch dimension
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(P.AUDIO, audio[None])])
        if self.trace is not None:
            frames = sum(len(a) for a in decoded if not isinstance(a, Exception)) // self.service.codec.frame_size
            self.trace.execute(started, decoded_s, len(requests), frames, new, skipped)
        return responses

    def finalize(self):
        if self.trace is not None:
            self.trace.close()
        if self.peers is not None:
            self.peers.close()
