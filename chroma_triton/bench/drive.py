"""Driving a level's streams: on this process's event loop, or split over client processes.

One Python event loop that parses hundreds of SSE or gRPC streams falls behind (its lag reached
110–160 ms at 256 streams on an H100 machine), and every chunk it reads late looks like a server
that delivered late. ``client_procs > 1`` gives each process its own loop and a slice of the
streams; timestamps are ``time.perf_counter()`` (the system's monotonic clock, shared by the
processes of one machine), so the parent summarises all records as if one loop had taken them.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import httpx

from .clients import GrpcPool, Turn, Workload, grpc_stream, infer_request, sse_stream
from .stats import StreamRecord


@dataclass(frozen=True)
class DriveSettings:
    seed: int  # stream i of a level uses seed + i (round r: seed + i + r * streams)
    ramp_s: float  # stream i starts ramp_s * i / streams after the level's start
    request_timeout: float
    rounds: int = 1  # requests each stream sends one after another (closed loop): > 1 keeps the level
    #                  loaded past its start-up burst, with arrivals spread by the replies' own ends
    run: int = 0  # this level run's id (Workload.conversations: each run's conversations are its own)


class LoopLag:
    """How late the event loop wakes up (a busy client would inflate every latency it measures)."""

    def __init__(self, period: float = 0.01):
        self.period, self.lags, self._task = period, [], None

    async def _run(self):
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.period)
            self.lags.append((time.perf_counter() - t - self.period) * 1000)

    def __enter__(self):
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc):
        self._task.cancel()


def lag_summary(lags: list[float]) -> dict:
    lags = sorted(lags) or [0.0]
    return {"client_loop_lag_ms_p99": lags[int(0.99 * (len(lags) - 1))], "client_loop_lag_ms_max": lags[-1]}


async def drive_streams(path: str, indices: list[int], streams: int, settings: DriveSettings, targets: dict,
                        workload: Workload) -> tuple[list[StreamRecord], list[float]]:
    """Run streams ``indices`` (of ``streams`` in the level) on this loop, each ``settings.rounds``
    requests one after another; their records (stream by stream, rounds in order) and the loop's
    lag samples."""
    rounds = max(1, settings.rounds)
    records = [StreamRecord(sent=0.0, stream=i, round=r) for i in indices for r in range(rounds)]
    seeds = [settings.seed + i + r * streams for i in indices for r in range(rounds)]
    if path == "grpc":
        pool = GrpcPool(targets["grpc"])
        turns = [Turn(settings.run, rec.stream, rec.round) for rec in records]
        requests = [infer_request(workload.ensemble_arrays(seed, turn), f"bench-{streams}-{rec.stream}-{rec.round}",
                                  sequence=workload.sequence(turn))
                    for rec, seed, turn in zip(records, seeds, turns)]
    else:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        client = httpx.AsyncClient(timeout=httpx.Timeout(settings.request_timeout, connect=30), limits=limits,
                                   trust_env=False)
        bodies = [workload.chat_body(seed, Turn(settings.run, rec.stream, rec.round)) for rec, seed in zip(records, seeds)]

    async def one(k: int) -> None:
        if settings.ramp_s > 0:
            await asyncio.sleep(settings.ramp_s * indices[k] / streams)
        for j in range(k * rounds, (k + 1) * rounds):
            records[j].sent = time.perf_counter()
            if path == "grpc":
                await grpc_stream(pool.stub(k), requests[j], records[j], settings.request_timeout)
            else:
                await sse_stream(client, targets["frontend"], bodies[j], records[j])

    try:
        with LoopLag() as lag:
            await asyncio.gather(*(one(k) for k in range(len(indices))))
    finally:
        if path == "grpc":
            await pool.close()
        else:
            await client.aclose()
    return records, lag.lags


def drive_in_process(path: str, indices: list[int], streams: int, settings: DriveSettings, targets: dict,
                     workload: Workload) -> tuple[list[StreamRecord], list[float]]:
    """A client process's share of a level (the entry point of ``drive_level``'s workers)."""
    return asyncio.run(drive_streams(path, indices, streams, settings, targets, workload))


def warm_worker() -> int:
    """Nothing: submitted once per worker so that spawning and imports happen before a level."""
    return 0


async def drive_level(path: str, streams: int, settings: DriveSettings, targets: dict, workload: Workload,
                      workers: Executor | None = None, procs: int = 1) -> tuple[list[StreamRecord], dict]:
    """All streams of a level, at once: on this loop, or (``workers``, ``procs`` > 1) dealt round
    robin over ``procs`` client processes. Returns the records in stream order (each stream's
    rounds together) and the worst loop lag of any process."""
    if workers is None or procs <= 1 or streams < 2:  # (bench_serving records the same rule per level)
        records, lags = await drive_streams(path, list(range(streams)), streams, settings, targets, workload)
        return records, lag_summary(lags)
    slices = [list(range(p, streams, procs)) for p in range(min(procs, streams))]
    loop = asyncio.get_running_loop()
    results = await asyncio.gather(*(
        loop.run_in_executor(workers, drive_in_process, path, part, streams, settings, targets, workload)
        for part in slices))
    records = sorted((rec for recs, _ in results for rec in recs), key=lambda r: (r.stream, r.round))
    worst = max((lag_summary(lags) for _, lags in results), key=lambda s: s["client_loop_lag_ms_max"])
    return records, worst
