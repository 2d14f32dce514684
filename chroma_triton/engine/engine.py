"""The Chroma generation engine: continuous batching of the thinker / backbone / decoder loop.

One background thread owns the models and their static caches. Requests join between steps
(each gets a cache row), advance together in batched steps, and leave on EOS, `max_tokens`,
cancellation or error, freeing their row for the next one. Per step, for every active request:

  frame 0 (at admission): thinker prefill -> (h0, t1); backbone prefill over
      [<|text_start|>, ref transcript, <|text_end|>, ref frames..., zero, h0, embed(t1)]
  frame n > 0: backbone input [frame_emb(frame n-1)], plus, on even n while the thinker is
      still talking, [h_k, embed(t_k+1)] from one batched greedy thinker step (text:audio = 1:2);
      the pair carrying <|im_end|> is still fed, then the thinker stops.
  then codebook 0 from the backbone head and codebooks 1..K-1 from the depth decoder.
A frame whose first K-1 codebooks are all EOS ends the request (finish "stop", not emitted).

Batch shape, kept simple for CUDA graphs: active requests occupy cache rows 0..B-1 (a leaving
request's row is refilled by the last one), and every request's frame parity is the same, because
new requests are admitted only on even ("talking") global steps. So a talking step is one thinker
call over rows 0..B-1 and one width-3 backbone call (silent rows feed zeros they never attend
to), and the other steps are one width-1 backbone call. Host state is authoritative; inputs go
to the device in one packed copy and codes (+ thinker tokens) come back in one sync per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from .. import sampling_kernel
from ..errors import CapacityError, EngineError, InvalidRequestError
from ..model import decode_attention, gemv
from ..model.frame_model import FrameModel, SamplingTensors
from ..model.loading import ChromaParts, make_thinker, resolve_thinker_backend
from ..model.thinker import Thinker, TorchThinker, pad_batch
from ..model.trunk import eager_layers
from .capacity import GIB, PREFIX_CACHE_AUTO, admission_scratch_bytes, kv_bytes_per_row, free_device_bytes, plan_rows, trunk_kv_bytes
from .detokenizer import IncrementalDetokenizer, fast_decode
from .graphs import StepRunner, batch_buckets, bucket, length_buckets
from .pacing import AdmissionPacer, StreamState
from .prefix_rest_graphs import PrefixRestGraphs
from .prefill_graphs import TAIL_MAX_LEN, BackboneTailGraphs, PrefillGraphs, scratch_positions_up_to
from .trace import EngineTrace
from .thinker_prefix import BLOCK, PrefixMatch, ThinkerPrefixCache, prefix_groups, prompt_block_keys
from .voice_prefix import VoicePrefixCache, copy_prefixes, voice_key
from .request import AudioChunk, Finished, GenerationRequest, RequestFailed, RequestStream, SamplingParams, TextDelta

log = logging.getLogger(__name__)
_ENGINE_NUMBERS = itertools.count()  # this process's engines, for names of their own (thinker_prefix_peers)


ALL_TRUNKS = "thinker,backbone,decoder"  # the value of a trunk-list option that names every trunk


def _trunk_names(option: str, value: str) -> set[str]:
    """The trunks a comma-separated option names (thinker, backbone, decoder)."""
    wanted = {t.strip() for t in value.split(",") if t.strip()}
    unknown = wanted - set(ALL_TRUNKS.split(","))
    if unknown:
        raise ValueError(f"{option}: unknown trunk(s) {sorted(unknown)}; use thinker, backbone, decoder")
    return wanted


#: the options that use a Triton kernel (set: True, or trunk names), each with the check that its
#: module can run it
TRITON_KERNEL_OPTIONS = {"fused_sampling": sampling_kernel.available, "gemv": gemv.available,
                         "decode_attention": decode_attention.available}


@dataclass
class EngineOptions:
    max_batch: int = 8  # concurrent requests (cache rows)
    thinker_max_len: int = 4096  # thinker context per request (prompt + reply tokens)
    backbone_max_len: int = 4096  # backbone context per request (reference prompt + 1-3 per frame)
    max_frames: int = 4000  # upper bound a request may ask for with max_tokens
    first_chunk_frames: int = 2  # first audio chunk small for latency...
    start_slack_s: float = 0.14  # ...but large enough that the listener still has this much audio in hand
    #                              when the second chunk goes out (more frames when steps are slow; 0: off)
    chunk_frames: int = 10  # largest chunk
    context_frames: int = 12  # already-sent frames repeated before each chunk as decode context
    max_queue: int = 1024  # requests waiting for a row before submit() refuses
    max_queue_wait_s: float = 30.0  # a request still waiting for a row after this long is refused
    #                                 ("server busy", HTTP 429) rather than answered later; 0: no limit
    max_prefills_per_step: int = 16  # requests prefilled together (one batched call) per step
    prefill_token_budget: int = 4096  # ...and their prompt tokens (to compute: less a stored prefix), so a burst
    #                                  does not stall running streams
    admission_pacing: bool = True  # admit only what running streams can wait for (engine/pacing.py)
    admission_margin_s: float = 0.2  # audio kept in hand at every listener when admitting (0.1 before
    #                                  session 9: 0.2 cut 256-stream late requests from ~50 to 0-3 per 512, runs 37)
    admission_slack: bool = True  # while requests wait, chunks keep their prefill's worth more in hand
    pacing_sigmas: float = 0.0  # plan admissions and chunks with prefill and step times this many
    #                             standard deviations (of their recent spread) above average (engine/pacing.py)
    max_admission_wait_s: float = 5.0  # ...but never keep a waiting request out longer than this:
    forced_admissions: int = 0  # admit at most this many per step then (0: as many as fit, up to
    #                             max_prefills_per_step)
    admission_wait_clock: str = "free_row"  # what max_admission_wait_s counts: the time the pacer has
    #   kept a free row empty while requests waited ("free_row"), or since the queue's head arrived
    #   ("arrival", before session 15: under overload every queued request was that old, so every
    #   admission was forced and stalled the running streams; docs/benchmarks.md run 49)
    kv_memory_fraction: float = 0.9  # on a GPU: share of free memory the KV caches may take (engine/capacity.py)
    activation_reserve_gib: float = 4.0  # ...after keeping this much for activations and graph pools
    cuda_graphs: bool = True  # on CUDA: capture steps as graphs (ignored on CPU)
    capture_at_start: bool = True  # ...every step graph before serving, not when a shape is first needed
    prefill_graphs: bool = False  # on CUDA: the thinker's prompt prefill, and the backbone's two positions after a
    #                               cached voice prefix, through graphs (engine/prefill_graphs.py)
    prefill_graph_max_len: int = 4096  # ...for prompts up to this many tokens (and thinker_max_len; longer: eager)
    prefill_graph_tokens: int = 8192  # ...in buckets of rows x length up to this many positions (one row always):
    #                                   long prompts get fewer rows, so the scratch stays that of 16 x 512
    compiled_prefill_graphs: bool = True  # with compile: the prefill graphs run the compiled layers too (their shapes
    #                                 are buckets; compiled at start), not eager ones
    overlap: bool = True  # launch step n+1 before reading step n's codes (host work overlaps the device's)
    thinker_ahead: bool = True  # run the thinker's step for the next talking step right after this one,
    #                              on a second CUDA stream, concurrently with the silent frame step between
    voice_prefix_cache: int = 32  # voices whose backbone prefix keys/values are kept (engine/voice_prefix.py); 0: off
    thinker_prefix_cache_mib: int = 0  # device memory for earlier prompts' thinker keys/values, so a prompt that
    #                                    starts as a stored one (a conversation's next turn, a shared system
    #                                    prompt) prefills only the rest (engine/thinker_prefix.py; PyTorch
    #                                    thinker); 0: off; PREFIX_CACHE_AUTO: a share of what the rows
    #                                    leave (engine/capacity.py). Kept out of the KV rows' budget
    thinker_prefix_min_tokens: int = 256  # ...reused only when at least this many positions match
    thinker_prefix_peers: str = ""  # a folder: engines (one per GPU) whose thinker prefix caches name the same one
    #                                 copy each other's stored prompts instead of prefilling them
    #                                 (engine/peer_prefixes.py); "": this engine's cache is its own
    compile: bool = False  # torch.compile each decoder layer and the sampler (fused kernels; CPU: needs a C++ compiler)
    # kernel choices for steps, same results (bench_engine.py --variants compares them on a GPU):
    math_attention: str = ""  # trunks ("thinker,backbone,decoder") whose steps attend by matmuls, not SDPA
    decode_attention: str = ""  # trunks whose steps attend by a Triton kernel that reads each row's keys up to its
    #                             own length (model/decode_attention.py; CUDA), not SDPA up to the batch's key bucket
    topk_segments: int = 1  # > 1: sampling's top-k over that many vocabulary slices first (sampling.segmented_topk)
    fused_sampling: bool = False  # on CUDA: each sampling call as one Triton kernel (sampling_kernel.py)
    #                               instead of PyTorch's topk and elementwise kernels; the same noise
    gemv: bool = False  # on CUDA: single-row products with at most 4096 inputs by a Triton kernel (model/gemv.py)
    #                     instead of cuBLAS (batch-1 steps); process-wide, like switch_interval_ms
    switch_interval_ms: float = 0.0  # > 0: Python's thread switch interval (process-wide), so the engine
    #                                  thread gets the GIL back sooner after a wait (default 5 ms)
    key_bucket: int = 256  # key-length bucket of captured graphs
    thinker_backend: str = "torch"  # "auto" | "torch" | "sglang" (model.loading.make_thinker)
    thinker_options: dict = field(default_factory=dict)  # backend options (SGLang: engine_kwargs, ...)
    trace_path: str = ""  # JSON lines of admissions, steps, start-up and late chunks (engine/trace.py); "": off


@dataclass
class _Active:
    req: GenerationRequest
    stream: RequestStream
    row: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    prompt_tokens: int
    thinker_pos: int
    thinker_token: int
    thinker_done: bool
    backbone_pos: int
    step: int = 0
    text_tokens: int = 0
    last_codes: np.ndarray | None = None
    frames: list[np.ndarray] = field(default_factory=list)
    sent: int = 0  # frames already sent in chunks
    first_chunk_at: float | None = None  # monotonic time the first chunk was sent
    in_hand_s: float = 0.0  # audio the listener had left right after the last chunk went out
    chunks: int = 0  # chunks sent
    finish: str | None = None


@dataclass
class _ChunkPlan:
    """How chunks are sized in one step (engine._chunk_plan)."""
    first: int  # frames of a first chunk
    slack_s: float  # audio every listener should keep in hand when a chunk goes out (0: no guard)
    step_s: float | None  # the pacer's step time


@dataclass
class _Launched:
    """A step queued on the device whose codes the host has not read yet."""
    batch: list[_Active]  # its rows (row i = batch[i]); no row moves while it is in flight
    codes: torch.Tensor  # [Bp, K + 1] on the device: the frame's codes, then the thinker's token
    host: object  # () -> the same as a host array, waiting for the copy
    talked: set[int]  # rows whose thinker advanced (their token is in column K)
    at_cache_end: set[int]  # rows with no backbone room for another step: they finish here
    old_rows: int  # rows that were running before the step (the others were admitted in it)
    prefill_s: float  # time spent admitting in it
    timing: "_StepTiming | None" = None  # GPU timestamps of the step (CUDA only)


@dataclass
class _StepTiming:
    """Events around one step on the engine's stream: from `started` to `done` the GPU worked on
    the step (its prefills included); from the previous step's `done` to `started` it had nothing
    of ours queued, i.e. waited for the host."""
    started: torch.cuda.Event
    done: torch.cuda.Event
    after: torch.cuda.Event | None  # the previous step's `done`, when the two ran back to back


@dataclass
class _Ahead:
    """A thinker step launched early (thinker_ahead) for the next talking step of `batch`."""
    batch: list[_Active]  # the rows it ran for (row i = batch[i]); valid only if they still are
    positions: list[int]  # each row's thinker position it ran at
    h: torch.Tensor  # post-norm states [Bp, H]
    nxt: torch.Tensor  # greedy ids [Bp]
    done: torch.cuda.Event | None  # on its stream (CUDA)


# packed per-row integer inputs of one step (one host->device copy)
_TOKEN, _TPOS, _BPOS, _TALK, _SEED, _FRAME, _TOPK = range(7)
_NINT = 7


def _let_go_of_audio(items: list[tuple[GenerationRequest, RequestStream]]) -> None:
    """Admitted: the requests' host copies of their audio embeddings (float32 or bf16, up to 11 MB
    a conversation, held for the whole reply otherwise) are in the rows now and not needed again.
    Only after the prefill went through (a failed one is retried request by request with them). The
    SGLang thinker keeps its own reference for the row's life (model/sglang_thinker.py)."""
    for req, _ in items:
        req.audio_embeds = None


class ChromaEngine:
    TRACED_CHUNKS = 5  # a trace records each stream's first chunks (audio left at the listener when each went out)

    def __init__(self, parts: ChromaParts, options: EngineOptions | None = None, thinker: Thinker | None = None):
        if parts.thinker_lm is None or parts.frame_model is None or parts.tokenizer is None:
            raise ValueError("the engine needs the thinker, frame_model and tokenizer parts")
        self.opts = dataclasses.replace(options or EngineOptions())
        self.cfg = parts.config
        self.device = parts.device
        if self.device.type == "cuda" and self.device.index is None:  # the engine thread makes it current
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.special = parts.special
        self.default_top_k = parts.top_k
        self.tokenizer = parts.tokenizer
        self._decode = fast_decode(self.tokenizer)  # shared by every request's detokenizer
        self._owns_thinker = thinker is None
        self.thinker: Thinker = self._make_thinker_and_size(parts, thinker)
        # optional hooks of thinkers that generate ahead (SGLangThinker): host-side wait before a
        # talking step, and release of a row whose request left
        self._prepare_decode = getattr(self.thinker, "prepare_decode", None)
        self._release_row = getattr(self.thinker, "release_row", None)
        self.frames: FrameModel = parts.frame_model
        self.frames.setup_caches(self.opts.max_batch, self.opts.backbone_max_len)
        self.num_codebooks = self.cfg.num_codebooks
        on_gpu = self.device.type == "cuda"
        # the compile switch lives on the shared modules: set it both ways, so this engine runs
        # what its options say whatever an earlier engine over the same parts chose
        self.frames.set_compiled(self.opts.compile)
        if parts.thinker_lm is not None:
            parts.thinker_lm.model.set_compiled(self.opts.compile)
        self._set_kernel_choices(parts)
        self.runner = StepRunner(use_graphs=on_gpu and self.opts.cuda_graphs, device=self.device if on_gpu else None)
        # on a GPU, pad to buckets (graphs need static shapes); on a CPU, run exact shapes
        self._batch_sizes = batch_buckets(self.opts.max_batch) if on_gpu else list(range(1, self.opts.max_batch + 1))
        self._thinker_lens = length_buckets(self.opts.thinker_max_len, self.opts.key_bucket) if on_gpu else None
        self._backbone_lens = length_buckets(self.opts.backbone_max_len, self.opts.key_bucket) if on_gpu else None
        self._pending: queue.Queue[tuple[GenerationRequest, RequestStream] | None] = queue.Queue()
        self._staged: deque = deque()  # taken off the queue, waiting for admission (queue order)
        if min(self.opts.forced_admissions, self.opts.start_slack_s, self.opts.pacing_sigmas, self.opts.max_queue_wait_s) < 0:
            raise ValueError("forced_admissions, start_slack_s, pacing_sigmas and max_queue_wait_s must be >= 0 "
                             "(0: as many as fit / off / plan with averages / no limit)")
        if self.opts.admission_wait_clock not in ("free_row", "arrival"):
            raise ValueError(f"admission_wait_clock must be free_row or arrival, got {self.opts.admission_wait_clock!r}")
        self.pacer = AdmissionPacer(self.opts.admission_margin_s, self.opts.max_admission_wait_s,
                                    forced_max=self.opts.forced_admissions or None, sigmas=self.opts.pacing_sigmas)
        self._held_since: float | None = None  # since when the pacer has kept a free row empty (admission_wait_clock)
        self._frame_s = self.cfg.frame_seconds
        self._next_prefill_tokens = 0  # prompt positions of the next admission's batch, as last planned
        self.trace = EngineTrace(self.opts.trace_path) if self.opts.trace_path else None
        # for profilers (scripts/profile_engine.py): a callable the engine's thread calls before each
        # step (a profiler records the thread that starts it), and whether steps and batched
        # prefills are marked as profiler ranges ("chroma.step", "chroma.prefill[N]")
        self.between_steps = None
        self.profile_ranges = False
        self._last_prefill_s: float | None = None
        self._active: list[_Active] = []  # _active[i].row == i
        self._global_step = 0
        self._lock = threading.Lock()
        # rows claimed: requests submitted and not yet ended (waiting, being admitted or running);
        # counted on submit and released by their stream's last event, under their own lock
        self._room = threading.Condition()
        self._claimed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters = {"admitted": 0, "finished": 0, "cancelled": 0, "failed": 0, "frames": 0, "steps": 0,
                         "voice_prefix_hits": 0, "voice_prefix_misses": 0, "thinker_ahead_used": 0,
                         # seconds (CUDA): the GPU on our steps, the GPU idle between two of our
                         # steps (waiting for the host), the host blocked on a step's codes
                         "gpu_step_s": 0.0, "gpu_idle_s": 0.0, "host_wait_s": 0.0,
                         # seconds (any device): the engine thread's wall time in steps and its CPU
                         # time in them; the gap is time it could not run (waiting for the GIL, held
                         # by other threads of the process, or for a core), plus any blocking wait
                         # for the device (CUDA's default waits spin or yield, so they count as CPU)
                         "host_step_s": 0.0, "host_cpu_s": 0.0,
                         # admissions: batched prefill calls and their wall time (synchronised on CUDA;
                         # running streams wait for it)
                         "prefills": 0, "prefill_s": 0.0,
                         # the prompts of those prefills by path: admission graphs, or eager (no graphs,
                         # or longer than their buckets)
                         "prefill_graph_prompts": 0, "prefill_eager_prompts": 0,
                         # prompts that started as a stored one (thinker_prefix_cache_mib) and the
                         # positions they took from it instead of prefilling them
                         "prefill_prefix_prompts": 0, "prefill_prefix_tokens": 0,
                         # ...of those prompts, the ones whose rest replayed as a graph (prefix_rest_graphs.py)
                         "prefill_prefix_graph_prompts": 0,
                         # stored prompts copied from another engine's thinker prefix cache before an
                         # admission (thinker_prefix_peers), their positions, the copies thrown away
                         # (the other engine dropped the prompt meanwhile) and the wall time of the copies
                         "prefix_imports": 0, "prefix_import_tokens": 0, "prefix_imports_lost": 0,
                         "prefix_import_s": 0.0,
                         # the pacer's estimates of those prefills (once it has one), and by how much
                         # they ran over them in all: an overrun is a stall the running streams were
                         # not kept ready for
                         "prefill_estimate_s": 0.0, "prefill_overrun_s": 0.0,
                         # requests admitted past the pacer's allowance (waited max_admission_wait_s)
                         "forced_admissions": 0,
                         # requests refused after waiting max_queue_wait_s for a row (overload)
                         "queue_timeouts": 0,
                         # chunks put on a stream after its listener's audio would have run out, by
                         # the engine's clock (playback from the first chunk's send), and by how much:
                         # late here is late at the client too unless the first chunk's delivery took
                         # longer than this one's; late only at the client is delivery's doing
                         "late_chunks": 0, "late_chunk_s": 0.0}
        self._last_done: torch.cuda.Event | None = None  # the latest step's end marker (CUDA)
        self._compiled_shapes = False
        self._captured_at_start = False
        self._inflight: _Launched | None = None
        self.voice_prefixes = VoicePrefixCache(self.opts.voice_prefix_cache)
        self.thinker_prefixes: ThinkerPrefixCache | None = None
        if isinstance(self.thinker, TorchThinker):
            self.thinker_prefixes = self._make_thinker_prefix_cache()
        elif self.opts.thinker_prefix_cache_mib:
            log.info("thinker_prefix_cache_mib applies to the PyTorch thinker only; this engine's thinker "
                     "(%s) keeps its own caches", type(self.thinker).__name__)
        self._dead: str | None = None  # why the loop stopped, once it has
        self._pinned: dict[tuple, list[torch.Tensor]] = {}
        self._ahead: _Ahead | None = None
        # thinker_ahead: the thinker's graphs replay on their own stream, concurrently with the
        # engine's, so they are captured on it too (their own cuBLAS workspace; see StepRunner);
        # high priority: a step waits for it, never the other way round
        self._thinker_stream = torch.cuda.Stream(self.device, priority=-1) if on_gpu and self.opts.thinker_ahead else None
        self.thinker_runner = self.runner if self._thinker_stream is None else StepRunner(
            use_graphs=self.opts.cuda_graphs, device=self.device, capture_stream=self._thinker_stream)
        # with compile: the admission graphs run compiled layers (compiled in start(), like the steps)
        self._compiled_prefill_graphs = self.opts.compile and self.opts.compiled_prefill_graphs
        self.prefill_graphs = None
        if self.opts.prefill_graphs and isinstance(self.thinker, TorchThinker):
            self.prefill_graphs = PrefillGraphs(self.thinker, min(self.opts.max_prefills_per_step, self.opts.max_batch),
                                                self.opts.prefill_graph_max_len, self.device,
                                                use_graphs=self.opts.cuda_graphs, compiled=self._compiled_prefill_graphs,
                                                max_tokens=self.opts.prefill_graph_tokens)
        # prompts after a stored thinker prefix: their rests through graphs of their own
        self.prefix_rest_graphs = None
        if self.prefill_graphs is not None and self.thinker_prefixes is not None:
            self.prefix_rest_graphs = PrefixRestGraphs(self.prefill_graphs, self.thinker_prefixes.min_tokens)
        # the backbone's two positions of an admission whose voice prefix is cached (any thinker)
        self.backbone_tails = None
        if self.opts.prefill_graphs and self.voice_prefixes.capacity:
            self.backbone_tails = BackboneTailGraphs(self.frames, min(self.opts.max_prefills_per_step, self.opts.max_batch),
                                                     self._tail_graph_len(), self.device,
                                                     use_graphs=self.opts.cuda_graphs, compiled=self._compiled_prefill_graphs)

    def _set_kernel_choices(self, parts: ChromaParts) -> None:
        """Apply `math_attention`, `decode_attention`, `topk_segments`, `fused_sampling` and `gemv`
        to the shared modules (both ways, like compile)."""
        trunks = {"backbone": self.frames.backbone.model, "decoder": self.frames.decoder.model}
        if parts.thinker_lm is not None:
            trunks["thinker"] = parts.thinker_lm.model
        math, kernel = _trunk_names("math_attention", self.opts.math_attention), \
            _trunk_names("decode_attention", self.opts.decode_attention)
        if self.opts.topk_segments < 1:
            raise ValueError("topk_segments must be >= 1")
        # checked before the shared modules change
        for name, available in TRITON_KERNEL_OPTIONS.items():
            if getattr(self.opts, name) and self.device.type != "cuda":
                raise ValueError(f"{name} needs a CUDA device; this engine runs on {self.device}")
            if getattr(self.opts, name) and not available():
                raise ValueError(f"{name} needs Triton, which is not installed (it comes with PyTorch's CUDA builds)")
        for name, trunk in trunks.items():
            trunk.set_math_attention(name in math)
            trunk.set_decode_attention(name in kernel)
        self.frames.topk_segments = self.opts.topk_segments
        self.frames.fused_sampling = self.opts.fused_sampling
        gemv.ENABLED = self.opts.gemv

    def _make_thinker_and_size(self, parts: ChromaParts, thinker: Thinker | None) -> Thinker:
        """The thinker, and `opts.max_batch` lowered to the rows whose KV caches fit in memory.
        A PyTorch thinker's cache counts per row and is allocated after sizing; another thinker
        (SGLang, or one passed in) holds its own memory before free memory is measured."""
        o = self.opts
        torch_thinker = thinker is None and resolve_thinker_backend(o.thinker_backend, self.device) == "torch"
        if thinker is None and not torch_thinker:
            thinker = make_thinker(parts, o.thinker_backend, o.max_batch, o.thinker_max_len, **o.thinker_options)
        dtype_bytes = parts.frame_model.backbone.codebook0_head.weight.element_size()
        per_row = kv_bytes_per_row(self.cfg, o.thinker_max_len, o.backbone_max_len, dtype_bytes, torch_thinker)
        scratch = 0
        if o.prefill_graphs:  # PrefillGraphs' and BackboneTailGraphs' scratch caches (made in __init__)
            prefill_graphs = torch_thinker or isinstance(thinker, TorchThinker)  # as __init__ decides
            rows = min(o.max_prefills_per_step, o.max_batch)  # max_batch may come out lower: any row count up to it
            prompt_positions = scratch_positions_up_to(rows, min(o.prefill_graph_max_len, o.thinker_max_len),
                                                       o.prefill_graph_tokens)
            tail_positions = scratch_positions_up_to(rows, min(self._tail_graph_len(), o.backbone_max_len))
            scratch = admission_scratch_bytes(self.cfg, prompt_positions if prefill_graphs else 0,
                                              tail_positions if o.voice_prefix_cache else 0, dtype_bytes)
        if o.thinker_prefix_cache_mib < PREFIX_CACHE_AUTO:
            raise ValueError("thinker_prefix_cache_mib must be >= 0 (MiB; 0: off) or PREFIX_CACHE_AUTO "
                             "(-1; 'auto' in a model config)")
        prefix_cache = None if o.thinker_prefix_cache_mib == PREFIX_CACHE_AUTO else o.thinker_prefix_cache_mib << 20
        if not (torch_thinker or isinstance(thinker, TorchThinker)):
            prefix_cache = 0
        self.capacity = plan_rows(o.max_batch, per_row, free_device_bytes(self.device), o.kv_memory_fraction,
                                  int(o.activation_reserve_gib * GIB), scratch, prefix_cache)
        log.info("engine capacity: %s", self.capacity.describe())
        o.max_batch = self.capacity.rows
        if thinker is None:
            thinker = make_thinker(parts, "torch", o.max_batch, o.thinker_max_len, **o.thinker_options)
        return thinker

    def _make_thinker_prefix_cache(self) -> ThinkerPrefixCache | None:
        """The thinker prefix cache at the planned bound (its pool is allocated by `start` on a GPU,
        at its first prompt elsewhere); None when the bound is 0 or holds no prompt of
        `thinker_prefix_min_tokens` positions (said in the log)."""
        bound, smallest = self.capacity.prefix_cache_bytes, self._smallest_prefix_bytes()
        if bound < smallest:
            if bound or self.opts.thinker_prefix_cache_mib:
                log.info("thinker prefix cache off: %s holds no prompt of thinker_prefix_min_tokens (%d positions, "
                         "%.1f MiB)", f"{bound / (1 << 20):.1f} MiB" if bound else "the memory the rows leave",
                         self.opts.thinker_prefix_min_tokens, smallest / (1 << 20))
            return None
        return ThinkerPrefixCache(bound, self.opts.thinker_prefix_min_tokens)

    def _smallest_prefix_bytes(self) -> int:
        """The bytes of the shortest prompt the thinker prefix cache stores (thinker_prefix_min_tokens,
        in whole blocks)."""
        blocks = -(-max(self.opts.thinker_prefix_min_tokens, BLOCK) // BLOCK)
        return trunk_kv_bytes(self.cfg.thinker.text, blocks * BLOCK, self.thinker.cache.k.element_size())

    def _reserve_thinker_prefixes(self) -> None:
        """Allocate the thinker prefix cache's pool on the GPU (`start`, once the step graphs are
        captured: they come first), at its planned bound or at what is free then beyond
        `activation_reserve_gib`, whichever is less (the plan is made before the captures and
        maybe before the other models' processes have loaded); off if that holds no prompt of
        `thinker_prefix_min_tokens` positions. The log says what it took."""
        cache = self.thinker_prefixes
        free = free_device_bytes(self.device) - int(self.opts.activation_reserve_gib * GIB)
        planned = cache.max_bytes
        cache.max_bytes = max(0, min(planned, free))
        try:
            if cache.max_bytes < self._smallest_prefix_bytes():
                raise ValueError(f"it would hold no prompt of thinker_prefix_min_tokens "
                                 f"({self.opts.thinker_prefix_min_tokens} positions)")
            self._reserve_prefix_pool(cache)
        except (ValueError, torch.cuda.OutOfMemoryError) as exc:
            log.warning("thinker prefix cache off: no pool of %.2f GiB (planned %.2f GiB): %s",
                        cache.max_bytes / GIB, planned / GIB, exc)
            self.thinker_prefixes = None
            return
        log.info("thinker prefix cache: a pool of %.2f GiB (planned %.2f GiB; %.2f GiB free beyond the activation "
                 "reserve once the graphs were captured)", cache.max_bytes / GIB, planned / GIB, free / GIB)

    def _reserve_prefix_pool(self, cache: ThinkerPrefixCache) -> None:
        """Allocate the thinker prefix cache's pool in the thinker's KV layout, shared with the
        engines that name the same thinker_prefix_peers folder (under a name of this engine's own)."""
        text, peers = self.cfg.thinker.text, {}
        if self.opts.thinker_prefix_peers:
            device = f"{self.device.type}{self.device.index if self.device.index is not None else ''}"
            peers = {"peers_folder": self.opts.thinker_prefix_peers, "name": f"{device}-{next(_ENGINE_NUMBERS)}"}
        cache.reserve(text.num_layers, text.num_kv_heads, text.head_dim, self.thinker.cache.k.dtype, self.device, **peers)

    def _tail_graph_len(self) -> int:
        """The backbone tail graphs' longest bucket (a voice prefix and the two positions)."""
        return min(self.opts.prefill_graph_max_len, TAIL_MAX_LEN)

    def _compile_step_shapes(self) -> None:
        """With `compile`: run every step function once per shape class before serving, so that
        torch.compile compiles now, not when a request first needs a shape. Dynamic shapes cover
        batch sizes >= 2 and every key length below the cache's; what is left to specialise is
        batch 1, the full cache length and the sampler's top-k bound (two values make it dynamic,
        plus None = the whole vocabulary). Prefills run eagerly (engine._prefill), but for the
        admission graphs' buckets under `compiled_prefill_graphs`. The KV caches
        get writes at positions 0..2 of the first rows, which any request placed there overwrites
        before it reads them."""
        t0 = time.perf_counter()
        dev, dtype, o = self.device, self._dtype, self.opts
        vocab = self.cfg.backbone.audio_vocab_size
        bound = self._k_max_of([self.default_top_k]) or 64
        k_maxes = [bound, None] + ([bound * 2] if bound * 2 < vocab else [])
        if self.frames.fused_sampling:  # one kernel whatever the bound (see _k_max_of)
            k_maxes = [None]
        with torch.no_grad():  # the mode the engine thread runs in (see _loop)
            # batch 1 and one odd size: 2 would equal the decoder's 2 positions and the 2 rows of
            # the sampling floats, and dynamo would then specialise on those equalities
            for b in sorted({1, min(5, o.max_batch)}):
                ints, floats, prev, states = self._dummy_step_inputs(b)  # handed over as the runner hands them
                for bb_len in sorted({self._key_len(3, self._backbone_lens), o.backbone_max_len}):
                    self._warm(partial(self._backbone_silent, key_len=bb_len), prev, ints[_BPOS])
                    if self._prepare_decode is None:  # a thinker that runs ahead has no trunk here
                        for th_len in sorted({self._key_len(2, self._thinker_lens), o.thinker_max_len}):
                            h, nxt = self._warm(partial(self.thinker.decode, key_len=th_len), ints[_TOKEN], ints[_TPOS])
                    else:
                        h = torch.zeros(b, self.thinker.hidden_size, dtype=dtype, device=dev)
                        nxt = ints[_TOKEN]
                    self._warm(partial(self._backbone_talk, key_len=bb_len), prev, h, nxt, ints[_TALK], ints[_BPOS])
                for k_max in k_maxes:
                    self._warm(partial(self._sample_fn, k_max=k_max), states, ints[_SEED], ints[_FRAME], ints[_TOPK],
                               floats[0], floats[1])
            for graphs in (self.prefill_graphs, self.backbone_tails):  # compiled_prefill_graphs: their buckets
                if graphs is not None:
                    graphs.compile_all()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self._compiled_shapes = True
        log.info("compile: step shapes compiled in %.1f s", time.perf_counter() - t0)

    def _capture_step_graphs(self) -> None:
        """Capture the step graphs the loop can ask for before serving (`capture_at_start`): per
        key-length bucket (shortest first, where every request starts) and batch bucket, the
        thinker's step and the backbone's silent and talking steps, and per batch bucket the
        sampler at the default top-k bound (other bounds are captured when a request first needs
        one). Captured when first needed instead, every new shape stopped all running streams
        while it was captured: in the traces of docs/benchmarks.md runs 36-38, steps took 0.2-0.8 s
        each time the batch reached a new bucket, and single steps 2.5-7.4 s at a stack's first
        requests. Dummy inputs write keys and values at positions 0..2 of every row, which a
        request placed in a row overwrites before it reads them. Each graph holds memory of its
        own: once the GPU's free memory falls below half of `activation_reserve_gib` (or a capture
        runs out), the rest are left to be captured when first needed, with a warning."""
        t0, before = time.perf_counter(), self.stats()["graphs"]
        try:
            with torch.no_grad():  # the mode the engine thread runs in (see _loop)
                stopped = self._capture_all_steps()
        except torch.cuda.OutOfMemoryError:
            stopped = "a capture ran out of GPU memory"
            torch.cuda.empty_cache()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._captured_at_start = True
        captured = self.stats()["graphs"] - before
        if stopped:
            log.warning("capture_at_start: stopped after %d step graphs (%s); the rest are captured when first "
                        "needed, stopping running streams meanwhile: raise activation_reserve_gib or lower "
                        "max_batch / the context lengths", captured, stopped)
        log.info("capture_at_start: %d step graphs, %d prefill graphs and %d prefix rest graphs captured in %.1f s",
                 captured, self.stats()["prefill_graphs"], self.stats()["prefix_rest_graphs"], time.perf_counter() - t0)

    def _capture_all_steps(self) -> str | None:
        """`_capture_step_graphs`' loop; returns why it stopped early, or None."""
        dev = self.device
        k_max = self._k_max_of([self.default_top_k])
        floor = self.opts.activation_reserve_gib * (1 << 30) / 2

        def low_memory() -> bool:
            return dev.type == "cuda" and torch.cuda.mem_get_info(dev)[0] < floor
        th_lens, bb_lens = self._thinker_lens or [], self._backbone_lens or []
        for i in range(max(len(th_lens), len(bb_lens))):
            for size in self._batch_sizes:
                if low_memory():
                    return "free GPU memory fell below half of activation_reserve_gib"
                ints, floats, prev, states = self._dummy_step_inputs(size)
                h = torch.zeros(size, self.thinker.hidden_size, dtype=self._dtype, device=dev)
                nxt = ints[_TOKEN]
                if i < len(th_lens):  # every thinker backend: serving asks for these keys
                    h, nxt = self._thinker_graph(size, th_lens[i], ints)
                if i < len(bb_lens):
                    self._silent_graph(size, bb_lens[i], prev, ints)
                    self._talk_graph(size, bb_lens[i], prev, h, nxt, ints)
                if i == 0:
                    self._sample_graph(size, k_max, states, ints, floats)
        if self.prefill_graphs is not None and not self.prefill_graphs.capture_all(stop=low_memory):
            return "free GPU memory fell below half of activation_reserve_gib (prefill graphs)"
        # every admission with a known voice replays a tail graph, only stored-prefix hits a rest graph
        if self.backbone_tails is not None and not self.backbone_tails.capture_all(stop=low_memory):
            return "free GPU memory fell below half of activation_reserve_gib (backbone tail graphs)"
        if self.prefix_rest_graphs is not None and not self.prefix_rest_graphs.capture_all(stop=low_memory):
            return "free GPU memory fell below half of activation_reserve_gib (prefix rest graphs)"
        return None

    def _dummy_step_inputs(self, size: int):
        """Placeholder inputs of a step for `size` rows, laid out as `_pack` lays them out (for
        warm-ups and captures; a request's own inputs replace them): ints [7, size] (talking rows,
        the default top-k), floats [2, size], previous codes [size, K] and backbone states [size, H]."""
        dev = self.device
        ints = torch.zeros(_NINT, size, dtype=torch.long, device=dev)
        ints[_TALK] = 1
        ints[_TOPK] = self.default_top_k
        floats = torch.ones(2, size, dtype=torch.float32, device=dev)
        prev = torch.zeros(size, self.num_codebooks, dtype=torch.long, device=dev)
        states = torch.zeros(size, self.cfg.backbone.trunk.hidden_size, dtype=self._dtype, device=dev)
        return ints, floats, prev, states

    def _warm(self, fn, *args):
        """Call a step function as `self.runner` will: with CUDA graphs it gets copies (the graph's
        static inputs), otherwise the views themselves. Compiled code is specialised to what it
        saw (e.g. two inputs sharing one storage), so the warm-up must see the same."""
        return fn(*[a.clone() for a in args]) if self.runner.use_graphs else fn(*args)

    # -- public API ---------------------------------------------------------------------------
    def start(self) -> "ChromaEngine":
        if self.opts.switch_interval_ms > 0:
            sys.setswitchinterval(self.opts.switch_interval_ms / 1000.0)
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            if self.opts.compile and not self._compiled_shapes:
                self._compile_step_shapes()
            if self.opts.capture_at_start and self.runner.use_graphs and not self._captured_at_start:
                self._capture_step_graphs()
            if self.thinker_prefixes is not None and self.device.type == "cuda" and not self.thinker_prefixes.reserved:
                self._reserve_thinker_prefixes()
            elif self.thinker_prefixes is not None and self.opts.thinker_prefix_peers and not self.thinker_prefixes.reserved:
                self._reserve_prefix_pool(self.thinker_prefixes)  # shared: the pool (a file here) must exist before peers look
            if self.device.type == "cuda":  # what the plan (made before all this) could not see
                free, total = torch.cuda.mem_get_info(self.device)
                log.info("engine memory once started: %.2f GiB allocated and %.2f GiB reserved by this process, "
                         "%.2f of %.2f GiB free on the device", torch.cuda.memory_allocated(self.device) / GIB,
                         torch.cuda.memory_reserved(self.device) / GIB, free / GIB, total / GIB)
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="chroma-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._notify_room()
        self._pending.put(None)  # wake the loop
        stuck = False
        if self._thread is not None:
            self._thread.join(timeout)
            stuck = self._thread.is_alive()
            self._thread = None
        close = getattr(self.thinker, "close", None)
        if self._owns_thinker and close is not None:
            close()
        if self.trace is not None and not stuck:  # not while a stuck loop may still write to it
            self.trace.close()
        if self.thinker_prefixes is not None and not stuck:  # its files in thinker_prefix_peers go
            self.thinker_prefixes.close()

    def submit(self, req: GenerationRequest) -> RequestStream:
        """Validate and queue a request; events arrive on the returned stream. The engine owns
        `req` from here: it fills in its checked sampling and prefix keys, and drops its audio
        embeddings once they are prefilled (submit a copy to run a request again)."""
        if self._thread is None:
            raise RuntimeError("engine not started: call start() first")
        if self._dead:
            raise EngineError(self._dead)
        req.sampling = req.sampling.validated(self.default_top_k, self.opts.max_frames)
        self._validate(req)
        cache = self.thinker_prefixes
        if cache is not None:  # hashed here, on the caller's thread, not the engine's
            req.prefix_keys = prompt_block_keys(req.thinker_ids, req.audio_embeds, self.cfg.thinker.audio_token_id)
            # what another engine's cache holds of it (thinker_prefix_peers), for planning its admission
            req.peer_prefix_len = cache.peer_length(req.prefix_keys, len(req.thinker_ids))
        if self._pending.qsize() + len(self._staged) >= self.opts.max_queue:
            raise CapacityError(f"server busy: {self.opts.max_queue} requests already waiting; retry later")
        stream = RequestStream(req.request_id, on_end=self._release_claim)
        with self._room:
            self._claimed += 1
        self._pending.put((req, stream))
        if self._dead:  # the loop stopped between the check above and the put: it will not see this
            stream.put(RequestFailed(self._dead))
        return stream

    def has_room(self) -> bool:
        """Whether a request submitted now would find a row no earlier request has claimed:
        the requests submitted and not yet ended (waiting, being admitted or running) number fewer
        than max_batch. A stopped engine holds nobody back (its submit fails clearly)."""
        return self._claimed < self.opts.max_batch or self._dead is not None or self._stop.is_set()

    def wait_for_room(self, timeout: float) -> bool:
        """Block until `has_room()` (True) or `timeout` seconds pass (False). A model instance
        that waits here before taking its next request lets Triton hand that request to another
        instance with free rows (serving/triton_lm.py, `hold_when_full`)."""
        with self._room:
            return self._room.wait_for(self.has_room, timeout)

    def _notify_room(self) -> None:
        with self._room:
            self._room.notify_all()

    def _release_claim(self) -> None:
        with self._room:
            self._claimed -= 1
            self._room.notify_all()

    @property
    def thread_ident(self) -> int | None:
        """The engine loop thread's identifier (None before start)."""
        return None if self._thread is None else self._thread.ident

    def stats(self) -> dict[str, int]:
        with self._lock:
            active = len(self._active)
        return {"active": active, "queued": self._pending.qsize() + len(self._staged),
                "free_rows": self.opts.max_batch - active, "max_batch": self.opts.max_batch,
                "requested_batch": self.capacity.requested,
                "graphs": len(self.runner) + (len(self.thinker_runner) if self.thinker_runner is not self.runner else 0),
                "prefill_graphs": len(self.prefill_graphs) if self.prefill_graphs is not None else 0,
                "backbone_tail_graphs": len(self.backbone_tails) if self.backbone_tails is not None else 0,
                "prefix_rest_graphs": len(self.prefix_rest_graphs) if self.prefix_rest_graphs is not None else 0,
                **self._thinker_prefix_stats(), **self.counters}

    def _thinker_prefix_stats(self) -> dict:
        """The thinker prefix cache's fill, bound and horizon, and the turns that came back to a
        stored or a dropped prompt (engine/thinker_prefix.py); empty without the cache."""
        cache = self.thinker_prefixes
        if cache is None:
            return {}
        return {"thinker_prefix_bytes": cache.nbytes, "thinker_prefix_bound_bytes": cache.max_bytes,
                "thinker_prefix_horizon_s": cache.idle_s(), "thinker_prefix_returns_held": cache.returns_held,
                "thinker_prefix_returns_dropped": cache.returns_dropped,
                "thinker_prefix_peers": 0 if cache.peers is None else cache.peers.peer_count(),
                "thinker_prefix_unpublished": 0 if cache.peers is None else cache.peers.unpublished}

    # -- validation ---------------------------------------------------------------------------
    def _validate(self, req: GenerationRequest) -> None:
        codes = np.asarray(req.prompt_codes)
        if codes.ndim != 2 or codes.shape[1] != self.num_codebooks or codes.shape[0] < 1:
            raise InvalidRequestError(f"prompt_codes must have shape [frames >= 1, {self.num_codebooks}], got {codes.shape}", "prompt_audio")
        if codes.min() < 0 or codes.max() >= self.cfg.codebook_size:
            raise InvalidRequestError(f"prompt_codes must lie in 0..{self.cfg.codebook_size - 1}", "prompt_audio")
        if not req.thinker_ids:
            raise InvalidRequestError("the conversation is empty", "messages")
        if len(req.thinker_ids) + 1 > self.opts.thinker_max_len:
            raise InvalidRequestError(
                f"the conversation is {len(req.thinker_ids)} tokens; this server accepts at most "
                f"{self.opts.thinker_max_len - 1} (shorten the messages or the audio)", "messages")
        backbone_prompt = len(req.prompt_text_ids) + 2 + codes.shape[0] + 1 + 2
        if backbone_prompt + 3 > self.opts.backbone_max_len:
            raise InvalidRequestError(
                f"the reference voice takes {backbone_prompt} backbone positions; at most "
                f"{self.opts.backbone_max_len - 3} fit (use a shorter prompt_audio / prompt_text)", "prompt_audio")
        n_audio = sum(1 for t in req.thinker_ids if t == self.special.audio)
        got = 0 if req.audio_embeds is None else int(req.audio_embeds.shape[0])
        if n_audio != got:
            raise InvalidRequestError(f"prompt has {n_audio} audio placeholder tokens but {got} audio embeddings", "messages")

    # -- the loop -----------------------------------------------------------------------------
    # A step is launched (its thinker, backbone and sampling work queued on the device, its codes
    # copied back asynchronously) and later completed (the codes read on the host: text, frames,
    # chunks, finishes). With `overlap`, step n+1 is launched before step n is completed, its
    # previous-frame codes taken from step n's device tensor: the host's bookkeeping of step n
    # runs while the device computes step n+1. Everything the next launch needs from the host
    # (positions, talking rows, frame counters) is known at launch; what step n's codes decide
    # (a finish, the thinker's token for the talking step after next) is read before it matters:
    # a row that finished in step n has its step n+1 output dropped, and the batch is drained
    # (nothing in flight) before any row is freed, moved or found at the end of its cache.
    def _loop(self) -> None:
        try:
            # no autograd on this thread (plain no-grad, not inference mode: the static caches and
            # graph inputs are ordinary tensors, and compiled code is specialised to the mode it ran in)
            torch.set_grad_enabled(False)
            if self.device.type == "cuda":  # this thread's allocations and launches default to our GPU
                torch.cuda.set_device(self.device)
            self._serve()
        except BaseException as exc:  # the loop itself broke: nobody may wait for it forever
            log.exception("engine loop stopped")
            self._dead = f"the generation engine stopped: {exc!r}"
            self._notify_room()
            self._inflight = None
            try:
                self._fail_all(self._dead)
            finally:
                self._fail_waiting(self._dead)

    def _fail_waiting(self, message: str) -> None:
        """Fail every request not yet admitted (queued or staged)."""
        self._stage_pending()
        waiting, self._staged = self._staged, deque()
        for _req, stream in waiting:
            self.counters["failed"] += 1
            stream.put(RequestFailed(message))

    def _serve(self) -> None:
        failures = 0  # steps failed in a row
        while not self._stop.is_set():
            try:
                for a in [a for a in self._active if a.stream.cancelled]:
                    a.finish = "cancelled"
                if any(a.finish for a in self._active):
                    self._drain()
                if not self._active:
                    self._last_done = None  # idle time between requests is not a gap between steps
                    self._global_step = 0  # next step talks, so a new request is admitted at once
                    self.pacer.reset_steps()  # the last batch's step time says nothing of the next one's
                    if not self._staged:
                        failures = 0  # idle: nothing left that failed
                        if self.trace is not None:
                            self.trace.flush()  # complete on disk while nothing runs
                        self._publish_prefixes(wait=True)
                        item = self._pending.get()  # idle: block until work (or shutdown) arrives
                        if item is None:
                            continue
                        self._staged.append(item)
                self._publish_prefixes(wait=False)
                hook = self.between_steps
                if hook is not None:
                    try:
                        hook()
                    except Exception:  # a profiler's trouble must not fail the requests running
                        log.exception("between_steps hook failed; removed")
                        self.between_steps = None
                wall, cpu = time.perf_counter(), time.thread_time()
                try:
                    with self._profile_range("chroma.step"):
                        self._step()
                finally:
                    self.counters["host_step_s"] += time.perf_counter() - wall
                    self.counters["host_cpu_s"] += time.thread_time() - cpu
                failures = 0
            except Exception as exc:  # a batched step failed: fail its requests, keep serving
                log.exception("engine step failed")
                self._inflight = self._last_done = None
                message = f"internal error during generation: {exc}"
                self._fail_all(message)
                failures += 1
                if failures >= 3:  # it fails with nothing running, e.g. in admission: the waiting
                    self._fail_waiting(message)  # requests would retry it forever
                    failures = 0

    def _step(self) -> None:
        if self._inflight is not None and self._global_step % 2 == 0 and self._waiting() \
                and len(self._active) >= self.opts.max_batch:
            # a talking step may admit, but every row looks taken until the step in flight is read:
            # read it first, so a row it finished is free for the request waiting
            self._drain()
        t0 = time.perf_counter()
        previous, self._inflight = self._inflight, None
        launched = self._launch(previous)
        if previous is not None:
            self._complete(previous)
        self._inflight = launched
        if launched is None:
            return
        drained = not self._overlapping or launched.at_cache_end or any(a.finish for a in launched.batch)
        if drained:
            self._drain()
        # the pacer learns one step's period: a chained step (launched after the previous one, read
        # while the next runs) or a plain one; not a chain's first launch (nothing waited for) nor
        # its drain (two steps' device time)
        if launched.old_rows and (previous is not None) != drained:
            self.pacer.observe_step(time.perf_counter() - t0 - launched.prefill_s)
        if self.trace is not None:
            self.trace.step(rows=len(launched.batch), step_s=self.pacer.step_s, plan_s=self.pacer.step_high,
                            took_s=time.perf_counter() - t0,
                            prefill_s=launched.prefill_s, waiting=len(self._staged) + self._pending.qsize())

    def _profile_range(self, name: str):
        return torch.profiler.record_function(name) if self.profile_ranges else contextlib.nullcontext()

    def _waiting(self) -> bool:
        return bool(self._staged) or not self._pending.empty()

    @property
    def _overlapping(self) -> bool:
        # overlap needs every input of a step on the device or known at launch; an SGLang thinker
        # takes its tokens from the host before each talking step
        return self.opts.overlap and self._prepare_decode is None

    def _drain(self) -> None:
        """Complete the step in flight, then free the rows of finished requests."""
        step, self._inflight = self._inflight, None
        if step is not None:
            self._complete(step)
        self._retire()

    def _launch(self, previous: "_Launched | None") -> "_Launched | None":
        """Queue one step for the running rows (and admit new ones on talking steps)."""
        talk_step = self._global_step % 2 == 0  # admission happens on these steps only
        old = list(self._active)
        talk = talk_step and any(not a.thinker_done for a in old)  # else no thinker call at all
        tokens = states = None
        started = self._mark()
        if old:
            # chained: the rows are exactly the previous step's, whose codes are still on the device
            prev_codes = previous.codes[:, : self.num_codebooks].contiguous() if previous is not None else None
            states, tokens = self._advance(old, talk, prev_codes)
        t_prefill = time.perf_counter()
        new_states = self._admit() if talk_step else []
        t_prefill = time.perf_counter() - t_prefill
        batch = list(self._active)
        if not batch:
            self._last_done = None  # the chain of steps ends: the idle time that follows is not ours
            return None
        if new_states:
            fresh = torch.stack(new_states)
            states = fresh if states is None else torch.cat([states[: len(old)], fresh])
        codes = self._sample(batch, states, tokens if talk and old else None)
        talked = set()
        for a in old:
            if talk and not a.thinker_done:
                talked.add(a.row)
                a.thinker_pos += 1
                a.backbone_pos += 3
            else:
                a.backbone_pos += 1
        for a in batch:
            a.step += 1
        at_end = {a.row for a in batch if a.backbone_pos + 3 > self.opts.backbone_max_len}
        if talk and not new_states and self.opts.thinker_ahead and self._prepare_decode is None:
            self._run_ahead(batch, tokens)
        self._global_step += 1
        self.counters["steps"] += 1
        done = self._mark()  # before the copy, whose wait then covers it
        launched = _Launched(batch, codes, self._to_host(codes), talked, at_end, len(old), t_prefill)
        if started is not None:
            launched.timing = _StepTiming(started, done, self._last_done)
            self._last_done = done
        return launched

    def _complete(self, step: "_Launched") -> None:
        """Read a launched step's codes and thinker tokens and act on them."""
        t0 = time.perf_counter()
        host = step.host()
        self.counters["host_wait_s"] += time.perf_counter() - t0
        if step.timing is not None:  # both markers have passed (the copy queued after `done` has)
            tm = step.timing
            self.counters["gpu_step_s"] += tm.started.elapsed_time(tm.done) / 1000.0
            if tm.after is not None:
                self.counters["gpu_idle_s"] += max(tm.after.elapsed_time(tm.started), 0.0) / 1000.0
        k = self.num_codebooks
        for a in step.batch:
            if a.row in step.talked and not a.finish:
                a.thinker_token = int(host[a.row, k])
                self._on_text_token(a, a.thinker_token)
        # the frame copied once for all rows (the pinned buffer is reused; each row keeps a view of
        # this copy: a step's [rows, K] array lives while a stream holds frames of it, at most 16 KB
        # per step at 256 rows, fewer bytes than a copy per row) and the end-of-audio test for
        # every row at once: per-row numpy calls cost ~10 us x 256 rows on the engine's thread
        frames = host[:, :k].copy()
        eos = (frames[:, : k - 1] == self.cfg.codebook_eos_id).all(axis=1).tolist()
        plan = self._chunk_plan()
        for a in step.batch:
            if not a.finish:  # a row finished (or cancelled) after this step was launched: dropped
                self._on_frame(a, frames[a.row], eos[a.row], a.row in step.at_cache_end, plan)

    def _mark(self) -> torch.cuda.Event | None:
        """A timing marker on the engine's stream (CUDA), else None."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _to_host(self, codes: torch.Tensor):
        """Start copying a step's codes to the host; returns a function that waits for them."""
        if self.device.type != "cuda":
            array = codes.numpy()
            return lambda: array
        # two pinned buffers per shape, used in turn: at most two steps are ever unread
        pair = self._pinned.get(tuple(codes.shape))
        if pair is None:
            pair = self._pinned[tuple(codes.shape)] = [torch.empty(codes.shape, dtype=codes.dtype, pin_memory=True)
                                                       for _ in range(2)]
        pair.reverse()
        buf = pair[0]
        buf.copy_(codes, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def wait():
            done.synchronize()  # the step's one sync
            return buf.numpy()
        return wait

    # -- batched steps ------------------------------------------------------------------------
    def _pad(self, n: int) -> int:
        return bucket(n, self._batch_sizes)

    def _key_len(self, needed: int, sizes) -> int:
        return needed if sizes is None else bucket(needed, sizes)

    def _pack(self, batch: list[_Active], size: int, codes: bool = True):
        """Per-row step inputs, padded to `size` rows: ints [7, size], floats [2, size], and (with
        `codes`) the previous frame's codes [size, K] from the host, else None."""
        # field-major, so that each field (ints[_TOKEN], ...) is a row with stride 1: step functions
        # see the same strides in eager mode, in a graph's static inputs and in the compile warm-up
        ints = np.zeros((_NINT, size), dtype=np.int64)
        floats = np.ones((2, size), dtype=np.float32)
        prev = np.zeros((size, self.num_codebooks), dtype=np.int64) if codes else None
        for a in batch:
            p = a.params
            ints[:, a.row] = (a.thinker_token, a.thinker_pos, a.backbone_pos, not a.thinker_done, p.seed, a.step, p.top_k)
            floats[:, a.row] = (p.temperature, p.top_p)
            if prev is not None and a.last_codes is not None:
                prev[a.row] = a.last_codes
        dev = self.device
        return (torch.from_numpy(ints).to(dev, non_blocking=True), torch.from_numpy(floats).to(dev, non_blocking=True),
                None if prev is None else torch.from_numpy(prev).to(dev, non_blocking=True))

    def _advance(self, batch: list[_Active], talk: bool, prev_codes: torch.Tensor | None = None):
        """Thinker step (on talking steps) and backbone step for rows 0..len(batch)-1, fed the
        previous frame's codes from `prev_codes` (the device, [Bp, K]) or else from the host.
        Returns (backbone states [Bp, H], thinker next ids [Bp] or None) on the device."""
        size = self._pad(len(batch))
        ints, _, prev = self._pack(batch, size, codes=prev_codes is None)
        if prev_codes is not None:
            prev = prev_codes
        width = 3 if talk else 1
        bb_len = self._key_len(max(a.backbone_pos for a in batch) + width, self._backbone_lens)
        if talk:
            ahead = self._take_ahead(batch)
            if ahead is not None:
                h, nxt = ahead.h, ahead.nxt
            else:
                if self._prepare_decode is not None:
                    self._prepare_decode([None if a.thinker_done else a.thinker_pos for a in batch])
                h, nxt = self._thinker_step(batch, size, ints)
            return self._talk_graph(size, bb_len, prev, h, nxt, ints), nxt
        return self._silent_graph(size, bb_len, prev, ints), None

    # One method per step graph: its key and function, for serving and capture_at_start alike
    # (ints, floats: the rows of a step's packed inputs, see _pack).
    def _silent_graph(self, size: int, bb_len: int, prev, ints):
        return self.runner(("backbone1", size, bb_len), partial(self._backbone_silent, key_len=bb_len),
                           prev, ints[_BPOS])

    def _talk_graph(self, size: int, bb_len: int, prev, h, nxt, ints):
        return self.runner(("backbone3", size, bb_len), partial(self._backbone_talk, key_len=bb_len),
                           prev, h, nxt, ints[_TALK], ints[_BPOS])

    def _thinker_graph(self, size: int, th_len: int, ints):
        return self.thinker_runner(("thinker", size, th_len), partial(self.thinker.decode, key_len=th_len),
                                   ints[_TOKEN], ints[_TPOS])

    def _sample_graph(self, size: int, k_max, states, ints, floats):
        return self.runner(("sample", size, k_max), partial(self._sample_fn, k_max=k_max), states,
                           ints[_SEED], ints[_FRAME], ints[_TOPK], floats[0], floats[1])

    # -- the thinker running ahead (thinker_ahead) ----------------------------------------------
    # The thinker's input at a talking step is its own greedy output of the previous one, so its
    # step for talking step n+2 can start as soon as step n has produced that token: it runs on a
    # second stream while the silent step n+1 (backbone + decoder) runs on the engine's stream.
    # Both are launch-bound at small batches, so they share the GPU instead of queueing. The
    # result is used only by exactly the rows it ran for; any change of rows (admission, a
    # finish, a failure) waits for it and drops it, and the talking step computes the thinker
    # itself, as without the option. Same inputs, same kernels: the same tokens and states.
    def _thinker_step(self, batch: list[_Active], size: int, ints: torch.Tensor):
        """One thinker decode step for rows 0..size-1 (tokens and positions: rows of `ints`)."""
        th_len = self._key_len(max(a.thinker_pos for a in batch) + 1, self._thinker_lens)
        return self._thinker_graph(size, th_len, ints)

    def _run_ahead(self, batch: list[_Active], tokens: torch.Tensor) -> None:
        positions = [a.thinker_pos for a in batch]  # already advanced to the next talking step's
        if max(positions) >= self.opts.thinker_max_len or all(a.thinker_done for a in batch):
            return
        size = self._pad(len(batch))
        stream = self._thinker_stream
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        if stream is not None:  # after this step: its tokens, and its reads of the graph's outputs
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with ctx:
            # packed as _pack packs a step's inputs (rows of one [_NINT, size] tensor), so that
            # compiled code sees the layout it was compiled for
            ints = torch.zeros(_NINT, size, dtype=torch.long)
            ints[_TPOS, : len(batch)] = torch.tensor(positions)
            ints = ints.to(self.device, non_blocking=True)
            if stream is not None:  # made on the engine's stream (eager steps): not to be reused before this copy
                tokens.record_stream(stream)
            ints[_TOKEN].copy_(tokens[:size])
            h, nxt = self._thinker_step(batch, size, ints)
            done = None
            if stream is not None:
                done = torch.cuda.Event()
                done.record(stream)
        self._ahead = _Ahead(list(batch), positions, h, nxt, done)

    def _take_ahead(self, batch: list[_Active]) -> "_Ahead | None":
        """The early thinker step, if it ran for exactly these rows at their positions (the engine's
        stream then waits for it); else None (after waiting for it all the same)."""
        ahead = self._settle_ahead()
        if ahead is None:
            return None
        same = len(ahead.batch) == len(batch) and all(
            x is a and a.row == i and a.thinker_pos == p for i, (x, a, p) in enumerate(zip(ahead.batch, batch, ahead.positions)))
        if same:
            self.counters["thinker_ahead_used"] += 1
        return ahead if same else None

    def _settle_ahead(self) -> "_Ahead | None":
        """Take the early thinker step, if any, once the engine's stream has waited for it: before
        its results are read, or before rows change (a caller that only settles drops it)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.done is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(ahead.done)
            ahead.h.record_stream(main)  # eager outputs belong to the thinker stream's memory
            ahead.nxt.record_stream(main)
        return ahead

    def _backbone_silent(self, prev, pos, *, key_len):
        x = self.frames.frame_embedding(prev)[:, None]
        return self.frames.backbone_step(x, pos[:, None], torch.zeros_like(pos), key_len)

    def _backbone_talk(self, prev, h, nxt, talking, pos, *, key_len):
        """[frame_emb(prev), h, embed(next)] for talking rows; silent rows feed zeros after the
        frame and read their state at index 0 (the zeros land beyond what they attend to)."""
        dtype = self._dtype
        pair = torch.stack([h.to(dtype), self.thinker.embed(nxt).to(dtype)], dim=1)
        pair = pair * talking.to(dtype)[:, None, None]
        x = torch.cat([self.frames.frame_embedding(prev)[:, None], pair], dim=1)
        positions = pos[:, None] + torch.arange(3, device=pos.device)
        return self.frames.backbone_step(x, positions, talking * 2, key_len)

    def _sample(self, batch: list[_Active], states: torch.Tensor, thinker_next: torch.Tensor | None) -> torch.Tensor:
        """Codes of this frame for every row, plus the thinker's tokens: device tensor [Bp, K+1]
        (a fresh tensor, not a graph's output: the next step's replays must not overwrite it)."""
        size = self._pad(len(batch))
        if states.shape[0] < size:
            states = torch.cat([states, states.new_zeros(size - states.shape[0], states.shape[1])])
        ints, floats, _ = self._pack(batch, size, codes=False)
        k_max = self._k_max(batch)
        codes = self._sample_graph(size, k_max, states[:size], ints, floats)
        extra = thinker_next if thinker_next is not None else torch.zeros(size, dtype=torch.long, device=self.device)
        if extra.shape[0] < size:
            extra = torch.cat([extra, extra.new_zeros(size - extra.shape[0])])
        return torch.cat([codes, extra[:size, None]], dim=1)

    def _sample_fn(self, states, seeds, frames, top_k, temperature, top_p, *, k_max):
        return self.frames.sample_frame(states, SamplingTensors(temperature, top_k, top_p, seeds, frames, k_max))

    def _k_max(self, batch: list[_Active]) -> int | None:
        """A power-of-two bound on the batch's top_k (few graph variants), or None when some row
        samples from the whole audio vocabulary."""
        return self._k_max_of([a.params.top_k for a in batch])

    def _k_max_of(self, ks: list[int]) -> int | None:
        if self.frames.fused_sampling:  # the Triton sampler needs no bound: one sample graph per batch size
            return None
        vocab = self.cfg.backbone.audio_vocab_size
        if min(ks) <= 0 or max(ks) >= vocab:
            return None
        bound = 1 << (max(ks) - 1).bit_length()
        return bound if bound < vocab else None

    # -- admission ----------------------------------------------------------------------------
    def _admit(self) -> list[torch.Tensor]:
        """Prefill waiting requests, batched, into the next free rows; returns their backbone states.
        How many: free rows, `max_prefills_per_step`, `prefill_token_budget`, and (pacing) what the
        running streams can wait for."""
        self._settle_ahead()
        self._stage_pending()
        if any(stream.cancelled for _req, stream in self._staged):
            for req, stream in [item for item in self._staged if item[1].cancelled]:
                stream.put(Finished("cancelled", len(req.thinker_ids), 0, 0, ""))
                self.counters["cancelled"] += 1
            self._staged = deque(item for item in self._staged if not item[1].cancelled)
        if self.opts.max_queue_wait_s > 0:
            self._refuse_overdue()
        costs = self._batch_costs(min(self.opts.max_batch - len(self._active), self.opts.max_prefills_per_step))
        n = len(costs)
        allowance = None
        if n and self.opts.admission_pacing and self._active:
            waited = self._held_for(self._staged[0][1])
            states = self._stream_states()
            n = self.pacer.how_many(costs, states, waited)
            self.counters["forced_admissions"] += self.pacer.forced
            allowance = self.pacer.allowance(states) if self.trace is not None else None
        if n or not costs:  # something admitted, or no row free / nobody waiting: nothing is held back
            self._held_since = None
        items = [self._staged.popleft() for _ in range(n)]
        # what the chunk plan makes room for: the batch of whatever still waits, free rows or not
        # (a row may free at any step)
        self._next_prefill_tokens = sum(self._batch_costs(self.opts.max_prefills_per_step))
        if not items:
            return []
        tokens = sum(costs[:n])
        estimate = self.pacer.prefill_estimate(tokens) if self.pacer.cost.known else None
        t0, self._last_prefill_s = time.perf_counter(), None
        try:
            return self._admit_items(items, tokens, estimate)
        finally:
            if self.trace is not None:
                # took_s: the batched prefill (None: it failed); stall_s: with the wait for queued steps
                self.trace.event("admit", n=n, tokens=tokens, est_s=estimate, took_s=self._last_prefill_s,
                                 stall_s=time.perf_counter() - t0,
                                 allowance_s=allowance, forced=self.pacer.forced if allowance is not None else 0,
                                 step_s=self.pacer.step_s, active=len(self._active), waiting=len(self._staged),
                                 requests=[req.request_id for req, _ in items])

    def _refuse_overdue(self) -> None:
        """Refuse the requests that have waited longer than ``max_queue_wait_s`` for a row (the
        line is in arrival order; those a free row is there for now are left to the pacer, which
        bounds their wait itself). Under sustained overload their first audio would come later
        than that; "server busy" (HTTP 429 at the frontend) lets the client retry or go elsewhere."""
        limit, now = self.opts.max_queue_wait_s, time.monotonic()
        free = max(self.opts.max_batch - len(self._active), 0)
        if len(self._staged) <= free or now - self._staged[free][1].submitted_at <= limit:
            return
        line = list(self._staged)
        overdue = free
        while overdue < len(line) and now - line[overdue][1].submitted_at > limit:
            overdue += 1
        for _req, stream in line[free:overdue]:
            self.counters["queue_timeouts"] += 1
            stream.put(RequestFailed(f"server busy: no generation row came free within {limit:g} s "
                                     "(max_queue_wait_s); retry later", busy=True))
        self._staged = deque(line[:free] + line[overdue:])

    def _held_for(self, head) -> float:
        """How long the pacer has held the queue back, by ``admission_wait_clock``: with "free_row",
        since the first admission round in which a row was free and nothing was admitted (an
        admission, or a round without a free row, restarts it; a new head does not), so the pacer
        keeps a row empty at most ``max_admission_wait_s`` and waiting for a row does not count;
        with "arrival", since the head was submitted."""
        now = time.monotonic()
        if self.opts.admission_wait_clock == "arrival":
            return now - head.submitted_at
        if self._held_since is None:
            self._held_since = now
        return now - self._held_since

    def _admit_items(self, items: list[tuple[GenerationRequest, RequestStream]], tokens: int,
                     estimate: float | None) -> list[torch.Tensor]:
        """Prefill `items` (`tokens` prompt positions, which the pacer expected to take `estimate`
        seconds: None before it has seen a prefill), batched, or one by one if the batch fails."""
        if self.device.type == "cuda":  # the prefill's cost, not that of steps still queued before it
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            with self._profile_range(f"chroma.prefill[{len(items)}]"):
                states = self._prefill(items)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            took = time.perf_counter() - t0
            if estimate is not None:  # what the pacer expected, against what it got (before learning it)
                self.counters["prefill_estimate_s"] += estimate
                self.counters["prefill_overrun_s"] += max(took - estimate, 0.0)
            self.pacer.cost.observe(tokens, took)
            self._last_prefill_s = took
            self.counters["prefills"] += 1
            self.counters["prefill_s"] += took
            _let_go_of_audio(items)
            return states
        except Exception:  # find the request that broke the batch: retry one by one
            log.warning("batched prefill of %d requests failed; retrying them one by one", len(items), exc_info=True)
        states = []
        for req, stream in items:
            try:
                states += self._prefill([(req, stream)])
                _let_go_of_audio([(req, stream)])
            except Exception as exc:
                log.exception("prefill failed for %s", req.request_id)
                self.counters["failed"] += 1
                stream.put(RequestFailed(f"could not start generation: {exc}"))
        return states

    def _batch_costs(self, limit: int) -> list[int]:
        """Prompt positions (`_prefill_tokens`) of each request of the next batch the staged line
        makes, in order: at most `limit` requests, and no more once `prefill_token_budget` thinker
        tokens are in (the first always goes)."""
        costs, tokens = [], 0
        for req, _stream in itertools.islice(self._staged, max(limit, 0)):
            if costs and tokens >= self.opts.prefill_token_budget:
                break
            costs.append(self._prefill_tokens(req))
            tokens += self._thinker_positions(req)
        return costs

    def _stage_pending(self) -> None:
        """Everything queued joins the staged line, in order."""
        while True:
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:  # None: shutdown wake-up
                self._staged.append(item)

    def _prefill_tokens(self, req: GenerationRequest) -> int:
        """Prompt positions a prefill computes: the thinker's (less what its prefix cache holds)
        and the backbone's (two when the voice's prefix is cached)."""
        cached = self.voice_prefixes.capacity and voice_key(req.prompt_text_ids, req.prompt_codes) in self.voice_prefixes
        return self._thinker_positions(req) + (2 if cached else len(req.prompt_text_ids) + len(req.prompt_codes) + 5)

    def _thinker_positions(self, req: GenerationRequest) -> int:
        """The thinker's prompt positions a prefill computes: all, less what the prefix cache holds."""
        n = len(req.thinker_ids)
        if self.thinker_prefixes is not None and req.prefix_keys:
            n -= max(self.thinker_prefixes.matched_length(req.prefix_keys, n), req.peer_prefix_len)
        return n

    def _stream_states(self) -> list[StreamState]:
        now, plan = time.monotonic(), self._chunk_plan()
        out = []
        for a in self._active:
            slack = None if a.first_chunk_at is None else a.first_chunk_at + a.sent * self._frame_s - now
            out.append(StreamState(slack, max(self._chunk_target(a, plan) - (len(a.frames) - a.sent), 0)))
        return out

    def _chunk_target(self, a: _Active, plan: "_ChunkPlan") -> int:
        """Frames the next chunk waits for: `plan.first` for a first chunk, then doubling (2, 2, 4,
        8, ... up to chunk_frames), but never so many that the listener would be down to less than
        `plan.slack_s` of audio when the chunk goes out (at least first_chunk_frames). Doubling alone
        keeps that only while a step takes under half a frame time; at 256 streams steps take
        40-48 ms and the third chunk found half the audio in hand the second had (run 31's late
        chunks were the third and fourth). (Growing by half the audio sent instead, 2, 2, 2, 3, 4,
        6, ..., tripled codec executions and made 256 served streams slower and later:
        docs/benchmarks.md run 20.)"""
        if a.sent == 0:
            return plan.first
        n = min(self.opts.chunk_frames, a.sent)
        if plan.slack_s > 0 and plan.step_s:
            n = max(self.opts.first_chunk_frames, min(n, int((a.in_hand_s - plan.slack_s) / plan.step_s + 1e-6)))
        return n

    def _chunk_plan(self) -> "_ChunkPlan":
        """This step's chunk sizing (once per step, for every stream)."""
        step, slack = self.pacer.step_high, self._start_slack()
        return _ChunkPlan(first=self._first_chunk_frames(slack, step), slack_s=slack, step_s=step)

    def _start_slack(self) -> float:
        """Audio a listener should keep in hand at each chunk: `start_slack_s`, and while requests
        wait for rows, enough more to sit out their prefill (the pacer's estimate for the next
        admission, plus its margin). Otherwise the newest streams leave the pacer no room: it
        holds the next admission until they have built up audio, which at 256 streams took
        several steps per batch of admissions, or it forces one in and they stutter."""
        slack = self.opts.start_slack_s
        if (slack <= 0 or not (self.opts.admission_pacing and self.opts.admission_slack) or not self._next_prefill_tokens
                or not self.pacer.cost.known):
            return slack
        return max(slack, self.pacer.prefill_estimate(self._next_prefill_tokens) + self.opts.admission_margin_s)

    def _first_chunk_frames(self, slack: float, step: float | None) -> int:
        """Frames of a first chunk: `first_chunk_frames`, or more when steps are slow. A first chunk
        of f frames plays for f frame times, and the second (f more) is out f steps later, leaving
        the listener f x (frame time - step time) of audio in hand. So f is the least that leaves
        `slack` (with start_slack_s = 0.14: 2 at batch 1, where a step takes 5 ms of the 80; 4 at
        256 streams, 35-40 ms), which also leaves the pacer room to admit the next requests
        (engine/pacing.py)."""
        f = self.opts.first_chunk_frames
        if slack <= 0 or not step:
            return f
        gain = self._frame_s - step  # audio gained per step
        need = self.opts.chunk_frames if gain <= 0 else math.ceil(slack / gain - 1e-9)
        return max(f, min(need, self.opts.chunk_frames))

    def _prefill(self, items: list[tuple[GenerationRequest, RequestStream]]) -> list[torch.Tensor]:
        """Thinker and backbone prefill of `items` in rows len(active).. (one batched call each),
        with eager layers even under `compile` (prompt shapes vary; see trunk.eager_layers), but
        for the admission graphs under `compiled_prefill_graphs` (bucketed shapes, compiled at start)."""
        with eager_layers():
            return self._prefill_eager(items)

    def _prefill_eager(self, items: list[tuple[GenerationRequest, RequestStream]]) -> list[torch.Tensor]:
        row = len(self._active)
        dev = self.device
        matches = self._prefix_matches(items)
        if self.prefill_graphs is not None or matches:
            # prompts found in the prefix cache last, in order of the positions left to compute;
            # the others in order of length: prompts of a length share a graph bucket
            # (those a prefix rest graph holds before the others)
            def order(item):
                found = matches.get(id(item[0]))
                if found is None:
                    return (False, False, len(item[0].thinker_ids))
                rest = len(item[0].thinker_ids) - found.length
                rest_graphs = self.prefix_rest_graphs
                return (True, rest_graphs is None or not rest_graphs.fits(rest, found.length), rest)
            items = sorted(items, key=order)
        h0, t1, counts = self._prefill_thinker(row, items, matches)
        self._store_prefixes(row, items)
        firsts = self.thinker.embed(t1).to(self._dtype)
        tails = torch.stack([h0.to(self._dtype), firsts], dim=1)  # [n, 2, H]: each request's own positions
        if self.voice_prefixes.capacity:
            states, ends = self._prefill_backbone_cached(row, [r for r, _ in items], tails)
        else:
            prompts = [torch.cat([self._backbone_prompt(r), tails[i]]) for i, (r, _) in enumerate(items)]
            x, lengths = pad_batch(prompts)
            positions = torch.arange(x.shape[1], device=dev).expand(len(items), -1)
            states = self.frames.backbone_step(x, positions, lengths - 1, x.shape[1], row_start=row,
                                                  from_start=True)
            ends = [p.shape[0] for p in prompts]
        for name, n in counts.items():  # counted once the admission went through (a failed one is retried
            self.counters[name] += n    # request by request)
        skip = {self.special.im_end, self.special.im_start}
        for i, ((req, stream), token) in enumerate(zip(items, t1.tolist())):
            a = _Active(req=req, stream=stream, row=row + i, params=req.sampling,
                        detok=IncrementalDetokenizer(self.tokenizer, skip, self._decode), prompt_tokens=len(req.thinker_ids),
                        thinker_pos=len(req.thinker_ids), thinker_token=token, thinker_done=False,
                        backbone_pos=ends[i])
            self._on_text_token(a, token)
            with self._lock:
                self._active.append(a)
                self.counters["admitted"] += 1
        return list(states)

    def _prefill_thinker(self, row: int, items: list[tuple[GenerationRequest, RequestStream]],
                         matches: dict[int, PrefixMatch]):
        """The thinker's prefill of `items` into rows row..: prompts with a stored prefix
        (`matches`, by id of the request; they come last in `items`, those a prefix rest graph
        holds first, each part by the positions left) compute only the positions after it: through
        the prefix rest graphs, one replay per group (`PrefixRestGraphs.plan`), else eagerly, in
        groups that bound the padding and the attention mask (`prefix_groups`); the others go
        through the admission graphs, one replay per group of similar length (`PrefillGraphs.plan`;
        in ascending length), prompts longer than every bucket eagerly; without the graphs, one
        eager call. Returns the last states [n, H], the greedy next ids [n] and the prompts by path
        (the prefill counters' increments)."""
        # ids stay on the host: the thinker batches them into one copy (model.thinker.prompt_batch)
        prompts = [(torch.tensor(r.thinker_ids, dtype=torch.long), r.audio_embeds) for r, _ in items]
        budgets = [self._thinker_budget(r) for r, _ in items]
        fresh = sum(1 for r, _ in items if id(r) not in matches)  # the first `fresh` items have no match
        graphs = self.prefill_graphs
        groups: list[tuple[int, str]] = []  # consecutive (count, how): "graph", "eager" or "prefix"
        if fresh and graphs is not None:
            groups += [(count, "graph" if graphed else "eager")
                       for count, graphed in graphs.plan([len(r.thinker_ids) for r, _ in items[:fresh]])]
        elif fresh:
            groups.append((fresh, "eager"))
        if fresh < len(items):
            found = [matches[id(r)] for r, _ in items[fresh:]]
            totals = [len(r.thinker_ids) for r, _ in items[fresh:]]
            rests = [n - m.length for n, m in zip(totals, found)]
            graphed = 0
            if self.prefix_rest_graphs is not None:
                for count, through in self.prefix_rest_graphs.plan(rests, [m.length for m in found]):
                    if through:
                        groups.append((count, "prefix graph"))
                        graphed += count
            groups += [(count, "prefix") for count in
                       prefix_groups(rests[graphed:], totals[graphed:], self.opts.prefill_graph_tokens)]
        states, ids, at = [], [], 0
        counts = {"prefill_graph_prompts": 0, "prefill_eager_prompts": 0, "prefill_prefix_prompts": 0,
                  "prefill_prefix_graph_prompts": 0, "prefill_prefix_tokens": 0}
        for count, how in groups:
            part = slice(at, at + count)
            if how == "graph":
                h, t = graphs.prefill(row + at, prompts[part])
                if len(groups) > 1:  # the next replay reuses the graphs' memory
                    h, t = h.clone(), t.clone()
                counts["prefill_graph_prompts"] += count
            elif how == "eager":
                h, t = self.thinker.prefill(row + at, prompts[part], max_new_tokens=budgets[part])
                counts["prefill_eager_prompts"] += count
            else:
                found = [matches[id(r)] for r, _ in items[part]]
                prefixes = [(m.length, m.k, m.v) for m in found]
                if how == "prefix graph":
                    h, t = self.prefix_rest_graphs.prefill(row + at, prompts[part], prefixes)
                    if len(groups) > 1:  # as for "graph"
                        h, t = h.clone(), t.clone()
                    counts["prefill_prefix_graph_prompts"] += count
                else:
                    h, t = self.thinker.prefill_after(row + at, prompts[part], prefixes)
                counts["prefill_prefix_prompts"] += count
                counts["prefill_prefix_tokens"] += sum(m.length for m in found)
            states.append(h)
            ids.append(t)
            at += count
        if len(groups) == 1:
            return states[0], ids[0], counts
        return torch.cat(states), torch.cat(ids), counts

    def _prefix_matches(self, items: list[tuple[GenerationRequest, RequestStream]]) -> dict[int, PrefixMatch]:
        """Stored prefixes of the items' prompts (thinker_prefix_cache_mib), by id of the request."""
        cache = self.thinker_prefixes
        if cache is None:
            return {}
        if cache.peers is not None and any(r.peer_prefix_len for r, _ in items):
            self._import_prefixes(cache, [r for r, _ in items if r.peer_prefix_len])
        found = {id(r): cache.match(r.prefix_keys or [], len(r.thinker_ids)) for r, _ in items}
        return {key: m for key, m in found.items() if m is not None}

    def _publish_prefixes(self, wait: bool) -> None:
        """Let other engines see the prompts this engine's cache stored once the device has
        written them (thinker_prefix_peers); `wait`: idle, so wait for the device first."""
        peers = self.thinker_prefixes.peers if self.thinker_prefixes is not None else None
        if peers is None:
            return
        if wait and self.device.type == "cuda" and peers.waiting():
            torch.cuda.synchronize(self.device)
        peers.flush()

    def _import_prefixes(self, cache: ThinkerPrefixCache, reqs: list[GenerationRequest]) -> None:
        """Copy the stored prompts another engine holds of these requests' prompts into this
        engine's cache before they are matched (thinker_prefix_peers); all copies before any match,
        so that none makes room with a prompt a match of this admission would read."""
        wall = time.perf_counter()
        try:
            imported, positions, lost = cache.import_from_peers([(r.prefix_keys, len(r.thinker_ids)) for r in reqs])
        except Exception:  # noqa: BLE001 - the requests go on without the peers' prompts
            log.warning("thinker prefix cache: could not copy prompts from other engines", exc_info=True)
            return
        finally:
            self.counters["prefix_import_s"] += time.perf_counter() - wall
        self.counters["prefix_imports"] += imported
        self.counters["prefix_import_tokens"] += positions
        self.counters["prefix_imports_lost"] += lost

    def _store_prefixes(self, row: int, items: list[tuple[GenerationRequest, RequestStream]]) -> None:
        """Keep the whole blocks of the prompts just prefilled into rows row.. (thinker_prefix_cache_mib),
        unless they are stored already: copied into the cache's pages, since a row is overwritten
        once its request leaves. The cache makes room before each copy; a store that fails is
        logged and skipped: the admission does not depend on it."""
        cache = self.thinker_prefixes
        if cache is None:
            return
        kv = self.thinker.cache
        for i, (req, _) in enumerate(items):
            keys = req.prefix_keys
            if not keys or len(keys) * BLOCK < cache.min_tokens or cache.covers(keys):
                continue
            n = len(keys) * BLOCK
            try:
                cache.put(keys, kv.k[:, row + i, :, :n], kv.v[:, row + i, :, :n])  # makes room, or stores nothing
            except Exception:  # noqa: BLE001 - a cache is optional; the request goes on without it
                log.warning("thinker prefix cache: could not store a prompt of %d positions", n, exc_info=True)

    def _prefill_backbone_cached(self, row: int, reqs: list[GenerationRequest], tails: torch.Tensor):
        """Backbone prefill of rows row.. with voice prefixes from `voice_prefixes`: prefixes not
        held yet are computed once per voice (in the first rows, as scratch) and kept; every row
        then gets its voice's keys and values copied in, and one batched step computes the two
        positions of its own ([h0, embed(t1)]): through `backbone_tails`' graphs where they fit,
        else eagerly. Returns (states [n, H], backbone positions used)."""
        keys = [voice_key(r.prompt_text_ids, r.prompt_codes) for r in reqs]
        known = [k in self.voice_prefixes for k in keys]
        missing = list(dict.fromkeys(k for k, held in zip(keys, known) if not held))
        self.counters["voice_prefix_misses"] += len(missing)  # prefixes computed
        if missing:  # computed in the first rows, as scratch
            prefixes = self._voice_prefixes_of(row, [reqs[keys.index(k)] for k in missing])
            for k, (pk, pv) in zip(missing, prefixes):
                self.voice_prefixes.put(k, pk, pv)
        prefixes = []
        for i, k in enumerate(keys):
            held = self.voice_prefixes.get(k)
            if held is None:  # evicted by a voice of this same admission (capacity below its voices)
                held = self._voice_prefixes_of(row + i, [reqs[i]])[0]
                self.counters["voice_prefix_misses"] += 1
            elif known[i]:  # admissions that found their voice cached
                self.counters["voice_prefix_hits"] += 1
            prefixes.append(held)
        lengths = [pk.shape[2] for pk, _ in prefixes]
        tail_graphs = self.backbone_tails
        if tail_graphs is not None and tail_graphs.fits(len(reqs), max(lengths)):
            states = tail_graphs.run(row, prefixes, tails)
        else:
            copy_prefixes(self.frames.backbone_cache, row, prefixes)
            start = torch.tensor(lengths, device=self.device)
            positions = start[:, None] + torch.arange(2, device=self.device)
            last = torch.ones(len(reqs), dtype=torch.long, device=self.device)
            states = self.frames.backbone_step(tails, positions, last, max(lengths) + 2, row_start=row)
        return states, [n + 2 for n in lengths]

    def _voice_prefixes_of(self, row: int, reqs: list[GenerationRequest]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prefill the backbone prompts of `reqs` into rows row.. and return copies of their keys
        and values ([layers, kv_heads, positions, head_dim] each)."""
        prompts = [self._backbone_prompt(r) for r in reqs]
        x, lengths = pad_batch(prompts)
        positions = torch.arange(x.shape[1], device=self.device).expand(len(reqs), -1)
        self.frames.backbone_step(x, positions, lengths - 1, x.shape[1], row_start=row, from_start=True)
        cache = self.frames.backbone_cache
        return [(cache.k[:, row + j, :, :p.shape[0]].clone(), cache.v[:, row + j, :, :p.shape[0]].clone())
                for j, p in enumerate(prompts)]

    def _thinker_budget(self, req: GenerationRequest) -> int:
        """Reply tokens a request can consume: t1 at prefill, then one per talking (every other)
        frame of its `max_tokens` frames, plus the <|im_end|> pair."""
        return req.sampling.max_tokens // 2 + 2

    @property
    def _dtype(self) -> torch.dtype:
        return self.frames.backbone.codebook0_head.weight.dtype

    def _backbone_prompt(self, req: GenerationRequest) -> torch.Tensor:
        """[<|text_start|>, transcript..., <|text_end|>] text embeddings, one summed embedding per
        reference frame, then an all-zero vector (end of reference audio): [P, H]."""
        sp = self.special
        text_ids = torch.tensor([sp.text_start, *req.prompt_text_ids, sp.text_end], dtype=torch.long, device=self.device)
        text = self.thinker.embed(text_ids)
        codes = torch.tensor(np.asarray(req.prompt_codes), dtype=torch.long, device=self.device)
        audio = self.frames.frame_embedding(codes)
        zero = torch.zeros(1, text.shape[-1], device=self.device, dtype=text.dtype)
        return torch.cat([text, audio, zero], dim=0).to(self._dtype)

    # -- per-request bookkeeping --------------------------------------------------------------
    def _on_text_token(self, a: _Active, token: int) -> None:
        if token == self.special.im_end:
            a.thinker_done = True
            return
        a.text_tokens += 1
        delta = a.detok.add(token)
        if delta:
            a.stream.put(TextDelta(delta, a.text_tokens, time.monotonic()))
        if a.thinker_pos + 1 >= self.opts.thinker_max_len:
            a.thinker_done = True  # context full: the reply text ends here, audio goes on

    def _on_frame(self, a: _Active, codes: np.ndarray, eos: bool, at_cache_end: bool, plan: "_ChunkPlan") -> None:
        """One frame of `a`: `codes` [K] (kept as is: a row of this step's own array), `eos`
        whether it is the end-of-audio frame, `at_cache_end` whether the row's backbone cache has
        no room for another step, `plan` this step's chunk sizing."""
        if eos:
            a.finish = "stop"
            return
        a.last_codes = codes
        a.frames.append(codes)
        self.counters["frames"] += 1
        if len(a.frames) >= a.params.max_tokens or at_cache_end:
            a.finish = "length"
            return
        # chunk sizes grow with the audio already sent (2, 2, 4, 8, ... up to chunk_frames): the
        # first chunk comes fast, and each next one is due before the buffered audio runs out
        if len(a.frames) - a.sent >= self._chunk_target(a, plan):
            self._send_chunk(a)

    def _send_chunk(self, a: _Active) -> None:
        if len(a.frames) == a.sent:
            return
        ctx = min(self.opts.context_frames, a.sent)
        codes = np.stack(a.frames[a.sent - ctx:])
        a.stream.put(AudioChunk(codes=codes, context_frames=ctx, start_frame=a.sent))
        now = time.monotonic()
        left = None if a.first_chunk_at is None else a.first_chunk_at + a.sent * self._frame_s - now
        if self.trace is not None and a.chunks < self.TRACED_CHUNKS:  # the start-up chunks, where lateness lives
            self.trace.event("chunk", request=a.req.request_id, index=a.chunks, frames=len(a.frames) - a.sent,
                             left_s=left, rows=len(self._active))
        a.chunks += 1
        if left is None:
            a.first_chunk_at = now
        elif (late := -left) > 0:
            self.counters["late_chunks"] += 1
            self.counters["late_chunk_s"] += late
            if self.trace is not None:
                self.trace.event("late", request=a.req.request_id, start_frame=a.sent, frames=len(a.frames) - a.sent,
                                 late_s=late, since_first_chunk_s=now - a.first_chunk_at, step_s=self.pacer.step_s)
        a.sent = len(a.frames)
        a.in_hand_s = a.first_chunk_at + a.sent * self._frame_s - now

    def _retire(self) -> None:
        """Finish flagged requests and compact: the last row moves into each freed row."""
        if any(a.finish for a in self._active):
            self._settle_ahead()  # rows move: a thinker step running ahead must be done first
        for a in sorted((a for a in self._active if a.finish), key=lambda a: -a.row):
            if a.finish != "cancelled":
                self._send_chunk(a)
            a.stream.put(Finished(a.finish, a.prompt_tokens, a.text_tokens, len(a.frames), a.detok.text))
            self.counters["cancelled" if a.finish == "cancelled" else "finished"] += 1
            self._remove(a)

    def _remove(self, a: _Active) -> None:
        if self._release_row is not None:
            self._release_row(a.row)
        with self._lock:
            last = self._active[-1]
            if last is not a:
                self.thinker.move_row(last.row, a.row)
                self.frames.move_row(last.row, a.row)
                last.row = a.row
                self._active[a.row] = last
            self._active.pop()

    def _fail_all(self, message: str) -> None:
        """Fail every running request, then free their rows (a row that cannot be freed is logged:
        the requests must hear of the failure whatever the thinker's state)."""
        try:
            self._settle_ahead()
        except Exception:  # noqa: BLE001 - the device may be what failed
            log.exception("could not wait for the thinker's stream")
            self._ahead = None
        active = list(self._active)
        with self._lock:
            self._active.clear()
        for a in active:
            a.stream.put(RequestFailed(message))
            self.counters["failed"] += 1
        for a in active:
            if self._release_row is not None:
                try:
                    self._release_row(a.row)
                except Exception:  # noqa: BLE001
                    log.exception("could not release row %d", a.row)
