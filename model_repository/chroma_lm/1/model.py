"""Triton adapter of chroma_lm (decoupled); the logic is chroma_triton.serving.triton_lm."""

import itertools
import logging
import threading
import time
import uuid

import triton_python_backend_utils as pb_utils

from chroma_triton.errors import CapacityError
from chroma_triton.serving import protocol as P
from chroma_triton.serving.cancel_board import CancelBoard, CancelWatch, live_key, request_key
from chroma_triton.serving.gc_pauses import freeze_if_asked
from chroma_triton.serving.model_args import (ModelArgs, configure_logging, input_array, input_torch, load_model_parts,
                                              thinker_backend)
from chroma_triton.serving.relay_hub import RelayHub, RelayJob
from chroma_triton.serving.triton_lm import LMInput, LMService, RelayWakeups, engine_options, throttled

log = logging.getLogger("chroma_triton.chroma_lm")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
METRICS_PERIOD_S = 0.25
METRICS_MIN_GAP_S = 0.05



class TritonPythonModel:
    def initialize(self, args):
        configure_logging()
        a = ModelArgs.from_triton(args)
        if not pb_utils.using_decoupled_model_transaction_policy(a.config):
            raise pb_utils.TritonModelException("chroma_lm must be decoupled (model_transaction_policy { decoupled: true })")
        backend = thinker_backend(a.str("thinker_backend", "auto"))  # fails clearly for unknown values
        self.wakeups = RelayWakeups.named(a.str("relay_wakeups", "lean"))  # likewise
        relays = a.str("relays", "shared")
        if relays not in ("per_request", "shared"):
            raise pb_utils.TritonModelException(f"chroma_lm: relays must be per_request or shared, got {relays!r}")
        if relays == "shared" and self.wakeups.text_wakes:  # text never wakes the shared relay thread
            raise pb_utils.TritonModelException("chroma_lm: relay_wakeups every_event needs relays per_request")
        path, parts = load_model_parts(a, {"thinker", "frame_model", "tokenizer"})
        self.args = a
        options = engine_options(a)
        options.thinker_backend = backend
        options.thinker_options = {"free_torch_thinker": True} if backend == "sglang" else {}
        self.service = LMService(parts, options)
        # relays "shared": relay_threads threads, each relaying its share of the requests
        n = a.int("relay_threads", 1) if relays == "shared" else 0
        if relays == "shared" and n < 1:
            raise pb_utils.TritonModelException(f"chroma_lm: relay_threads must be >= 1, got {n}")
        trace = self.service.engine.trace  # with trace_path: the hubs' slow passes go in it too
        self.hubs = [RelayHub(self.wakeups.poll_s, name=f"chroma-lm-relay-{i}", note=trace.note if trace else None)
                     for i in range(n)]
        hold = a.str("hold_when_full", "auto").lower()
        self.hold_when_full = a.instances > 1 if hold == "auto" else a.bool("hold_when_full", False)
        self._next_hub = itertools.count()
        self.board = CancelBoard()
        self.board.sweep()
        # cancels streams named on the board (serving/cancel_board.py), looking every cancel_watch_ms
        self.watch = CancelWatch(self.board, period_s=a.float("cancel_watch_ms", 10.0) / 1000.0)
        self._init_metrics(a)
        frozen = freeze_if_asked(a)  # once loaded (engine started, its graphs captured): none of that is garbage
        self.service.watch_gc()
        print(f"[{a.instance_name}] ready on {a.device}: {path}, max_batch {self.service.engine.opts.max_batch}, "
              f"{'gc off for ' + str(frozen) + ' objects of the load' if frozen is not None else 'gc_freeze off'}",
              flush=True)

    # -- metrics ------------------------------------------------------------------------------------
    def _init_metrics(self, a):
        # Triton names the instances of one group alike on every GPU (chroma_lm_0_0 on GPU 0 and on
        # GPU 1), so the device tells dp instances apart: without it their gauges overwrote each other
        labels = {"model": a.name, "instance": a.instance_name, "device": a.device}

        self._families = []  # a MetricFamily must outlive its Metric objects

        def family(name, description, kind):
            fam = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self._families.append(fam)
            return fam.Metric(labels=labels)

        G, C = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self.gauges = {
            "active": family("chroma_lm_active_requests", "Requests generating now (engine rows in use)", G),
            "free_rows": family("chroma_lm_free_slots", "Free engine rows (more requests that can start now)", G),
            "queued": family("chroma_lm_queued_requests", "Requests waiting for an engine row", G),
            "thinker_prefix_bytes": family("chroma_lm_thinker_prefix_bytes",
                                           "Bytes of earlier prompts' thinker keys and values held by the "
                                           "thinker prefix cache", G),
            "thinker_prefix_bound_bytes": family("chroma_lm_thinker_prefix_bound_bytes",
                                                 "The thinker prefix cache's bound (thinker_prefix_cache_mib, "
                                                 "or what auto chose)", G),
            "thinker_prefix_horizon_s": family("chroma_lm_thinker_prefix_horizon_seconds",
                                               "How long a stored prompt may go unused before it is taken for "
                                               "ended (twice the p90 of how long conversations took to come back)", G),
        }
        self.counters = {
            "finished": family("chroma_lm_finished_total", "Requests that ended with stop or length", C),
            "cancelled": family("chroma_lm_cancelled_total", "Requests cancelled (client cancel or disconnect)", C),
            "failed": family("chroma_lm_failed_total", "Requests that failed inside the engine", C),
            "frames": family("chroma_lm_audio_frames_total", "Audio frames generated (80 ms each)", C),
            "voice_prefix_hits": family("chroma_lm_voice_prefix_hits_total",
                                        "Admissions that found their voice's backbone prefix cached", C),
            "voice_prefix_misses": family("chroma_lm_voice_prefix_misses_total",
                                          "Voice backbone prefixes computed (new or evicted voices)", C),
            "thinker_prefix_returns_held": family("chroma_lm_thinker_prefix_returns_held_total",
                                                  "Turns whose conversation's previous prompt the thinker prefix "
                                                  "cache still held (taken whole)", C),
            "thinker_prefix_returns_dropped": family("chroma_lm_thinker_prefix_returns_dropped_total",
                                                     "Turns whose conversation's previous prompt the thinker prefix "
                                                     "cache had dropped to make room (many: it is too small for the "
                                                     "conversations)", C),
            "gpu_step_s": family("chroma_lm_gpu_step_seconds_total",
                                 "GPU time spanned by the engine's steps (CUDA events around each step)", C),
            "gpu_idle_s": family("chroma_lm_gpu_idle_seconds_total",
                                 "GPU time between two consecutive engine steps with nothing of ours queued "
                                 "(the device waited for the engine's host work)", C),
            "host_step_s": family("chroma_lm_host_step_seconds_total",
                                  "Wall time of the engine thread in its steps", C),
            "host_cpu_s": family("chroma_lm_host_cpu_seconds_total",
                                 "CPU time of the engine thread in its steps (the gap to the wall time: "
                                 "waiting for the GIL or a core)", C),
            "host_wait_s": family("chroma_lm_host_wait_seconds_total",
                                  "Wall time the engine thread waited for a step's codes from the GPU", C),
            "prefills": family("chroma_lm_prefills_total", "Batched prefill calls (admissions)", C),
            "prefill_s": family("chroma_lm_prefill_seconds_total",
                                "Wall time of the batched prefills (every running stream waits for them)", C),
            "prefill_graph_prompts": family("chroma_lm_prefill_graph_prompts_total",
                                            "Prompts prefilled through the admission graphs (prefill_graphs)", C),
            "prefill_eager_prompts": family("chroma_lm_prefill_eager_prompts_total",
                                            "Prompts prefilled eagerly: no admission graphs, or longer than "
                                            "their longest bucket (prefill_graph_max_len, thinker_max_len)", C),
            "prefill_prefix_prompts": family("chroma_lm_prefill_prefix_prompts_total",
                                             "Prompts that started as a stored one (thinker_prefix_cache_mib): "
                                             "only their later positions were prefilled", C),
            "prefill_prefix_graph_prompts": family("chroma_lm_prefill_prefix_graph_prompts_total",
                                                   "Of the prompts after a stored prefix, those whose later "
                                                   "positions were prefilled through a CUDA graph", C),
            "prefix_imports": family("chroma_lm_prefix_imports_total",
                                     "Stored prompts copied from another instance's thinker prefix cache "
                                     "(shared_thinker_prefixes) instead of prefilled", C),
            "prefix_import_tokens": family("chroma_lm_prefix_import_tokens_total",
                                           "Prompt positions of those copies", C),
            "prefix_imports_lost": family("chroma_lm_prefix_imports_lost_total",
                                          "Copies thrown away: the other instance dropped the prompt during the copy", C),
            "prefix_import_s": family("chroma_lm_prefix_import_seconds_total",
                                      "Wall time of those copies, waited for (every running stream waits too)", C),
            "prefill_prefix_tokens": family("chroma_lm_prefill_prefix_tokens_total",
                                            "Prompt positions taken from the thinker prefix cache instead of "
                                            "prefilled", C),
            "prefill_estimate_s": family("chroma_lm_prefill_estimate_seconds_total",
                                         "The admission pacer's estimates of those prefills (once it has one)", C),
            "prefill_overrun_s": family("chroma_lm_prefill_overrun_seconds_total",
                                        "How far prefills ran over the pacer's estimate, summed (stalls the running "
                                        "streams were not kept ready for)", C),
            "queue_timeouts": family("chroma_lm_queue_timeouts_total",
                                     "Requests refused as server busy after waiting max_queue_wait_s for a row", C),
            "forced_admissions": family("chroma_lm_forced_admissions_total",
                                        "Requests admitted beyond what running streams could wait for "
                                        "(they had waited max_admission_wait_s)", C),
            "late_chunks": family("chroma_lm_late_chunks_total",
                                  "Audio chunks the engine put out after the listener's audio would have run "
                                  "out (playback from the first chunk's send; delivery delays come on top)", C),
            "late_chunk_s": family("chroma_lm_late_chunk_seconds_total", "How late those chunks were, summed", C),
            "gc_full": family("chroma_lm_gc_full_collections_total",
                              "Full (generation 2) garbage collections of the instance's process (every thread "
                              "waits for one, the engine's too)", C),
            "gc_full_s": family("chroma_lm_gc_full_seconds_total", "Wall time of those full collections", C),
            "gc_s": family("chroma_lm_gc_seconds_total", "Wall time of all its garbage collections", C),
            "relay_busy_s": family("chroma_lm_relay_busy_seconds_total",
                                   "Wall time the shared relay threads spent relaying (near the thread count x "
                                   "the elapsed time: the relay is the bottleneck)", C),
        }
        self._seen = {k: 0 for k in self.counters}
        self._metrics_lock = threading.Lock()
        self._stop = threading.Event()
        self._kick = threading.Event()  # metrics_soon(): update now rather than at the next period
        self._metrics_thread = threading.Thread(target=self._metrics_loop, name="chroma-lm-metrics", daemon=True)
        self._metrics_thread.start()

    def _update_metrics(self):
        with self._metrics_lock:
            stats = self.service.stats()
            stats["relay_busy_s"] = sum(hub.busy_s for hub in self.hubs)
            for key, gauge in self.gauges.items():
                gauge.set(stats.get(key, 0))
            for key, counter in self.counters.items():
                value = stats.get(key, 0)
                if value > self._seen[key]:
                    counter.increment(value - self._seen[key])
                    self._seen[key] = value

    def metrics_soon(self):
        """Counters current shortly after a request ends (on the metrics thread, not the caller's)."""
        self._kick.set()

    def _metrics_loop(self):
        while not self._stop.is_set():
            self._kick.wait(METRICS_PERIOD_S)
            self._kick.clear()
            if self._stop.is_set():
                return
            try:
                self._update_metrics()
            except Exception:  # noqa: BLE001 - metrics must never take the model down
                log.exception("metrics update failed")
            self._stop.wait(METRICS_MIN_GAP_S)  # request ends coalesce: each update is ~20 IPC calls

    # -- requests -----------------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                sampling = {name: P.as_scalar(input_array(request, name), name) for name in P.SAMPLING_INPUTS}
                inp = LMInput(
                    messages=P.as_text(input_array(request, P.MESSAGES), P.MESSAGES),
                    audio_embeds=input_torch(request, P.AUDIO_EMBEDS),  # float32 or bf16 (the config's)
                    audio_token_counts=input_array(request, P.AUDIO_TOKEN_COUNTS),
                    prompt_codes=input_array(request, P.PROMPT_CODES),
                    voice_text=P.as_text(input_array(request, P.VOICE_TEXT), P.VOICE_TEXT, ""),
                    sampling=sampling,
                )
            except Exception as exc:  # noqa: BLE001
                self._send_error(sender, exc)
                continue
            try:
                served = _Served(self, inp, sender, request.request_id() or "")  # the ensemble's id
            except Exception as exc:  # noqa: BLE001 - e.g. the cancel board could not be written
                self._send_error(sender, exc)
                continue
            # submitted to the engine here, in either mode (so that _hold sees its row taken), then
            # relayed by a hub's thread ("shared") or by a thread of its own ("per_request")
            served.start(self.hubs[next(self._next_hub) % len(self.hubs)] if self.hubs else None)
        if self.hold_when_full:
            self._hold()
        return None

    def _hold(self):
        """Return only once this instance has a row for another request. Triton hands each request
        to an instance whose execute has returned, so an instance that is full takes no more while
        another (dp > 1: another GPU) has rows free; its requests wait in Triton's queue instead of
        in this engine's, where they waited for a stream of this GPU to end. Every request of this
        call has been submitted to the engine before this check, whichever the relays."""
        engine = self.service.engine
        while not engine.wait_for_room(1.0):
            if self._stop.is_set():
                return

    @staticmethod
    def _send_error(sender, exc):
        message = P.error_message(exc)
        if isinstance(exc, CapacityError):  # overload: expected, one line each, no traceback
            log.warning("request refused: %s", message)
        elif message.startswith(P.INTERNAL_PREFIX):
            log.error("request failed: %s", message, exc_info=exc)
        try:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
        except Exception:  # noqa: BLE001 - e.g. the request was cancelled and already closed
            log.debug("could not send the error response", exc_info=True)

    def finalize(self):
        if hasattr(self, "_stop"):
            self._stop.set()
            self._kick.set()
        if hasattr(self, "watch"):
            self.watch.close()
        if hasattr(self, "service"):
            self.service.close()
        for hub in getattr(self, "hubs", []):
            hub.close()


class _Served:
    """One request in this instance: where a cancel can come from (the board, Triton), its
    responses, and its end (an error response if it failed, the board and watch cleared)."""

    def __init__(self, model: TritonPythonModel, inp: LMInput, sender, rid: str):
        self.model, self.inp, self.sender, self.rid = model, inp, sender, rid
        self.key = uuid.uuid4().hex  # the codec path's stream key
        self.k = model.service.num_codebooks
        self.flag = threading.Event()
        self.note = {"source": None, "posted": None, "seen": None, "freed": None}
        self.streams = []
        self.ask_triton = throttled(sender.is_cancelled, model.wakeups.sender_cancel_poll_s)
        if rid:
            model.board.post(live_key(rid))
        self.token = model.watch.register([request_key(rid) if rid else "", self.key], time.time(), self.on_cancel)

    def on_cancel(self, source, posted):  # the cancel watch's thread
        self.note.update(source=source, posted=posted, seen=time.time())
        self.mark_gone()  # first: from here on, no chunk of this stream is decoded
        self.flag.set()
        if self.streams:
            self.streams[0].cancel()  # the engine drops the row at its next step

    def mark_gone(self):
        """codec_decoder skips this stream's chunks still in its queue (nobody will hear them)."""
        try:
            self.model.board.mark_gone(self.key)
        except OSError:  # noqa: BLE001 - only saves decoding; the cancel itself goes on
            log.warning("could not mark stream %s gone on the cancel board", self.key, exc_info=True)

    def on_submit(self, stream):
        self.streams.append(stream)
        if self.flag.is_set():
            stream.cancel()

    def send(self, response):
        if response.final and self.note["freed"] is None:
            self.note["freed"] = time.time()
        tensors = [pb_utils.Tensor(name, value) for name, value in response.tensors(self.k, self.key).items()]
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if response.final else 0)

    def cancelled(self, ask_triton=None) -> bool:
        """Cancelled by the board, or by Triton (asked throttled by the relay, at once by `end`)."""
        if self.flag.is_set():
            return True
        if (ask_triton or self.ask_triton)():
            if self.note["source"] is None:
                self.note.update(source="triton", seen=time.time())
                self.mark_gone()
            return True
        return False

    def start(self, hub):
        """Submit now; then relay on ``hub``'s thread (relays "shared"), or with ``hub`` None on a
        thread of this request's own (relays "per_request"); either calls ``end``."""
        try:
            stream, relay = self.model.service.open(self.inp, self.on_submit)
        except Exception as exc:  # noqa: BLE001 - e.g. an invalid request: its error response
            self.end(None, exc)
            return
        finally:  # the inputs are views of Triton's memory: the request copied what it needs
            self.inp = None
        if hub is None:
            threading.Thread(target=self._relay, args=(stream, relay), name="chroma-lm-request", daemon=True).start()
            return
        try:
            hub.add(RelayJob(stream, relay, self.send, self.cancelled, self.end))
        except Exception as exc:  # noqa: BLE001
            stream.cancel()
            self.end(None, exc)

    def _relay(self, stream, relay):
        finished, error = None, None
        w = self.model.wakeups
        try:
            finished = self.model.service.relay(stream, relay, self.send, self.cancelled, poll_s=w.poll_s,
                                                text_wakes=w.text_wakes)
        except Exception as exc:  # noqa: BLE001
            error = exc
        self.end(finished, error)

    def end(self, finished, error):
        model = self.model
        try:
            if error is not None:
                if self.cancelled(self.sender.is_cancelled):  # the stream is gone; nobody listens for an error
                    log.debug("cancelled request ended with %r", error)
                else:
                    model._send_error(self.sender, error)
        finally:
            model.watch.unregister(self.token)
            for marker in ([live_key(self.rid), request_key(self.rid)] if self.rid else []) + [self.key]:
                model.board.clear(marker)
            note = self.note
            if note["source"] is not None:
                # One line per cancelled request (scripts/reliability/soak.py reads them): how the
                # cancel came, when it was posted and seen, and when the engine gave up the row.
                # reason: "cancelled", or how the reply ended when it ended just before the cancel.
                log.info("cancelled request id=%s source=%s posted=%s seen=%.3f freed=%.3f frames=%s reason=%s",
                         self.rid or "-", note["source"], "-" if note["posted"] is None else f"{note['posted']:.3f}",
                         note["seen"] or 0.0, note["freed"] or time.time(),
                         finished.audio_frames if finished is not None else "-",
                         finished.reason if finished is not None else "-")
            model.metrics_soon()
