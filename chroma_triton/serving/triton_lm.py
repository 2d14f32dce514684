"""The logic of the ``chroma_lm`` Triton model (decoupled; its model.py only moves tensors).

One :class:`LMService` per model instance (one per GPU): it owns a :class:`ChromaEngine`, whose
background thread batches every active request of the instance (continuous batching). Each
Triton request gets a thread that turns its inputs into a :class:`GenerationRequest`, submits it
and relays the engine's events as responses: text deltas and code chunks (with left context for
the codec), merged when several are ready at once; the last one carries ``finish_reason``, the
final usage and the final flag. Cancellation is polled between events.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..engine import (AudioChunk, ChromaEngine, EngineOptions, Finished, GenerationRequest, RequestFailed, RequestStream,
                      SamplingParams, TextDelta)
from ..engine.capacity import PREFIX_CACHE_AUTO
from ..engine.engine import ALL_TRUNKS, TRITON_KERNEL_OPTIONS
from ..engine.peer_prefixes import FOLDER as PEERS_FOLDER
from ..errors import EngineError, InvalidRequestError
from ..model.loading import ChromaParts
from ..processor import PromptBuilder, normalize_messages
from .cancel_board import default_dir
from .gc_pauses import GcMonitor
from .protocol import LMResponse, parse_messages, resolve_audio_parts

log = logging.getLogger(__name__)

# The longest a relay waits for the engine's next event before it looks again at cancellation
# and at held text. Text does not wake it (it rides on the next chunk), so text with no chunk
# after it goes out max(TEXT_HOLD_S, POLL_S) after the engine made it. Each wake-up takes the GIL
# the engine's thread needs: at 256 streams, 50 ms and a wake per token meant thousands a second.
POLL_S = 0.25
SENDER_CANCEL_POLL_S = 0.2  # direct callers' cancellation (an IPC round trip per ask) is seen within this
QUIET_POLL_S = 1.0  # relay_wakeups "quiet": both of the above
# Text deltas ride on the next audio chunk (chunks come every 0.16-0.8 s of audio); text waits at
# most this long for one. Every response runs codec_decoder and stream_watch in the ensemble, so a
# response per text token would multiply their load several times over (measured: 63 responses
# per 100-frame reply instead of 13).
TEXT_HOLD_S = 0.4


@dataclass
class LMInput:
    messages: str  # JSON
    audio_embeds: np.ndarray | torch.Tensor  # [sum tokens, H] (any leading dims of 1), float32 or bf16
    audio_token_counts: np.ndarray  # [clips]
    prompt_codes: np.ndarray  # [frames, K]
    voice_text: str
    sampling: dict = field(default_factory=dict)  # max_tokens, temperature, top_k, top_p, seed (None: default)


class LMService:
    def __init__(self, parts: ChromaParts, options: EngineOptions):
        self.parts = parts
        self.num_codebooks = parts.config.num_codebooks
        self.hidden = int(parts.config.thinker.text.hidden_size)
        self.prompts = PromptBuilder(parts.tokenizer, parts.special.audio)
        self.engine = ChromaEngine(parts, options).start()
        self.gc = GcMonitor(on_pause=self._gc_pause)

    def watch_gc(self) -> None:
        """Time the process's garbage collections from now on (they stop the engine's thread too):
        `stats()` and, with a trace, a `gc` note per collection of 5 ms or more. Call it once
        loading is done, after `gc_freeze`'s own collection."""
        self.gc.install()

    def _gc_pause(self, generation: int, seconds: float) -> None:
        # runs inside the collection, in whichever thread it happened: queue only (EngineTrace.note)
        trace = self.engine.trace
        if trace is not None:
            trace.note("gc", gen=generation, s=seconds, in_engine=threading.get_ident() == self.engine.thread_ident)

    def close(self) -> None:
        self.gc.uninstall()
        self.engine.shutdown()

    def stats(self) -> dict[str, int]:
        return {**self.engine.stats(), **self.gc.stats()}

    # -- inputs ------------------------------------------------------------------------------------
    def prepare(self, inp: LMInput) -> GenerationRequest:
        counts = [int(c) for c in np.asarray(inp.audio_token_counts).reshape(-1)]
        embeds = inp.audio_embeds
        if not isinstance(embeds, torch.Tensor):  # numpy from a direct caller; None: no clips
            embeds = torch.from_numpy(np.asarray(() if embeds is None else embeds, dtype=np.float32))
        if embeds.dtype not in (torch.float32, torch.bfloat16):
            raise InvalidRequestError(f"audio_embeds must be float32 or bfloat16, got {embeds.dtype}", "audio_embeds")
        embeds = embeds.reshape(-1, embeds.shape[-1]) if embeds.numel() else torch.zeros((0, self.hidden), dtype=embeds.dtype)
        if embeds.shape[0] != sum(counts):
            raise InvalidRequestError(f"audio_embeds has {embeds.shape[0]} rows but audio_token_counts sum to {sum(counts)}",
                                      "audio_embeds")
        if embeds.shape[0] and embeds.shape[1] != self.hidden:
            raise InvalidRequestError(f"audio_embeds must have {self.hidden} columns, got {embeds.shape[1]}", "audio_embeds")
        messages, used = resolve_audio_parts(parse_messages(inp.messages), len(counts))
        template_msgs, order = normalize_messages(messages)
        unused = sorted(set(range(len(counts))) - set(used))
        if unused:
            raise InvalidRequestError(
                f"user_audio clip(s) {unused} are not referenced by any {{\"type\": \"audio\", \"audio_index\": i}} "
                f"message part", "user_audio")
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
        pieces = [embeds[starts[i]:starts[i + 1]] for i in order]
        ids = self.prompts.thinker_ids(template_msgs, [counts[i] for i in order])
        if not inp.voice_text.strip():
            raise InvalidRequestError("prompt_text (the transcript of prompt_audio) must be a non-empty string", "prompt_text")
        codes = np.asarray(inp.prompt_codes).reshape(-1, self.num_codebooks) if np.asarray(inp.prompt_codes).size else None
        if codes is None:
            raise InvalidRequestError("the reference voice produced no codes", "prompt_audio")
        # stays on the CPU: the engine thread moves it at prefill. No CUDA work on request threads,
        # which could run while the engine thread captures a CUDA graph. A copy of its own (cat
        # always copies): the input's memory is Triton's and goes with the request.
        audio = torch.cat(pieces) if pieces else None
        return GenerationRequest(
            thinker_ids=ids,
            prompt_text_ids=self.prompts.text_ids(inp.voice_text),
            prompt_codes=codes.astype(np.int64),
            audio_embeds=audio,
            sampling=sampling_params(inp.sampling),
            request_id=uuid.uuid4().hex,
        )

    # -- streaming --------------------------------------------------------------------------------
    def open(self, inp: LMInput, on_submit: Callable | None = None) -> tuple[RequestStream, "_Relay"]:
        """Start generating for one request: its engine stream and the relay that turns the
        stream's events into responses (for :meth:`relay` or a :class:`~.relay_hub.RelayHub`).
        ``on_submit(stream)`` gets the engine stream as soon as it exists, so that another thread
        (the cancel watch) can ``cancel()`` it directly, without waiting for the relay.
        Raises InvalidRequestError / EngineError when the request cannot start."""
        req = self.prepare(inp)
        stream = self.engine.submit(req)
        if on_submit is not None:
            on_submit(stream)
        return stream, _Relay(len(req.thinker_ids), TEXT_HOLD_S)

    def relay(self, stream: RequestStream, relay: "_Relay", send: Callable[[LMResponse], None],
              cancelled: Callable[[], bool], poll_s: float = POLL_S, text_wakes: bool = False) -> Finished:
        """Relay an opened request's events on this thread, calling ``send`` for each response
        (the last has ``final``), until its end (a thread per request: chroma_lm's ``relays:
        per_request``). Raises EngineError when generation fails midway."""
        cancel_sent = False
        try:
            while True:
                if not cancel_sent and cancelled():
                    stream.cancel()
                    cancel_sent = True
                try:
                    # text rides on the next chunk: only chunks, the end, a held text's deadline
                    # or the poll wake this thread (not every token; each wake-up takes the GIL)
                    event = stream.get(timeout=relay.wait_s(poll_s), text_wakes=text_wakes)
                except queue.Empty:
                    relay.forward([], send)  # held text that waited long enough
                    continue
                events = [event]
                while event is not None and not isinstance(event, (Finished, RequestFailed)):
                    try:
                        event = stream.get(timeout=0)
                    except queue.Empty:
                        break
                    events.append(event)
                if relay.forward(events, send):
                    return relay.finished
        finally:
            stream.cancel()  # no-op when finished; frees the row if we leave early (send failed)


@dataclass(frozen=True)
class RelayWakeups:
    """How often a relay thread wakes (chroma_lm's ``relay_wakeups`` parameter): ``lean`` (the
    default) as above; ``quiet``: a 1 s poll and Triton's ``is_cancelled()`` at most once a second
    (cancellation by a direct gRPC client seen within about a second; the frontend's cancel path
    does not poll); ``every_event`` as before session 6 (every text token, a 50 ms poll,
    ``is_cancelled()`` at every wake): on one H100 it made 256 served streams 3-5x slower than
    ``lean`` (docs/benchmarks.md run 28), every wake-up taking the GIL the engine thread needs."""
    poll_s: float
    text_wakes: bool
    sender_cancel_poll_s: float

    @classmethod
    def named(cls, name: str) -> "RelayWakeups":
        modes = {"lean": cls(POLL_S, False, SENDER_CANCEL_POLL_S), "every_event": cls(0.05, True, 0.0),
                 "quiet": cls(QUIET_POLL_S, False, QUIET_POLL_S)}
        if name not in modes:
            raise ValueError(f"relay_wakeups must be one of {sorted(modes)}, got {name!r}")
        return modes[name]


def throttled(check: Callable[[], bool], period_s: float, clock=time.monotonic) -> Callable[[], bool]:
    """`check` asked at most once per `period_s` (False in between), True for good once it says so.
    For Triton's ``is_cancelled()``, an IPC round trip to the server per call: a relay asks after
    every event, thousands of times a second at 256 streams, for a flag that turns true once."""
    state = {"next": 0.0, "seen": False}

    def ask() -> bool:
        if state["seen"]:
            return True
        now = clock()
        if now < state["next"]:
            return False
        state["next"] = now + period_s
        state["seen"] = bool(check())
        return state["seen"]
    return ask


def sampling_params(values: dict) -> SamplingParams:
    d = SamplingParams()
    def pick(name, default):
        v = values.get(name)
        return default if v is None else v
    max_tokens = pick("max_tokens", d.max_tokens)
    top_k = values.get("top_k")
    if top_k is not None and top_k < 0:
        top_k = None  # a negative top_k means "the checkpoint's default" for clients that must send something
    seed = values.get("seed")
    if seed is not None and seed < 0:
        seed = None  # likewise, -1 = random
    return SamplingParams(temperature=float(pick("temperature", d.temperature)), top_k=top_k,
                          top_p=float(pick("top_p", d.top_p)), seed=seed, max_tokens=int(max_tokens))


class _Relay:
    """Engine events -> responses: text is carried by the next audio chunk (held up to `hold_s`
    when no chunk is ready), and the last chunk carries the finish reason and the final flag."""

    def __init__(self, prompt_tokens: int, hold_s: float = 0.0, clock=time.monotonic):
        self.prompt_tokens = prompt_tokens
        self.text_tokens = 0
        self.frames = 0
        self.finished: Finished | None = None
        self.hold_s = hold_s
        self.clock = clock
        self._text: list[str] = []  # held text
        self._text_since: float | None = None

    def usage(self) -> tuple[int, int, int]:
        return (self.prompt_tokens, self.text_tokens, self.frames)

    def wait_s(self, longest: float) -> float:
        """How long to wait for the next event: `longest`, or less when held text falls due sooner."""
        due = self.text_due_at()
        return longest if due is None else min(longest, max(due - self.clock(), 0.0))

    def text_due_at(self) -> float | None:
        """When held text must go out without a chunk (this relay's clock), or None: none held."""
        return None if not self._text else self._text_since + self.hold_s

    def _take_text(self) -> str:
        text, self._text, self._text_since = "".join(self._text), [], None
        return text

    def forward(self, events: list, send: Callable[[LMResponse], None]) -> bool:
        """Send the responses of `events` (a None among them: the stream has ended); True once
        the request has finished. Raises what a failed request raises, and EngineError when the
        stream ended without a result."""
        for response in self.responses(events):
            send(response)
        if self.finished is not None:
            return True
        if events and events[-1] is None:
            raise EngineError("the engine ended the stream without a result")
        return False

    def responses(self, events: list) -> list[LMResponse]:
        out: list[LMResponse] = []
        for ev in events:
            if isinstance(ev, TextDelta):
                if not self._text:  # held from when the engine made it (the relay may hear of it later)
                    now = self.clock()
                    self._text_since = now if ev.at is None else min(ev.at, now)
                self._text.append(ev.text)
                self.text_tokens = max(self.text_tokens, getattr(ev, "text_tokens", 0))
            elif isinstance(ev, AudioChunk):
                self.frames += len(ev.codes) - ev.context_frames
                out.append(LMResponse(text=self._take_text(), codes=ev.codes, context_frames=ev.context_frames,
                                      start_frame=ev.start_frame,
                                      usage=self.usage()))
            elif isinstance(ev, Finished):
                self.finished = ev
                self.text_tokens, self.frames = ev.text_tokens, ev.audio_frames
                usage = (ev.prompt_tokens, ev.text_tokens, ev.audio_frames)
                if out and not self._text:  # the last chunk carries the end
                    last = out[-1]
                    last.finish_reason, last.usage, last.final = ev.reason, usage, True
                else:
                    out.append(LMResponse(text=self._take_text(), finish_reason=ev.reason, usage=usage, final=True))
                return out
            elif isinstance(ev, RequestFailed):
                raise ev.exception()
        if self._text and self.clock() - self._text_since >= self.hold_s:
            out.append(LMResponse(text=self._take_text(), usage=self.usage()))
        return out


_INT_OPTIONS = ("max_batch", "thinker_max_len", "backbone_max_len", "max_frames", "first_chunk_frames",
                "chunk_frames", "context_frames", "max_queue", "max_prefills_per_step", "prefill_token_budget",
                "forced_admissions", "voice_prefix_cache", "topk_segments", "prefill_graph_max_len",
                "prefill_graph_tokens", "thinker_prefix_min_tokens")
_FLOAT_OPTIONS = ("start_slack_s", "admission_margin_s", "max_admission_wait_s", "max_queue_wait_s", "kv_memory_fraction",
                  "activation_reserve_gib", "switch_interval_ms", "pacing_sigmas")
_BOOL_OPTIONS = ("admission_pacing", "admission_slack", "cuda_graphs", "capture_at_start", "overlap", "thinker_ahead",
                 "compiled_prefill_graphs")
_AUTO_OPTIONS = ("compile", "prefill_graphs", "fused_sampling", "gemv")  # "auto" (or empty): on for an instance on a GPU, off on the CPU


def engine_options(args) -> EngineOptions:
    """EngineOptions from a model's config parameters (``args.int/float/bool(key, default)``, as
    ModelArgs has them); parameters left out keep EngineOptions' defaults. ``compile``,
    ``prefill_graphs``, ``fused_sampling`` and ``gemv`` may also be ``auto`` (their default): on for an
    instance on a GPU, off on the CPU. ``decode_attention`` lists trunks, or is ``auto`` (or empty, its
    default: all three on a GPU, none on the CPU) or ``none``. ``thinker_prefix_cache_mib`` may be
    ``auto``: a share of the memory the rows leave (engine/capacity.py)."""
    d = EngineOptions()
    kwargs = {name: args.int(name, getattr(d, name)) for name in _INT_OPTIONS}
    kwargs.update({name: args.float(name, getattr(d, name)) for name in _FLOAT_OPTIONS})
    kwargs.update({name: args.bool(name, getattr(d, name)) for name in _BOOL_OPTIONS})
    kwargs["thinker_prefix_cache_mib"] = _prefix_cache_mib(args, d.thinker_prefix_cache_mib)
    kwargs["math_attention"] = args.str("math_attention", d.math_attention)
    kwargs["admission_wait_clock"] = args.str("admission_wait_clock", d.admission_wait_clock)
    device = str(getattr(args, "device", "cpu"))
    kwargs["trace_path"] = args.instance_path("trace_path")
    if args.bool("shared_thinker_prefixes", False):  # the instances of one tritonserver share its board folder
        kwargs["thinker_prefix_peers"] = str(default_dir() / PEERS_FOLDER)
    on_gpu = device.startswith("cuda")
    for name in _AUTO_OPTIONS:
        auto = args.str(name).strip().lower() in ("", "auto")
        # the two Triton kernels: auto also needs Triton (PyTorch's CUDA builds bring it)
        usable = on_gpu and TRITON_KERNEL_OPTIONS.get(name, lambda: True)()
        try:
            kwargs[name] = usable if auto else args.bool(name, getattr(d, name))
        except ValueError as exc:
            raise ValueError(f"{exc} (or auto: on for a GPU instance, off on the CPU)") from None
    kwargs["decode_attention"] = _decode_attention_trunks(args.str("decode_attention", "auto"), on_gpu)
    return EngineOptions(**kwargs)


def _prefix_cache_mib(args, default: int) -> int:
    """`thinker_prefix_cache_mib`: MiB (0: off), or ``auto`` (PREFIX_CACHE_AUTO)."""
    if args.str("thinker_prefix_cache_mib").strip().lower() == "auto":
        return PREFIX_CACHE_AUTO
    try:
        mib = args.int("thinker_prefix_cache_mib", default)
    except ValueError as exc:
        raise ValueError(f"{exc} (MiB; 0: off) or auto") from None
    if mib < 0:
        raise ValueError(f"model {args.name}: parameter thinker_prefix_cache_mib={mib} must be >= 0 (MiB; 0: off) or auto")
    return mib


def _decode_attention_trunks(value: str, on_gpu: bool) -> str:
    """`decode_attention`'s trunk list: auto = every trunk on a GPU instance with Triton (run 55:
    8-13 % more audio per second at 256 streams, 6-7 % less time per frame at batch 1), none on the CPU."""
    value = value.strip().lower()
    if value == "auto":
        return ALL_TRUNKS if on_gpu and TRITON_KERNEL_OPTIONS["decode_attention"]() else ""
    return "" if value == "none" else value
