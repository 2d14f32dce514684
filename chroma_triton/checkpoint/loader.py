"""Read a Chroma checkpoint folder: config, sharded safetensors, tokenizer and processor files.

Loading is all-or-nothing: every expected tensor is checked (present, readable, right shape)
before a module is used, and any failure is one `CheckpointError` naming the file and the key.
`thinker.visual.*` (the unused vision tower) is never read. Keys that no component consumes are
reported as unexpected.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from ..config import ChromaConfig, read_json
from ..errors import CheckpointError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SKIPPED_PREFIXES = ("thinker.visual.",)
# The audio embedding is tied between backbone and decoder; the decoder's copy may be stored.
TIED_ALIASES = ("decoder.audio_embedding.embed_audio_tokens.weight",)


def resolve_model_path(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id fetched with huggingface_hub (network needed)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    text = str(path_or_id)
    if p.exists():
        raise CheckpointError(f"{text}: not a folder (a Chroma checkpoint is a folder with config.json)")
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise CheckpointError(f"{text}: no such checkpoint folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text))
    except Exception as exc:  # offline, unknown repo, auth...
        raise CheckpointError(f"{text}: not a local folder, and downloading it from the hub failed: {exc}") from None


@dataclass
class LoadReport:
    loaded: int = 0
    unexpected: list[str] = field(default_factory=list)
    skipped: int = 0


class Checkpoint:
    """An opened checkpoint folder. Tensors are read on demand, shard by shard (memory-mapped)."""

    def __init__(self, folder: str | os.PathLike, base_qwen_path: str | os.PathLike | None = None):
        self.folder = resolve_model_path(folder)
        self.base_qwen = resolve_model_path(base_qwen_path) if base_qwen_path else None
        raw = read_json(self.folder / "config.json")
        base_thinker = None
        if self.base_qwen is not None and not raw.get("thinker_config"):
            base_raw = read_json(self.base_qwen / "config.json")
            base_thinker = base_raw.get("thinker_config", base_raw)
        self.config = ChromaConfig.from_dict(raw, base_thinker_config=base_thinker)
        self.weight_map = self._read_weight_map()
        self._consumed: set[str] = set()

    # -- files --------------------------------------------------------------------------------
    def _read_weight_map(self) -> dict[str, str]:
        index = self.folder / INDEX_FILE
        if index.exists():
            data = read_json(index)
            wm = data.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{index}: no weight_map")
            missing = sorted({f for f in wm.values() if not (self.folder / f).is_file()})
            if missing:
                raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
            return dict(wm)
        single = self.folder / SINGLE_FILE
        if single.is_file():
            with self._open(SINGLE_FILE) as fh:
                return {k: SINGLE_FILE for k in fh.keys()}
        raise CheckpointError(f"{self.folder}: neither {INDEX_FILE} nor {SINGLE_FILE} found")

    def _open(self, shard: str):
        path = self.folder / shard
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable safetensors shard ({exc})") from None

    def asset_folder(self, *names: str) -> Path:
        """The folder holding any of `names`: the checkpoint itself, else --base-qwen-path."""
        for folder in (self.folder, self.base_qwen):
            if folder is not None and any((folder / n).exists() for n in names):
                return folder
        where = str(self.folder) + (f" or {self.base_qwen}" if self.base_qwen else "")
        raise CheckpointError(f"none of {', '.join(names)} found in {where}; pass --base-qwen-path to a Qwen2.5-Omni folder")

    # -- tensors ------------------------------------------------------------------------------
    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.weight_map if k.startswith(prefix)]

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the given keys (grouped by shard); a missing key or a broken shard is an error."""
        by_shard: dict[str, list[str]] = defaultdict(list)
        for k in keys:
            if k not in self.weight_map:
                raise CheckpointError(f"{self.folder}: weight {k!r} is missing from the checkpoint")
            by_shard[self.weight_map[k]].append(k)
        out: dict[str, torch.Tensor] = {}
        for shard, names in by_shard.items():
            with self._open(shard) as fh:
                present = set(fh.keys())
                for k in names:
                    if k not in present:
                        raise CheckpointError(f"{self.folder / shard}: index lists {k!r} but the shard lacks it")
                    try:
                        out[k] = fh.get_tensor(k)
                    except Exception as exc:
                        raise CheckpointError(f"{self.folder / shard}: cannot read {k!r} ({exc})") from None
        self._consumed.update(out)
        return out

    def load_module(self, module: torch.nn.Module, prefix: str, *, aliases: dict[str, str] | None = None) -> int:
        """Load `prefix`+name for every parameter/persistent buffer of `module` (strict, shape-checked).

        `aliases` maps a module key to the checkpoint key to take it from (e.g. tied lm_head).
        A module built on the meta device gets the checkpoint tensors assigned (no copy).
        """
        aliases = aliases or {}
        expected = module.state_dict(keep_vars=True)
        src = {name: aliases.get(name, prefix + name) for name in expected}
        tensors = self.read(src.values())
        state = {}
        for name, ref in expected.items():
            t = tensors[src[name]]
            if tuple(t.shape) != tuple(ref.shape):
                shard = self.folder / self.weight_map[src[name]]
                raise CheckpointError(
                    f"{shard}: weight {src[name]!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} "
                    "from config.json"
                )
            state[name] = t
        is_meta = any(p.is_meta for p in module.parameters())
        module.load_state_dict(state, strict=True, assign=is_meta)
        return len(state)

    def unexpected_keys(self) -> list[str]:
        """Keys nobody consumed (visual tower and tied aliases excepted)."""
        return sorted(
            k for k in self.weight_map
            if k not in self._consumed and not k.startswith(SKIPPED_PREFIXES) and k not in TIED_ALIASES
        )

    def skipped_keys(self) -> list[str]:
        return [k for k in self.weight_map if k.startswith(SKIPPED_PREFIXES)]
