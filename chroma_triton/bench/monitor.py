"""What the server side looked like during a level: GPU memory from ``nvidia-smi`` and Triton's own
Prometheus metrics (``chroma_lm_*`` and ``nv_inference_*``), sampled by a background thread.

GPU memory is per GPU as nvidia-smi counts it (every process on the card: tritonserver's
model processes and anything else), before the level and the peak during it; None where
nvidia-smi is missing. Counters are reported as their increase over the level, summed per model;
gauges as their peak and lowest value (summed over ``chroma_lm`` instances). The first sample is
taken ``settle_before_s`` after the run before (whose last counters may still be on their way),
the last ``settle_s`` after the level, so that counters updated just after a reply ended are in.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections import defaultdict

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_MODEL = re.compile(r'model="([^"]*)"')
_HOW = re.compile(r'(?:how|stage)="([^"]*)"')  # the label that splits a family (by how, by stage)
_PREFIXES = ("chroma_lm_", "nv_inference_", "chroma_audio_encoder_", "chroma_codec_")
GAUGES = ("chroma_lm_active_requests", "chroma_lm_free_slots", "chroma_lm_queued_requests", "nv_inference_pending_request_count",
          "chroma_lm_thinker_prefix_bytes", "chroma_lm_thinker_prefix_bound_bytes", "chroma_lm_thinker_prefix_horizon_seconds")


def gpu_memory_mib() -> dict[str, float] | None:
    """{gpu index: MiB used} from nvidia-smi, or None without it (or when it fails)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    mem = {}
    for line in out.stdout.splitlines():
        index, _, used = line.partition(",")
        if used.strip():
            mem[index.strip()] = float(used)
    return mem


def scrape(url: str | None, timeout: float = 3.0) -> dict[str, float] | None:
    """Prometheus text -> {"metric{model}": value} for our prefixes (summed over other labels), or
    {"metric{model,how}": value} for the families split by `how` (codec chunks, encoder clips) or by
    `stage` (the encoder's seconds)."""
    if not url:
        return None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except OSError:
        return None
    values: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or not m.group(1).startswith(_PREFIXES):
            continue
        model, how = _MODEL.search(m.group(2) or ""), _HOW.search(m.group(2) or "")
        labels = ",".join(x.group(1) for x in (model, how) if x)
        key = f"{m.group(1)}{{{labels}}}" if labels else m.group(1)
        try:
            values[key] += float(m.group(3))
        except ValueError:
            continue
    return dict(values)


def model_executions(grpc_url: str | None) -> dict[str, dict[str, float]] | None:
    """Per model, from Triton's statistics extension: executions, requests and the time spent in
    executions. Unlike the Prometheus duration counters, which add a batch's duration once per
    request in it, ``batch_stats`` counts each execution once, so ``busy_s`` is the time the model
    instances actually spent executing (summed over instances)."""
    if not grpc_url:
        return None
    try:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(grpc_url)
        stats = client.get_inference_statistics(as_json=True)
        client.close()
    except Exception:  # noqa: BLE001 - monitoring must not fail a benchmark
        return None
    out = {}
    for m in stats.get("model_stats", []):
        busy = 0
        for b in m.get("batch_stats", []):
            busy += sum(int(b.get(k, {}).get("ns", 0)) for k in ("compute_input", "compute_infer", "compute_output"))
        out[m["name"]] = {"executions": float(m.get("execution_count", 0)),
                          "requests": float(m.get("inference_count", 0)), "busy_s": busy / 1e9}
    return out


def execution_deltas(before: dict | None, after: dict | None, wall_s: float) -> dict | None:
    """Per model over a level: executions, requests per execution, busy seconds, busy share of the
    wall time (above 1: several instances; near the instance count: that model is the bottleneck)."""
    if not before or not after:
        return None
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        d = {k: a[k] - b.get(k, 0.0) for k in a}
        if not d["executions"]:
            continue
        out[name] = {"executions": int(d["executions"]), "requests_per_execution": d["requests"] / d["executions"],
                     "busy_s": d["busy_s"], "ms_per_execution": d["busy_s"] * 1000 / d["executions"],
                     "busy_share": d["busy_s"] / wall_s if wall_s > 0 else None}
    return out


class Monitor(threading.Thread):
    """Samples GPU memory and the metrics every ``interval`` seconds until :meth:`finish`."""

    def __init__(self, metrics_url: str | None, interval: float = 0.5, settle_s: float = 1.0,
                 grpc_url: str | None = None, settle_before_s: float = 0.5):
        super().__init__(name="bench-monitor", daemon=True)
        self.metrics_url, self.interval, self.settle_s = metrics_url, interval, settle_s
        self.grpc_url = grpc_url
        self.stop_event = threading.Event()
        if metrics_url or grpc_url:  # counters of the run just before (a warm-up) land first: the
            time.sleep(settle_before_s)  # server updates them on a thread of its own, every 0.25 s
        self.gpu_before = gpu_memory_mib()
        self.metrics_before = scrape(metrics_url)
        self.executions_before = model_executions(grpc_url)
        self.started = time.perf_counter()
        self.gpu_peak = dict(self.gpu_before or {})
        self.gauge_peak: dict[str, float] = {}
        self.gauge_min: dict[str, float] = {}

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self._sample()

    def _sample(self) -> dict[str, float] | None:
        mem = gpu_memory_mib()
        for gpu, used in (mem or {}).items():
            self.gpu_peak[gpu] = max(self.gpu_peak.get(gpu, 0.0), used)
        metrics = scrape(self.metrics_url)
        for key, value in (metrics or {}).items():
            if key.split("{")[0] in GAUGES:
                self.gauge_peak[key] = max(self.gauge_peak.get(key, value), value)
                self.gauge_min[key] = min(self.gauge_min.get(key, value), value)
        return metrics

    def finish(self, wall_s: float | None = None) -> dict:
        """Stop sampling; `wall_s` is the level's own duration (default: since this monitor began)."""
        self.stop_event.set()
        wall = wall_s if wall_s is not None else time.perf_counter() - self.started
        if self.is_alive():
            self.join(10)
        if self.metrics_url or self.grpc_url:
            time.sleep(self.settle_s)
        after = self._sample()
        executions = execution_deltas(self.executions_before, model_executions(self.grpc_url), wall)
        return {
            "gpu_mem_before_mib": self.gpu_before,
            "gpu_mem_peak_mib": self.gpu_peak if self.gpu_before is not None else None,
            "triton_gauges_peak": self.gauge_peak if after is not None else None,
            "triton_gauges_min": self.gauge_min if after is not None else None,
            "triton_counters_delta": counter_deltas(self.metrics_before, after),
            "model_executions": executions,
        }


def counter_deltas(before: dict | None, after: dict | None) -> dict | None:
    if before is None or after is None:
        return None
    out = {}
    for key, value in after.items():
        if key.split("{")[0] in GAUGES:
            continue
        delta = value - before.get(key, 0.0)
        if delta:
            out[key] = delta
    return out


def per_request_us(deltas: dict | None, model: str, what: str = "compute_infer") -> float | None:
    """Mean Triton-side duration (µs) per request of ``model`` over the level, from the deltas."""
    if not deltas:
        return None
    total = deltas.get(f"nv_inference_{what}_duration_us{{{model}}}")
    count = deltas.get(f"nv_inference_request_success{{{model}}}")
    return total / count if total and count else None
