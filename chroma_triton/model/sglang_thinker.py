"""The thinker on SGLang: `SGLangThinker` implements the engine's `Thinker` protocol on an
in-process `sglang.Engine` (continuous batching, paged KV, CUDA graphs).

Design (docs/sglang.md has the long form):

* The thinker's reply is greedy and depends only on its prompt, never on the audio frames the
  engine generates. So each request's whole reply can be generated *ahead* on SGLang, at
  SGLang's own pace and batching, and consumed by the engine one token per talking step. This is
  exact, not an approximation: the engine would feed the very same tokens at the very same
  positions (text t_k always follows t_{k-1}; the audio loop never writes into the thinker).
* Hidden states never travel as Python lists. The SGLang model class
  (`sglang_models/chroma_thinker.py`) writes each token's post-norm hidden state straight into
  a GPU buffer that this process allocates and shares with SGLang's scheduler process through a
  CUDA IPC handle: ``hidden[slot, position - (prompt_len - 1)]``. Index 0 is the last prompt
  position (h0); index k is the state after feeding reply token t_k. The request id carries
  ``slot`` and ``prompt_len - 1``; the model class maps SGLang's request-pool index to them
  during prefill, and the decode CUDA graph does the scatter with plain tensor ops.
* Only the token ids come back through SGLang's streaming output (ints, not hidden states).
  `prepare_decode` (host) waits until every talking row has the token it needs (normally long
  there already), then writes (slot, index, next id) per row into a small static device tensor;
  `decode` is a pure gather from static buffers, so the engine can capture it in its CUDA graph.
* Rows follow the engine's compaction (`move_row`), release (`release_row`, which aborts a
  still-running SGLang request) and failure semantics. A slot is reused only after its SGLang
  request has finished, so a late write can never land in a newer request's slot.

The generation backend is pluggable (`ThinkerBackend`): `SGLangEngineBackend` here, and a
PyTorch stand-in in the CPU tests, which exercises all of the bookkeeping without SGLang.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from ..config import ThinkerConfig

log = logging.getLogger(__name__)

MODEL_PACKAGE = "chroma_triton.model.sglang_models"
ARCHITECTURE = "ChromaThinkerForCausalLM"  # == EntryClass.__name__ in sglang_models/chroma_thinker.py
ENV_SHARE = "CHROMA_SGLANG_SHARE"  # path of the pickled CUDA IPC handle the model class opens
THINKER_LM_PREFIXES = ("thinker.model.", "thinker.lm_head.")
INDEX_FILE = "model.safetensors.index.json"

# Defaults for sglang.Engine (overridable with engine_kwargs). The triton attention backend was
# the reliable one on the GPU machines (flashinfer's first JIT compile can take minutes); prefill
# graphs stay off because the model class reads request ids in eager prefill (and they double
# the start time); no tokenizer: ids in, ids out.
DEFAULT_ENGINE_KWARGS: dict[str, Any] = {
    "skip_tokenizer_init": True,
    "dtype": "bfloat16",
    "attention_backend": "triton",
    "sampling_backend": "pytorch",
    "mem_fraction_static": 0.3,
    "disable_prefill_cuda_graph": True,
    "log_level": "warning",
}


# -- request ids and the hidden-state scatter (shared with the SGLang model class) ---------------
def make_rid(tag: str, slot: int, base: int) -> str:
    """Request id `tag:slot:base:hex`. Fixed-length hex, so no id is a prefix of another (SGLang's
    abort matches request ids by prefix)."""
    return f"{tag}:{slot}:{base}:{uuid.uuid4().hex}"


def parse_rid(rid: Any, tag: str) -> tuple[int, int]:
    """(slot, base) from an id made by `make_rid` with this tag, else (-1, 0): not ours."""
    if not isinstance(rid, str):
        return -1, 0
    parts = rid.split(":")
    if len(parts) != 4 or parts[0] != tag:
        return -1, 0
    try:
        return int(parts[1]), int(parts[2])
    except ValueError:
        return -1, 0


def scatter_hidden(buffer: torch.Tensor, hidden: torch.Tensor, slot: torch.Tensor, base: torch.Tensor,
                   positions: torch.Tensor) -> None:
    """buffer[slot, position - base] = hidden, token by token. Tokens that are not ours (slot < 0),
    prompt positions before the last one, and anything out of range go to the write-trash row
    (buffer.shape[0] - 2). Pure tensor code with no host sync: it runs inside SGLang's decode
    CUDA graph."""
    trash = buffer.shape[0] - 2
    slot = slot.long()
    idx = positions.long() - base.long()
    ok = (slot >= 0) & (slot < trash) & (idx >= 0) & (idx < buffer.shape[1])
    buffer[torch.where(ok, slot, trash), torch.where(ok, idx, 0)] = hidden.to(buffer.dtype)


def share_tensors(path: Path, payload: dict[str, Any]) -> None:
    """Pickle `payload` with torch's multiprocessing reductions: CUDA tensors travel as IPC
    handles (the memory stays ours; the reader maps it)."""
    import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(payload)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def load_shared(path: str | os.PathLike) -> dict[str, Any]:
    import torch.multiprocessing  # noqa: F401

    with open(path, "rb") as fh:
        return pickle.load(fh)


# -- the model folder SGLang loads -----------------------------------------------------------------
def prepare_model_dir(checkpoint: str | os.PathLike, cfg: ThinkerConfig, out_dir: str | os.PathLike, *,
                      eos_token_id: int, pad_token_id: int | None = None, context_length: int | None = None) -> Path:
    """A folder SGLang can load: a Qwen2 `config.json` whose architecture is our model class, and
    symlinks to the Chroma checkpoint's safetensors shards that hold `thinker.model.*` /
    `thinker.lm_head.*` (with an index listing only those keys). The weights are read straight
    from the Chroma files; the model class strips `thinker.` and skips everything else."""
    src, out = Path(checkpoint), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = src / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (src / "model.safetensors").exists():
        from safetensors import safe_open

        with safe_open(str(src / "model.safetensors"), framework="pt") as fh:
            weight_map = {k: "model.safetensors" for k in fh.keys()}
    else:
        raise FileNotFoundError(f"{src}: no {INDEX_FILE} or model.safetensors")
    wanted = {k: f for k, f in weight_map.items() if k.startswith(THINKER_LM_PREFIXES)}
    if not any(k.startswith("thinker.model.layers.") for k in wanted):
        raise ValueError(f"{src}: the checkpoint has no thinker.model.layers.* weights")
    for name in sorted(set(wanted.values())):
        link = out / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((src / name).resolve())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wanted}, indent=1) + "\n")
    text = cfg.text
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_layers,
        "num_attention_heads": text.num_heads,
        "num_key_value_heads": text.num_kv_heads,
        "head_dim": text.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": text.rms_norm_eps,
        # Qwen2.5-Omni's mrope over text/audio positions is ordinary 1-D rope (see thinker.py)
        "rope_theta": text.rope.theta,
        "rope_scaling": None,
        "max_position_embeddings": max(text.max_position_embeddings, context_length or 0),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": "bfloat16",
        "chroma_source": str(src.resolve()),
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


# -- requests and backends -------------------------------------------------------------------------
@dataclass
class ThinkerRequest:
    rid: str
    slot: int
    base: int  # prompt length - 1: hidden[slot, 0] is the last prompt position
    input_ids: list[int]
    audio_positions: list[int]
    audio_embeds: torch.Tensor | None  # [len(audio_positions), H] on the CPU
    max_new_tokens: int
    stop_token_id: int
    ids: list[int] = field(default_factory=list)  # reply tokens so far (t1, t2, ...)
    finish: dict | None = None  # SGLang's finish_reason
    error: str | None = None
    done: bool = False  # the backend will write nothing more for it
    released: bool = False  # the engine no longer owns it


class ThinkerBackend(Protocol):
    """Generates requests ahead. It writes hidden states into `thinker.hidden` (see
    `scatter_hidden`) and reports through `thinker.on_output / on_error / on_done`."""

    def start(self, thinker: "SGLangThinker") -> None: ...
    def submit(self, req: ThinkerRequest) -> None: ...
    def abort(self, req: ThinkerRequest) -> None: ...
    def close(self) -> None: ...


class ThinkerError(RuntimeError):
    pass


class SGLangThinker:
    """`Thinker` over a backend that generates each request's greedy reply ahead (see module doc)."""

    def __init__(self, embed: nn.Embedding, cfg: ThinkerConfig, rows: int, max_len: int, *, im_end_id: int,
                 backend: ThinkerBackend, slots: int | None = None, hidden_dtype: torch.dtype = torch.bfloat16,
                 timeout_s: float = 120.0):
        self.embed_tokens, self.cfg = embed, cfg
        self.hidden_size = cfg.text.hidden_size
        self.device = embed.weight.device
        self.rows, self.max_len = rows, max_len
        self.im_end_id = im_end_id
        self.timeout_s = timeout_s
        self.slots = slots or rows + max(4, rows // 4)
        self.write_trash, self.read_zero = self.slots, self.slots + 1
        # [slots + 2, max_len, H]: index = position - (prompt_len - 1); last two rows: trash, zeros
        self.hidden = torch.zeros(self.slots + 2, max_len, self.hidden_size, dtype=hidden_dtype, device=self.device)
        self._meta = torch.zeros(rows, 3, dtype=torch.long, device=self.device)  # per row: slot, index, next id
        self._meta[:, 0] = self.read_zero
        self._rows: list[ThinkerRequest | None] = [None] * rows
        self._free = list(range(self.slots))
        self._cond = threading.Condition()
        self.tag = "chroma" + uuid.uuid4().hex[:10]
        self.backend = backend
        self._closed = False
        self.counters = {"submitted": 0, "aborted": 0, "waits": 0, "wait_s": 0.0}
        backend.start(self)

    @classmethod
    def from_parts(cls, parts, rows: int, max_len: int, *, engine_kwargs: dict | None = None,
                   work_dir: str | os.PathLike | None = None, slots: int | None = None, timeout_s: float = 120.0,
                   free_torch_thinker: bool = False) -> "SGLangThinker":
        """The SGLang thinker for loaded `ChromaParts` (thinker embedding, config, checkpoint folder).
        `free_torch_thinker` drops the PyTorch thinker's layers and head from `parts` (only its
        embedding table is used here), when nothing else will build a TorchThinker from them."""
        if parts.device.type != "cuda":
            raise ValueError(f"the SGLang thinker needs a CUDA device, not {parts.device}")
        lm = parts.thinker_lm
        cfg = parts.config.thinker
        backend = SGLangEngineBackend(parts.folder, cfg, max_len=max_len, rows=rows, device=parts.device,
                                      eos_token_id=parts.special.im_end, engine_kwargs=engine_kwargs, work_dir=work_dir)
        thinker = cls(lm.model.embed_tokens, cfg, rows, max_len, im_end_id=parts.special.im_end, backend=backend,
                      slots=slots, timeout_s=timeout_s)
        if free_torch_thinker:
            lm.model.layers = nn.ModuleList()
            lm.lm_head = None
            torch.cuda.empty_cache()
        return thinker

    # -- Thinker protocol --------------------------------------------------------------------
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids.to(self.device))

    def prefill(self, row_start: int, prompts: list[tuple[torch.Tensor, torch.Tensor | None]],
                max_new_tokens: Sequence[int] | None = None):
        """Submit the prompts (rows row_start..) and wait for each one's first reply token.
        `max_new_tokens` (per prompt, optional): reply tokens the engine can consume at most; SGLang
        generates ahead, so without it a reply that never ends runs to the context limit."""
        reqs = []
        try:
            for i, (ids, audio) in enumerate(prompts):
                budget = None if max_new_tokens is None else int(max_new_tokens[i])
                reqs.append(self._submit(row_start + i, ids, audio, budget))
            self._wait(lambda: all(r.ids or r.done or r.error for r in reqs), "first reply token")
            for r in reqs:
                if not r.ids:
                    raise ThinkerError(f"thinker request failed before its first token: {r.error or r.finish}")
        except BaseException:
            for i in range(len(reqs)):
                self.release_row(row_start + i)
            raise
        slots = torch.tensor([r.slot for r in reqs], device=self.device)
        h0 = self.hidden[slots, 0]
        t1 = torch.tensor([r.ids[0] for r in reqs], dtype=torch.long, device=self.device)
        return h0, t1

    def prepare_decode(self, positions: Sequence[int | None]) -> None:
        """Host side of a talking step, rows 0..len(positions)-1: position of the token each row
        feeds (None: the row does not talk). Waits until every talking row's next token exists,
        then stages (slot, index, next id) for `decode`."""
        need = []
        for row, pos in enumerate(positions):
            if pos is None:
                continue
            req = self._rows[row]
            if req is None:
                raise ThinkerError(f"row {row} talks but holds no thinker request")
            need.append((row, req, pos - req.base))
        self._wait(lambda: all(len(r.ids) > k or r.done or r.error for _, r, k in need), "next reply token")
        meta = np.zeros((self.rows, 3), dtype=np.int64)
        meta[:, 0] = self.read_zero
        for row, req, k in need:
            if req.error:
                raise ThinkerError(f"thinker request {req.rid} failed: {req.error}")
            if len(req.ids) > k:
                nxt = req.ids[k]
            elif (req.finish or {}).get("type") == "stop":
                nxt = self.im_end_id  # the stop token was matched but not returned
            else:
                raise ThinkerError(f"thinker request {req.rid} ended ({req.finish}) after {len(req.ids)} tokens; "
                                   f"position {positions[row]} needs token {k + 1}")
            meta[row] = (req.slot, k, nxt)
        self._meta.copy_(torch.from_numpy(meta))

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, key_len: int):
        """Pure gather from static buffers (graph-capturable); `prepare_decode` staged the indices.
        tokens/positions are what the engine feeds; the reply was generated from exactly those."""
        m = self._meta[: tokens.shape[0]]
        return self.hidden[m[:, 0], m[:, 1]], m[:, 2].clone()

    def move_row(self, src: int, dst: int) -> None:
        with self._cond:
            if self._rows[dst] is not None and self._rows[dst] is not self._rows[src]:
                self._release_locked(dst)
            self._rows[dst], self._rows[src] = self._rows[src], None

    def release_row(self, row: int) -> None:
        """The row's request left the engine (finished, cancelled, failed): abort it if SGLang is
        still generating; its slot is reused once SGLang reports it done."""
        with self._cond:
            self._release_locked(row)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._cond:
            for row in range(self.rows):
                self._release_locked(row)
        self.backend.close()

    # -- backend callbacks (any thread) -------------------------------------------------------
    def on_output(self, req: ThinkerRequest, ids: Sequence[int], finish: dict | None = None) -> None:
        """`ids`: the request's reply tokens so far (cumulative)."""
        with self._cond:
            if len(ids) > len(req.ids):
                req.ids.extend(int(t) for t in ids[len(req.ids):])
            if finish is not None:
                req.finish = dict(finish)
                if finish.get("type") == "abort" and not req.released and req.error is None:
                    req.error = str(finish.get("message") or "aborted by SGLang")
            self._cond.notify_all()

    def on_error(self, req: ThinkerRequest, message: str) -> None:
        with self._cond:
            if req.error is None:
                req.error = message
            self._cond.notify_all()

    def on_done(self, req: ThinkerRequest) -> None:
        with self._cond:
            req.done = True
            if req.released:
                self._free.append(req.slot)
            self._cond.notify_all()

    # -- internals ----------------------------------------------------------------------------
    def _submit(self, row: int, ids: torch.Tensor, audio: torch.Tensor | None, budget: int | None = None) -> ThinkerRequest:
        ids_list = [int(t) for t in ids.reshape(-1).tolist()]
        plen = len(ids_list)
        if plen < 1 or plen >= self.max_len:
            raise ValueError(f"thinker prompt of {plen} tokens does not fit max_len {self.max_len}")
        positions = [j for j, t in enumerate(ids_list) if t == self.cfg.audio_token_id]
        got = 0 if audio is None else int(audio.shape[0])
        if len(positions) != got:
            raise ValueError(f"prompt has {len(positions)} audio placeholder tokens but {got} audio embeddings")
        embeds = None
        if positions:  # the dtype the thinker computes in, as TorchThinker rounds them
            embeds = audio.detach().to(device="cpu", dtype=self.hidden.dtype).contiguous()
        with self._cond:
            self._release_locked(row)
            self._wait_locked(lambda: bool(self._free), "a free thinker slot")
            slot = self._free.pop()
            req = ThinkerRequest(rid=make_rid(self.tag, slot, plen - 1), slot=slot, base=plen - 1, input_ids=ids_list,
                                 audio_positions=positions, audio_embeds=embeds,
                                 max_new_tokens=max(1, min(self.max_len - plen, budget or self.max_len)),
                                 stop_token_id=self.im_end_id)
            self._rows[row] = req
        self.counters["submitted"] += 1
        self.backend.submit(req)
        return req

    def _release_locked(self, row: int) -> None:
        req = self._rows[row]
        self._rows[row] = None
        if req is None or req.released:
            return
        req.released = True
        if req.done:
            self._free.append(req.slot)
        else:
            self.counters["aborted"] += 1
            try:
                self.backend.abort(req)
            except Exception:  # a dead backend: the slot stays taken, the error shows elsewhere
                log.exception("aborting thinker request %s failed", req.rid)

    def _wait(self, ready, what: str) -> None:
        with self._cond:
            self._wait_locked(ready, what)

    def _wait_locked(self, ready, what: str) -> None:
        if ready():
            return
        t0 = time.perf_counter()
        deadline = t0 + self.timeout_s
        while not ready():
            left = deadline - time.perf_counter()
            if left <= 0:
                raise ThinkerError(f"timed out after {self.timeout_s:.0f} s waiting for {what} from the thinker backend")
            self._cond.wait(min(left, 1.0))
        self.counters["waits"] += 1
        self.counters["wait_s"] += time.perf_counter() - t0


# -- the SGLang backend ------------------------------------------------------------------------------
def _python_for_spawn() -> None:
    """SGLang starts its scheduler with multiprocessing 'spawn', which runs sys.executable. Inside
    tritonserver's Python stub that is the stub, not an interpreter: point spawn at python3."""
    import multiprocessing

    exe = os.path.basename(sys.executable or "")
    if not exe.startswith("python"):
        py = shutil.which("python3") or shutil.which("python")
        if py:
            multiprocessing.set_executable(py)


class SGLangEngineBackend:
    """Runs requests on an in-process `sglang.Engine` (its scheduler is a subprocess)."""

    def __init__(self, checkpoint: str | os.PathLike, cfg: ThinkerConfig, *, max_len: int, rows: int, device: torch.device,
                 eos_token_id: int, engine_kwargs: dict | None = None, work_dir: str | os.PathLike | None = None):
        self.checkpoint, self.cfg = Path(checkpoint), cfg
        self.max_len, self.rows, self.device = max_len, rows, device
        self.eos_token_id = eos_token_id
        self.engine_kwargs = dict(engine_kwargs or {})
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="chroma-sglang-"))
        self.engine = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.start_s: float | None = None

    def engine_args(self, model_dir: Path) -> dict[str, Any]:
        kw = dict(DEFAULT_ENGINE_KWARGS)
        kw.update(model_path=str(model_dir), context_length=self.max_len + 1,
                  max_running_requests=self.rows + max(4, self.rows // 4), cuda_graph_max_bs_decode=max(self.rows, 1),
                  base_gpu_id=self.device.index or 0)
        kw.update(self.engine_kwargs)
        return kw

    def start(self, thinker: SGLangThinker) -> None:
        self.thinker = thinker
        model_dir = prepare_model_dir(self.checkpoint, self.cfg, self.work_dir / "model", eos_token_id=self.eos_token_id,
                                      context_length=self.max_len + 1)
        share = self.work_dir / "share.pkl"
        torch.cuda.synchronize(self.device)  # the buffer's zeros are in place before SGLang maps it
        share_tensors(share, {"tag": thinker.tag, "hidden": thinker.hidden})
        os.environ[ENV_SHARE] = str(share)
        os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = MODEL_PACKAGE
        root = str(Path(__file__).resolve().parents[2])  # the scheduler must import chroma_triton
        if root not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        _python_for_spawn()
        import sglang

        t0 = time.perf_counter()
        self.engine = sglang.Engine(**self.engine_args(model_dir))
        self.start_s = time.perf_counter() - t0
        log.info("SGLang thinker engine %s started in %.1f s", sglang.__version__, self.start_s)
        self.loop = self.engine.loop
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="sglang-thinker-loop", daemon=True)
        self._thread.start()
        ready.wait(30)

    def submit(self, req: ThinkerRequest) -> None:
        from sglang.srt.managers.io_struct import GenerateReqInput

        overrides = None
        if req.audio_positions:
            from sglang.srt.managers.embed_types import PositionalEmbeds

            overrides = PositionalEmbeds(embeds=req.audio_embeds, positions=list(req.audio_positions))
        obj = GenerateReqInput(
            input_ids=list(req.input_ids), rid=req.rid, stream=True, positional_embed_overrides=overrides,
            sampling_params={"temperature": 0.0, "max_new_tokens": req.max_new_tokens,
                             "stop_token_ids": [req.stop_token_id]},
        )
        asyncio.run_coroutine_threadsafe(self._consume(req, obj), self.loop)

    async def _consume(self, req: ThinkerRequest, obj) -> None:
        th = self.thinker
        try:
            async for out in self.engine.tokenizer_manager.generate_request(obj, None):
                finish = out.get("meta_info", {}).get("finish_reason")
                th.on_output(req, out.get("output_ids") or [], finish if isinstance(finish, dict) else None)
        except BaseException as exc:  # noqa: BLE001 - every failure reaches the engine
            th.on_error(req, f"{type(exc).__name__}: {exc}")
        finally:
            th.on_done(req)

    def abort(self, req: ThinkerRequest) -> None:
        if self.loop is not None and self.engine is not None:
            self.loop.call_soon_threadsafe(self.engine.tokenizer_manager.abort_request, req.rid)

    def close(self) -> None:
        if self.engine is not None:
            try:
                self.engine.shutdown()  # note: SGLang ends every child process of this process
            finally:
                self.engine = None
        if self.loop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
