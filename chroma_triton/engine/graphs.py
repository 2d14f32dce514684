"""Step functions run eagerly, or through CUDA graphs captured once per shape.

A captured graph replays a whole step (dozens of layers, sampling included) with one launch,
which is what makes small-batch decoding fast on a GPU. Shapes must be static, so the engine
pads its batch and its key length up to buckets; each (function, bucket) pair gets one graph,
captured the first time it is needed. Step functions must be idempotent for their inputs
(they are: KV writes land at the positions given, with the values given), because capture runs
them a few extra times.
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch


def bucket(n: int, sizes: list[int]) -> int:
    """Smallest size >= n."""
    for s in sizes:
        if s >= n:
            return s
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


def batch_buckets(max_batch: int) -> list[int]:
    sizes, s = [], 1
    while s < max_batch:
        sizes.append(s)
        s *= 2
    return sizes + [max_batch]


def length_buckets(max_len: int, step: int = 256) -> list[int]:
    return [*range(step, max_len, step), max_len]


class StepRunner:
    """``shared_pool``: every graph allocates from one memory pool, so the memory held is the largest
    graph's, not the sum. Only for callers that consume a replay's outputs before the next replay
    of any graph of the runner (a later replay may reuse that memory)."""

    def __init__(self, use_graphs: bool, shared_pool: bool = False, device: torch.device | str | None = None,
                 capture_stream: "torch.cuda.Stream | None" = None):
        """``device``: the GPU the step functions run on. Captures and replays happen with it
        current, whichever device the calling thread has current: a graph captured on another
        device's stream records nothing of this one's kernels (they run eagerly once, and replays
        then do nothing), and a replay launches on the current device's stream."""
        self.use_graphs = use_graphs
        self.device = torch.device(device) if device is not None else None
        # ``capture_stream``: the stream this runner's graphs are captured on (default: one made
        # for the runner on its device at the first capture). Never torch's default: that is one
        # stream per process, made on whichever GPU was current at the process's first capture,
        # so a graph for another GPU captured on it fails (seen on a 2xH100 machine: "operation not
        # permitted when stream is capturing"). And cuBLAS keeps one workspace per stream, which a
        # captured graph keeps using: graphs that may replay at the same time on two streams must
        # be captured on different streams (the engine's thinker_ahead; run 19 of
        # docs/benchmarks.md).
        self.capture_stream = capture_stream
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], object]] = {}
        self._pool = torch.cuda.graph_pool_handle() if use_graphs and shared_pool else None

    def __len__(self) -> int:
        return len(self._graphs)

    def count(self, kind: Hashable) -> int:
        """Graphs captured so far whose key is a tuple starting with `kind` (callers that share a
        runner tell their graphs apart so)."""
        return sum(1 for key in list(self._graphs) if isinstance(key, tuple) and key[0] == kind)

    def __call__(self, key: Hashable, fn: Callable, *args: torch.Tensor):
        if not self.use_graphs:
            return fn(*args)
        with torch.cuda.device(self.device or args[0].device):
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(fn, args)
                self._graphs[key] = entry
            graph, static_in, static_out = entry
            for dst, src in zip(static_in, args):
                dst.copy_(src, non_blocking=True)
            graph.replay()
        return static_out

    def _capture(self, fn, args):
        static_in = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up kernels and workspaces outside the capture
                fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        # Without `shared_pool` each graph keeps a private memory pool: with a shared pool, one graph's
        # replay reuses memory that a graph captured later holds its outputs in (the engine's
        # graphs replay in varying orders and their outputs are read later).
        # thread_local: CUDA calls of other threads (request threads, the caller of a pipeline)
        # during the capture are not captured and do not invalidate it. With the default "global"
        # mode they fail it ("operation not permitted when stream is capturing": seen on an H100
        # when a chroma_lm request thread copied audio embeddings to the GPU mid-capture).
        graph = torch.cuda.CUDAGraph()
        if self.capture_stream is None:  # on the current device: this runner's (see __call__)
            self.capture_stream = torch.cuda.Stream()
        with torch.cuda.graph(graph, pool=self._pool, stream=self.capture_stream, capture_error_mode="thread_local"):
            static_out = fn(*static_in)
        return graph, static_in, static_out
