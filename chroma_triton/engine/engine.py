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
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CapacityError, InvalidRequestError
from ..model.frame_model import FrameModel, SamplingTensors
from ..model.loading import ChromaParts
from ..model.thinker import Thinker, TorchThinker
from .detokenizer import IncrementalDetokenizer
from .request import AudioChunk, Finished, GenerationRequest, RequestFailed, RequestStream, SamplingParams, TextDelta

log = logging.getLogger(__name__)


@dataclass
class EngineOptions:
    max_batch: int = 8  # concurrent requests (cache rows)
    thinker_max_len: int = 4096  # thinker context per request (prompt + reply tokens)
    backbone_max_len: int = 4096  # backbone context per request (reference prompt + 1-3 per frame)
    max_frames: int = 4000  # upper bound a request may ask for with max_tokens
    first_chunk_frames: int = 2  # first audio chunk small for latency
    chunk_frames: int = 10
    context_frames: int = 12  # already-sent frames repeated before each chunk as decode context
    max_queue: int = 1024  # requests waiting for a row before submit() refuses


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
    last_codes: torch.Tensor | None = None
    frames: list[np.ndarray] = field(default_factory=list)
    sent: int = 0  # frames already sent in chunks


class ChromaEngine:
    def __init__(self, parts: ChromaParts, options: EngineOptions | None = None, thinker: Thinker | None = None):
        if parts.thinker_lm is None or parts.frame_model is None or parts.tokenizer is None:
            raise ValueError("the engine needs the thinker, frame_model and tokenizer parts")
        self.opts = options or EngineOptions()
        self.cfg = parts.config
        self.device = parts.device
        self.special = parts.special
        self.default_top_k = parts.top_k
        self.tokenizer = parts.tokenizer
        self.thinker: Thinker = thinker or TorchThinker(parts.thinker_lm, self.cfg.thinker, self.opts.max_batch, self.opts.thinker_max_len)
        self.frames: FrameModel = parts.frame_model
        self.frames.setup_caches(self.opts.max_batch, self.opts.backbone_max_len)
        self.num_codebooks = self.cfg.num_codebooks
        self._pending: queue.Queue[tuple[GenerationRequest, RequestStream]] = queue.Queue()
        self._active: list[_Active] = []
        self._free_rows = list(range(self.opts.max_batch - 1, -1, -1))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters = {"admitted": 0, "finished": 0, "cancelled": 0, "failed": 0, "frames": 0, "steps": 0}

    # -- public API ---------------------------------------------------------------------------
    def start(self) -> "ChromaEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="chroma-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._pending.put(None)  # wake the loop
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, req: GenerationRequest) -> RequestStream:
        """Validate and queue a request; events arrive on the returned stream."""
        req.sampling = req.sampling.validated(self.default_top_k, self.opts.max_frames)
        self._validate(req)
        if self._pending.qsize() >= self.opts.max_queue:
            raise CapacityError(f"server busy: {self.opts.max_queue} requests already waiting; retry later")
        stream = RequestStream(req.request_id)
        self._pending.put((req, stream))
        if self._thread is None:
            raise RuntimeError("engine not started: call start() first")
        return stream

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "active": len(self._active),
                "queued": self._pending.qsize(),
                "free_rows": len(self._free_rows),
                "max_batch": self.opts.max_batch,
                **self.counters,
            }

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
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                admitted = self._admit()
                if not self._active:
                    continue
                self._step(admitted)
            except Exception as exc:  # a batched step failed: fail its requests, keep serving
                log.exception("engine step failed")
                self._fail_all(f"internal error during generation: {exc}")

    def _admit(self) -> dict[int, torch.Tensor]:
        """Drop cancelled requests, then admit waiting ones while rows are free.
        Returns {row: backbone state} for the requests admitted now (their frame 0 is pending)."""
        for a in [a for a in self._active if a.stream.cancelled]:
            self._finish(a, "cancelled")
        admitted: dict[int, torch.Tensor] = {}
        block = not self._active
        while self._free_rows:
            try:
                item = self._pending.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                break
            block = False
            if item is None:  # shutdown wake-up
                break
            req, stream = item
            if stream.cancelled:
                stream.put(Finished("cancelled", len(req.thinker_ids), 0, 0, ""))
                self.counters["cancelled"] += 1
                continue
            a, state = self._prefill(req, stream)
            if a is not None:
                admitted[a.row] = state
        return admitted

    def _prefill(self, req: GenerationRequest, stream: RequestStream):
        with self._lock:
            row = self._free_rows.pop()
        try:
            ids = torch.tensor(req.thinker_ids, dtype=torch.long, device=self.device)
            h0, t1 = self.thinker.prefill(row, ids, req.audio_embeds)
            x = torch.cat([self._backbone_prompt(req), h0[None].to(self._dtype), self.thinker.embed(torch.tensor([t1]))], dim=0)
            n = x.shape[0]
            state = self.frames.backbone_step(
                x[None], torch.tensor([row], device=self.device), torch.arange(n, device=self.device)[None],
                torch.tensor([n - 1], device=self.device), n)[0]
        except Exception as exc:
            log.exception("prefill failed for %s", req.request_id)
            with self._lock:
                self._free_rows.append(row)
            self.counters["failed"] += 1
            stream.put(RequestFailed(f"could not start generation: {exc}"))
            return None, None
        skip = {self.special.im_end, self.special.im_start}
        a = _Active(req=req, stream=stream, row=row, params=req.sampling,
                    detok=IncrementalDetokenizer(self.tokenizer, skip), prompt_tokens=len(req.thinker_ids),
                    thinker_pos=len(req.thinker_ids), thinker_token=t1, thinker_done=False, backbone_pos=n)
        self._on_text_token(a, t1)
        with self._lock:
            self._active.append(a)
            self.counters["admitted"] += 1
        return a, state

    @property
    def _dtype(self) -> torch.dtype:
        return self.frames.backbone.codebook0_head.weight.dtype

    def _backbone_prompt(self, req: GenerationRequest) -> torch.Tensor:
        """[<|text_start|>, transcript..., <|text_end|>] text embeddings, one summed embedding per
        reference frame, then an all-zero vector (end of reference audio): [P, H]."""
        sp = self.special
        text_ids = torch.tensor([sp.text_start, *req.prompt_text_ids, sp.text_end], dtype=torch.long)
        text = self.thinker.embed(text_ids)
        codes = torch.tensor(np.asarray(req.prompt_codes), dtype=torch.long, device=self.device)
        audio = self.frames.frame_embedding(codes)
        zero = torch.zeros(1, text.shape[-1], device=self.device, dtype=text.dtype)
        return torch.cat([text, audio, zero], dim=0).to(self._dtype)

    def _step(self, admitted: dict[int, torch.Tensor]) -> None:
        old = [a for a in self._active if a.row not in admitted]
        states = dict(admitted)
        if old:
            states.update(self._advance(old))
        batch = [a for a in self._active if a.row in states]
        rows = torch.tensor([a.row for a in batch], device=self.device)
        state = torch.stack([states[a.row] for a in batch])
        codes = self.frames.sample_frame(state, rows, self._sampling_tensors(batch)).cpu()
        self.counters["steps"] += 1
        for a, c in zip(batch, codes):
            self._on_frame(a, c)

    def _advance(self, batch: list[_Active]) -> dict[int, torch.Tensor]:
        """One thinker step (for requests on an even frame) and one backbone step for `batch`."""
        talk = [a for a in batch if a.step % 2 == 0 and not a.thinker_done]
        pairs: dict[int, torch.Tensor] = {}
        if talk:
            h, nxt = self.thinker.decode([a.row for a in talk], torch.tensor([a.thinker_token for a in talk]),
                                         [a.thinker_pos for a in talk])
            emb = self.thinker.embed(nxt)
            for i, (a, t) in enumerate(zip(talk, nxt.tolist())):
                pairs[a.row] = torch.stack([h[i].to(self._dtype), emb[i].to(self._dtype)])
                a.thinker_pos += 1
                a.thinker_token = t
                self._on_text_token(a, t)
        width = 3 if pairs else 1
        hidden = self.frames.backbone.model.cfg.hidden_size
        x = torch.zeros(len(batch), width, hidden, device=self.device, dtype=self._dtype)
        x[:, 0] = self.frames.frame_embedding(torch.stack([a.last_codes for a in batch]).to(self.device))
        lengths = []
        for i, a in enumerate(batch):
            if a.row in pairs:
                x[i, 1:3] = pairs[a.row]
            lengths.append(3 if a.row in pairs else 1)
        start = torch.tensor([a.backbone_pos for a in batch], device=self.device)
        positions = start[:, None] + torch.arange(width, device=self.device)[None]
        key_len = max(a.backbone_pos for a in batch) + width
        out = self.frames.backbone_step(x, torch.tensor([a.row for a in batch], device=self.device), positions,
                                        torch.tensor(lengths, device=self.device) - 1, key_len)
        for a, n in zip(batch, lengths):
            a.backbone_pos += n
        return {a.row: out[i] for i, a in enumerate(batch)}

    def _sampling_tensors(self, batch: list[_Active]) -> SamplingTensors:
        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=self.device)

        return SamplingTensors(
            temperature=t([a.params.temperature for a in batch], torch.float32),
            top_k=t([a.params.top_k for a in batch], torch.long),
            top_p=t([a.params.top_p for a in batch], torch.float32),
            seeds=t([a.params.seed for a in batch], torch.long),
            frames=t([a.step for a in batch], torch.long),
        )

    # -- per-request bookkeeping --------------------------------------------------------------
    def _on_text_token(self, a: _Active, token: int) -> None:
        if token == self.special.im_end:
            a.thinker_done = True
            return
        a.text_tokens += 1
        delta = a.detok.add(token)
        if delta:
            a.stream.put(TextDelta(delta))
        if a.thinker_pos + 1 >= self.opts.thinker_max_len:
            a.thinker_done = True  # context full: the reply text ends here, audio goes on

    def _on_frame(self, a: _Active, codes: torch.Tensor) -> None:
        a.step += 1
        eos = bool((codes[: self.num_codebooks - 1] == self.cfg.codebook_eos_id).all())
        if eos:
            self._finish(a, "stop")
            return
        a.last_codes = codes
        a.frames.append(codes.numpy())
        self.counters["frames"] += 1
        if len(a.frames) >= a.params.max_tokens or a.backbone_pos + 3 > self.opts.backbone_max_len:
            self._finish(a, "length")
            return
        want = self.opts.first_chunk_frames if a.sent == 0 else self.opts.chunk_frames
        if len(a.frames) - a.sent >= want:
            self._send_chunk(a)

    def _send_chunk(self, a: _Active) -> None:
        if len(a.frames) == a.sent:
            return
        ctx = min(self.opts.context_frames, a.sent)
        codes = np.stack(a.frames[a.sent - ctx:])
        a.stream.put(AudioChunk(codes=codes, context_frames=ctx, start_frame=a.sent))
        a.sent = len(a.frames)

    def _finish(self, a: _Active, reason: str) -> None:
        if reason != "cancelled":
            self._send_chunk(a)
        a.stream.put(Finished(reason, a.prompt_tokens, a.text_tokens, len(a.frames), a.detok.text))
        self._release(a)
        self.counters["cancelled" if reason == "cancelled" else "finished"] += 1

    def _release(self, a: _Active) -> None:
        with self._lock:
            if a in self._active:
                self._active.remove(a)
                self._free_rows.append(a.row)

    def _fail_all(self, message: str) -> None:
        for a in list(self._active):
            a.stream.put(RequestFailed(message))
            self._release(a)
            self.counters["failed"] += 1
