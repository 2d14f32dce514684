"""The logic of the ``audio_encoder`` Triton model (its model.py only moves tensors).

Per request: the user's clips (encoded files, any format/rate/channels) -> 16 kHz mono -> audio
tower embeddings, concatenated in ``user_audio`` order with the token count of each clip; and the
reference voice (encoded file, or the server's default voice when empty) -> 24 kHz mono -> Mimi
codes, cached by content hash. Requests that Triton's dynamic batcher hands over together are
embedded in **one** audio-tower forward (the tower takes several clips at once through
``feature_lens``, the way transformers batches it). The embeddings go out in the config's
``audio_embeds`` type: bf16 on GPUs (the tower's own dtype: nothing rounded, half the bytes of
float32 through Triton), float32 on the CPU.

A client resends the whole conversation with every turn (the chat API keeps no state), so each
turn's request carries every earlier user clip again. Clips' embeddings are cached by content
hash (``clip_cache_mib`` of host memory, in the tower's dtype): an earlier turn's clip, or one
clip sent twice in a batch, goes through the tower once.

With several instances (one per GPU at ``--dp-size`` > 1) a turn's earlier clips may reach
another instance than the one that embedded them: with ``peers`` (serving/peer_clips.py) the
instances publish the embeddings they compute, and a clip missing from this instance's cache is
copied from another's ("shared") instead of embedded again.

With ``prepare_threads`` above 1 the work around the tower of a batch of several requests is
spread over that many threads: every clip hashed, looked up, decoded and turned into log-mels at
once, each request's rows copied at once (those calls release the GIL). At 256
conversations one encoder doing them one after another was busy 77-83 % of the time and requests
waited 1.2-1.7 s for it on average (docs/benchmarks.md, runs 67-68). 1 stays the default: on a
2-core CPU 2-4 threads were within the noise, and on a 16-core H200 host 4 threads served 256
conversations no better (run 69: the clip work took three times the thread-seconds).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..audio_io import decode_audio
from ..errors import InvalidRequestError
from ..model.audio_tower import AudioTower
from ..model.loading import ChromaParts
from ..voice_cache import ContentCache, VoiceCache, bytes_key
from .peer_clips import PeerClips

log = logging.getLogger(__name__)

MAX_USER_AUDIO_SECONDS = 300.0
MAX_PROMPT_AUDIO_SECONDS = 60.0
MIN_FEATURE_FRAMES = 4


def user_audio_list(clips: list[bytes]) -> list[bytes]:
    """A request's clips; one empty element means "no user audio" (for clients that must send the tensor)."""
    return [] if clips == [b""] else clips


def features_on_device(value: str) -> bool:
    """The ``features_device`` parameter: ``auto`` (log-mels on the tower's GPU, on the CPU without
    one) -> True, ``cpu`` -> False."""
    if value not in ("auto", "cpu"):
        raise ValueError(f"features_device must be 'auto' or 'cpu', got {value!r}")
    return value == "auto"


@dataclass
class EncoderInput:
    user_audio: list[bytes]
    prompt_audio: bytes  # b"" -> default voice
    prompt_text: str  # "" with the default voice


@dataclass
class _Clip:
    key: str  # content hash of the encoded clip
    embeds: torch.Tensor | None = None  # cached: [tokens, H] on the host (the cache's own: read only)
    feats: torch.Tensor | None = None  # else its log-mel features
    shared: bool = False  # its embeddings came from another instance (peers)


@dataclass
class EncoderOutput:
    audio_embeds: np.ndarray | torch.Tensor  # [sum tokens, H]: float32 numpy, or a torch tensor of another embeds_dtype
    audio_token_counts: np.ndarray  # int32 [clips]
    prompt_codes: np.ndarray  # int32 [frames, K]
    voice_text: str


class AudioEncoderService:
    def __init__(self, parts: ChromaParts, default_voice: tuple[bytes, str] | None, voice_cache_size: int = 256,
                 clip_cache_mib: int = 1024, prepare_threads: int = 1, embeds_dtype: torch.dtype = torch.float32,
                 peers: PeerClips | None = None):
        """`clip_cache_mib`: host memory for user clips' embeddings (0: none kept). `prepare_threads`:
        threads that prepare a batch's clips, voices and outputs at once (hashing, decoding,
        resampling, log-mels and the output copies release the GIL); 1: all in the caller's thread.
        `embeds_dtype`: the dtype of each request's embeddings (the config's ``audio_embeds``
        type): float32 gives numpy arrays, another dtype (bf16) torch tensors. `peers`: the other
        instances' clip embeddings (serving/peer_clips.py), in the tower's dtype."""
        if parts.audio_tower is None or parts.codec is None:
            raise ValueError("the audio encoder needs the audio_tower and codec parts")
        if clip_cache_mib < 0:
            raise ValueError(f"clip_cache_mib must be >= 0, got {clip_cache_mib}")
        if prepare_threads < 1:
            raise ValueError(f"prepare_threads must be >= 1, got {prepare_threads}")
        self.tower: AudioTower = parts.audio_tower
        self._pool = None
        if prepare_threads > 1:  # its threads make the tower's GPU theirs, as the model's thread did
            on_gpu = self.tower.device.type == "cuda"
            self._pool = ThreadPoolExecutor(prepare_threads, thread_name_prefix="encoder-prepare",
                                            initializer=torch.cuda.set_device if on_gpu else None,
                                            initargs=(self.tower.device,) if on_gpu else ())
        self.codec = parts.codec
        self.embeds_dtype = embeds_dtype
        self.hidden = int(parts.config.thinker.text.hidden_size)
        self.voices = VoiceCache(voice_cache_size)
        self.clips = ContentCache(max_bytes=clip_cache_mib << 20)
        self.peers = peers
        # user clips: embedded (through the tower), reused (their embeddings were there: cached, or
        # the same clip earlier in the batch), shared (copied from another instance: peers)
        self._clip_counts = dict.fromkeys(("embedded", "reused", "shared"), 0)
        # seconds of encode_batch's work by stage, summed over the threads doing it: voice (reference
        # voice: hash, cache, Mimi encode), features (user clips: hash, cache lookup, decode,
        # resample, log-mel), tower (the audio tower's forward and the copy back), output (the
        # rows each request gets, in embeds_dtype)
        self._stage_seconds = dict.fromkeys(("voice", "features", "tower", "output"), 0.0)
        self._stage_lock = threading.Lock()
        self.default_voice = default_voice
        if default_voice is not None:  # encode once now: the first request should not pay for it
            self.voice_codes(default_voice[0])

    # -- reference voice ------------------------------------------------------------------------
    def voice_codes(self, data: bytes) -> np.ndarray:
        def encode() -> np.ndarray:
            wav = decode_audio(data, self.codec.sample_rate, max_seconds=MAX_PROMPT_AUDIO_SECONDS)
            codes = self.codec.encode(wav)
            if len(codes) == 0:
                raise InvalidRequestError("prompt_audio is too short to hold one 80 ms frame", "prompt_audio")
            return codes

        return self.voices.get_or_encode(bytes_key(data), encode)

    def resolve_voice(self, prompt_audio: bytes, prompt_text: str) -> tuple[np.ndarray, str]:
        if prompt_audio:
            if not prompt_text.strip():
                raise InvalidRequestError(
                    "prompt_text (the transcript of prompt_audio) must be a non-empty string", "prompt_text")
            try:
                return self.voice_codes(prompt_audio), prompt_text
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"prompt_audio: {exc}", "prompt_audio") from None
        if prompt_text.strip():
            raise InvalidRequestError(
                "prompt_text was given without prompt_audio; send both (voice cloning) or neither "
                "(the server's default voice)", "prompt_text")
        if self.default_voice is None:
            raise InvalidRequestError("this server has no default voice: send prompt_audio and prompt_text", "prompt_audio")
        data, transcript = self.default_voice
        return self.voice_codes(data), transcript

    # -- user audio ------------------------------------------------------------------------------
    def user_clip(self, index: int, clip: bytes) -> _Clip:
        """Clip `index` of a request: its key and cached embeddings, or else its log-mel features."""
        if not clip:
            raise InvalidRequestError(f"user_audio[{index}] is empty", "user_audio")
        key = bytes_key(clip)
        cached = self.clips.get(key)
        if cached is not None:
            return _Clip(key, embeds=cached)
        if self.peers is not None:
            shared = self.peers.find(key)
            if shared is not None:
                self.clips.put(key, shared)
                return _Clip(key, embeds=shared, shared=True)
        try:
            wav = decode_audio(clip, self.tower.sampling_rate, max_seconds=MAX_USER_AUDIO_SECONDS)
        except ValueError as exc:
            raise InvalidRequestError(f"user_audio[{index}]: {exc}", "user_audio") from None
        f = self.tower.features(wav)
        if f.shape[-1] < MIN_FEATURE_FRAMES:
            raise InvalidRequestError(f"user_audio[{index}] is too short: at least 40 ms of speech is needed", "user_audio")
        return _Clip(key, feats=f)

    def embed_features(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Several clips' log-mels -> their embeddings (on the host, in the tower's dtype), in one
        tower forward."""
        embeds = self.tower.embed_many(feats)
        if not embeds:
            return []
        host = torch.cat(embeds).cpu()  # one copy (and one wait) for the whole batch
        # each clip its own memory: a view would keep the whole batch's alive in the cache
        return [part.clone() for part in host.split([e.shape[0] for e in embeds])]

    def _embed_new(self, clips: list[_Clip]) -> dict[str, torch.Tensor]:
        """The embeddings of the clips that have none yet, each distinct clip once, kept in the cache."""
        todo = {c.key: c.feats for c in clips if c.embeds is None}
        embeds = dict(zip(todo, self.embed_features(list(todo.values()))))
        for key, e in embeds.items():
            self.clips.put(key, e)
            if self.peers is not None:
                self.peers.publish(key, e)
        shared = sum(c.shared for c in clips)
        self._clip_counts["embedded"] += len(embeds)
        self._clip_counts["shared"] += shared
        self._clip_counts["reused"] += len(clips) - len(embeds) - shared
        return embeds

    def close(self) -> None:
        """Stop the preparing threads (the model's finalize) and the sharing."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.peers is not None:
            self.peers.close()

    def clip_counts(self) -> dict[str, int]:
        return dict(self._clip_counts)

    def stage_seconds(self) -> dict[str, float]:
        return dict(self._stage_seconds)

    @contextmanager
    def _timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            with self._stage_lock:
                self._stage_seconds[stage] += spent

    def _timed_call(self, stage: str, fn, *args):
        """`fn(*args)`, timed under `stage`."""
        with self._timed(stage):
            return fn(*args)

    def _submit(self, pool: ThreadPoolExecutor, stage: str, fn, *args) -> Future:
        """`fn(*args)` on a thread of `pool`, timed under `stage`."""
        return pool.submit(self._timed_call, stage, fn, *args)

    # -- requests ----------------------------------------------------------------------------------
    def encode_batch(self, inputs: list[EncoderInput]) -> list[EncoderOutput | Exception]:
        """Encode several requests; a request's failure is returned in its place (others go on)."""
        results: list[EncoderOutput | Exception | None] = [None] * len(inputs)
        # a batch of several requests on the threads; a request alone stays here (handing its few
        # clips over cost more than it saved, 0.1-0.3 ms on a 2-core CPU)
        pool = self._pool if len(inputs) > 1 else None
        prepared = self._prepare_on(pool, inputs, results) if pool else self._prepare(inputs, results)
        try:
            with self._timed("tower"):
                embedded = self._embed_new([c for request_clips, _, _ in prepared.values() for c in request_clips])
        except Exception:  # one bad batch must not fail everyone: retry request by request
            log.exception("batched audio tower forward failed; retrying per request")
            embedded = None
        rows = {}
        for i, (request_clips, codes, voice_text) in prepared.items():
            try:
                if embedded is None:
                    with self._timed("tower"):
                        new = self._embed_new(request_clips)
                else:
                    new = embedded
                rows[i] = ([c.embeds if c.embeds is not None else new[c.key] for c in request_clips], codes, voice_text)
            except Exception as exc:  # noqa: BLE001
                results[i] = exc
        jobs = {i: self._submit(pool, "output", self._output, *args) for i, args in rows.items()} if pool else {}
        for i, args in rows.items():
            try:
                results[i] = jobs[i].result() if pool else self._timed_call("output", self._output, *args)
            except Exception as exc:  # noqa: BLE001
                results[i] = exc
        return results  # type: ignore[return-value]

    def _prepare(self, inputs: list[EncoderInput], results: list) -> dict[int, tuple]:
        """Each request's clips, voice codes and transcript, one request and one clip after another;
        a request stops at its voice's error or its first bad clip's (put in `results`)."""
        prepared = {}
        for i, inp in enumerate(inputs):
            try:
                with self._timed("voice"):
                    codes, voice_text = self.resolve_voice(inp.prompt_audio, inp.prompt_text)
                with self._timed("features"):
                    clips = [self.user_clip(j, clip) for j, clip in enumerate(user_audio_list(inp.user_audio))]
                prepared[i] = (clips, codes, voice_text)
            except Exception as exc:  # noqa: BLE001 - reported per request
                results[i] = exc
        return prepared

    def _prepare_on(self, pool: ThreadPoolExecutor, inputs: list[EncoderInput], results: list) -> dict[int, tuple]:
        """What `_prepare` gives, every distinct voice and every clip on the threads at once. Each
        request reads its own in order (its voice's error first, then its first bad clip's); a failed
        request's jobs not yet started are cancelled, and every job has ended on return (none runs
        into the next batch)."""
        voices: dict[tuple[bytes, str], Future] = {}  # one job per distinct voice: a new voice is encoded once
        for inp in inputs:
            key = (inp.prompt_audio, inp.prompt_text)
            if key not in voices:
                voices[key] = self._submit(pool, "voice", self.resolve_voice, *key)
        clip_jobs = [[self._submit(pool, "features", self.user_clip, j, clip)
                      for j, clip in enumerate(user_audio_list(inp.user_audio))] for inp in inputs]
        prepared = {}
        try:
            for i, inp in enumerate(inputs):
                try:
                    codes, voice_text = voices[inp.prompt_audio, inp.prompt_text].result()
                    prepared[i] = ([job.result() for job in clip_jobs[i]], codes, voice_text)
                except Exception as exc:  # noqa: BLE001 - reported per request
                    results[i] = exc
                    for job in clip_jobs[i]:
                        job.cancel()
        finally:
            wait([job for jobs in clip_jobs for job in jobs] + list(voices.values()))
        return prepared

    def _output(self, embeds: list[torch.Tensor], codes: np.ndarray, voice_text: str) -> EncoderOutput:
        # the clips' rows straight into one array of the output's dtype: the copy converts where the
        # dtypes differ (one pass, not a concatenation in the tower's dtype and a conversion after
        # it: 0.5 against 0.85 ms for 8 clips of 97 rows on one thread)
        shape = (sum(e.shape[0] for e in embeds), self.hidden)
        if self.embeds_dtype == torch.float32:
            flat = np.empty(shape, np.float32)
            out = torch.from_numpy(flat)
        else:
            flat = out = torch.empty(shape, dtype=self.embeds_dtype)
        if embeds:
            torch.cat(embeds, out=out)
        return EncoderOutput(
            audio_embeds=flat,
            audio_token_counts=np.array([e.shape[0] for e in embeds], np.int32),
            prompt_codes=np.ascontiguousarray(codes, dtype=np.int32),
            voice_text=voice_text,
        )
