"""How many concurrent streams (cache rows) fit in the device's memory.

Every row preallocates its KV caches at the engine's context lengths: the thinker's (unless SGLang
holds the thinker's cache), the backbone's and the depth decoder's. On a GPU the engine asks for
`max_batch` rows but takes only as many as fit in `kv_memory_fraction` of the memory that is free
once the weights are loaded, after keeping `activation_reserve_gib` for activations, prefill
workspaces and CUDA-graph pools, the scratch rows of the admission graphs (`prefill_graphs`,
engine/prefill_graphs.py), which are allocated with the caches, and the thinker prefix cache's
bound (`thinker_prefix_cache_mib`, engine/thinker_prefix.py; on a GPU its pool of pages is
allocated when the engine starts, at most what is free then). Requests beyond the rows wait in
the queue; they never make the server run out of memory mid-reply.

The thinker prefix cache's bound may also be left to the plan (`thinker_prefix_cache_mib` "auto"):
it then gets `AUTO_PREFIX_SHARE` of the budget that the requested rows leave unused, and nothing
when the rows do not all fit (rows before prefixes). Only a share, because the plan is made before
the CUDA graphs are captured and possibly before the other models' processes have loaded on the
same GPU: on an H200 (run 74) 59 GiB of the budget were unused at the plan but 52 GiB were free
once the stack idled. Where memory is not measured (the CPU) "auto" is
`AUTO_PREFIX_CACHE_UNMEASURED`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import ChromaConfig, TrunkConfig

log = logging.getLogger(__name__)

GIB = 1 << 30
PREFIX_CACHE_AUTO = -1  # thinker_prefix_cache_mib "auto" (EngineOptions)
AUTO_PREFIX_SHARE = 0.5  # "auto": the thinker prefix cache's share of what the requested rows leave of the budget
AUTO_PREFIX_CACHE_UNMEASURED = 4 * GIB  # "auto" where free memory is not measured (CPU)


def trunk_kv_bytes(trunk: TrunkConfig, positions: int, dtype_bytes: int) -> int:
    """K and V of one row: layers x kv_heads x positions x head_dim, twice."""
    return 2 * trunk.num_layers * trunk.num_kv_heads * positions * trunk.head_dim * dtype_bytes


def kv_bytes_per_row(cfg: ChromaConfig, thinker_max_len: int, backbone_max_len: int, dtype_bytes: int,
                     thinker_cache: bool = True) -> int:
    decoder_positions = cfg.num_codebooks  # the backbone state, then codebooks 0..K-2
    total = trunk_kv_bytes(cfg.backbone.trunk, backbone_max_len, dtype_bytes)
    total += trunk_kv_bytes(cfg.decoder.trunk, decoder_positions, dtype_bytes)
    if thinker_cache:
        total += trunk_kv_bytes(cfg.thinker.text, thinker_max_len, dtype_bytes)
    return total


def admission_scratch_bytes(cfg: ChromaConfig, thinker_positions: int, backbone_positions: int, dtype_bytes: int) -> int:
    """The admission graphs' scratch caches (engine/prefill_graphs.py, `ScratchCache`): the thinker's
    keys and values at `thinker_positions` positions (0: no prefill graphs) and the backbone's at
    `backbone_positions` (0: no tail graphs)."""
    return (trunk_kv_bytes(cfg.thinker.text, thinker_positions, dtype_bytes)
            + trunk_kv_bytes(cfg.backbone.trunk, backbone_positions, dtype_bytes))


@dataclass(frozen=True)
class CapacityPlan:
    rows: int  # rows the engine allocates
    requested: int  # max_batch asked for
    per_row_bytes: int
    free_bytes: int | None  # device memory free before the caches (None: not measured, CPU)
    budget_bytes: int | None  # what the caches may take
    scratch_bytes: int = 0  # the admission graphs' scratch rows, kept out of the budget
    prefix_cache_bytes: int = 0  # the thinker prefix cache's bound, kept out of it too
    prefix_cache_auto: bool = False  # ...chosen by the plan ("auto")

    def describe(self) -> str:
        per_row = f"{self.per_row_bytes / (1 << 20):.1f} MiB of KV per stream"
        auto = ""
        if self.prefix_cache_auto:
            auto = (" (auto: none, memory limits the rows)" if self.rows < self.requested else
                    f" (auto: {AUTO_PREFIX_SHARE:.0%} of what the rows left)" if self.free_bytes is not None else
                    " (auto, memory not measured)")
        prefixes = f", {self.prefix_cache_bytes / GIB:.2f} GiB for thinker prefixes{auto}" if self.prefix_cache_bytes or auto else ""
        if self.free_bytes is None:
            return f"{self.rows} streams ({per_row}; not sized from memory on this device{prefixes})"
        limited = " (limited by memory)" if self.rows < self.requested else ""
        scratch = f", {self.scratch_bytes / GIB:.2f} GiB for admission scratch rows" if self.scratch_bytes else ""
        return (f"{self.rows} of {self.requested} requested streams{limited}: {per_row}, "
                f"{self.free_bytes / GIB:.1f} GiB free, {self.budget_bytes / GIB:.1f} GiB for KV caches{scratch}{prefixes}")


def plan_rows(requested: int, per_row_bytes: int, free_bytes: int | None, fraction: float,
              reserve_bytes: int, scratch_bytes: int = 0, prefix_cache_bytes: int | None = 0) -> CapacityPlan:
    """Rows to allocate: `requested`, or fewer when `free_bytes` (None: do not size) cannot hold them
    beside `reserve_bytes`, `scratch_bytes` and `prefix_cache_bytes` (None: "auto", the module's
    docstring says how much)."""
    if requested < 1:
        raise ValueError(f"max_batch must be >= 1, got {requested}")
    if not 0 < fraction <= 1:
        raise ValueError(f"kv_memory_fraction must lie in (0, 1], got {fraction}")
    auto = prefix_cache_bytes is None
    if free_bytes is None:
        prefixes = AUTO_PREFIX_CACHE_UNMEASURED if auto else prefix_cache_bytes
        return CapacityPlan(requested, requested, per_row_bytes, None, None, scratch_bytes, prefixes, auto)
    budget = max(0, int(free_bytes * fraction) - reserve_bytes - scratch_bytes - (prefix_cache_bytes or 0))
    fit = budget // max(per_row_bytes, 1)
    if fit < 1:
        raise MemoryError(
            f"not enough device memory for one stream: each needs {per_row_bytes / GIB:.2f} GiB of KV cache "
            f"(thinker_max_len / backbone_max_len set its size), but only {budget / GIB:.2f} GiB of the "
            f"{free_bytes / GIB:.2f} GiB free may be used (kv_memory_fraction {fraction}, "
            f"activation reserve {reserve_bytes / GIB:.1f} GiB, admission scratch rows {scratch_bytes / GIB:.2f} GiB, "
            f"thinker prefix cache {(prefix_cache_bytes or 0) / GIB:.2f} GiB); shorten the contexts or free the GPU")
    rows = min(requested, fit)
    if auto:
        prefix_cache_bytes = int((budget - rows * per_row_bytes) * AUTO_PREFIX_SHARE) if rows == requested else 0
        budget -= prefix_cache_bytes
    return CapacityPlan(rows, requested, per_row_bytes, free_bytes, budget, scratch_bytes, prefix_cache_bytes, auto)


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (what the caching allocator holds unused counts as free); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free) + int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
