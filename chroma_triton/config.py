"""Typed view of a Chroma checkpoint's `config.json`.

Only the fields the engine needs are lifted into dataclasses; the raw sub-dicts stay available
(`ChromaConfig.raw`) for the transformers modules (Qwen2.5-Omni audio tower, Mimi) that take
their own config objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # "default" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @staticmethod
    def from_hf(cfg: dict[str, Any], default_theta: float) -> "RopeConfig":
        """Read transformers 4.x (`rope_theta` + `rope_scaling`) or 5.x (`rope_parameters`)."""
        params = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = float(params.get("rope_theta", cfg.get("rope_theta", default_theta)))
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        if kind == "mrope":
            # Qwen2.5-Omni's multimodal rope: with audio/text only, the three position streams are
            # equal, which makes it the ordinary 1-D rope (see TorchThinker's docstring).
            kind = "default"
        if kind not in ("default", "llama3"):
            raise CheckpointError(f"unsupported rope type {kind!r} (supported: default, llama3, mrope)")
        return RopeConfig(
            theta=theta,
            kind=kind,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class TrunkConfig:
    """A Llama/Qwen2-style decoder stack (no embedding, no head)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    qkv_bias: bool = False

    @staticmethod
    def from_hf(cfg: dict[str, Any], *, default_theta: float, qkv_bias: bool | None = None) -> "TrunkConfig":
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            return TrunkConfig(
                hidden_size=hidden,
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate_size=int(cfg["intermediate_size"]),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope=RopeConfig.from_hf(cfg, default_theta),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                qkv_bias=bool(cfg.get("attention_bias", False)) if qkv_bias is None else qkv_bias,
            )
        except KeyError as exc:
            raise CheckpointError(f"config.json: sub-config lacks required key {exc.args[0]!r}") from None


@dataclass(frozen=True)
class ThinkerConfig:
    text: TrunkConfig
    vocab_size: int
    tie_word_embeddings: bool
    audio_token_id: int
    audio_config: dict[str, Any]


@dataclass(frozen=True)
class BackboneConfig:
    trunk: TrunkConfig
    audio_vocab_size: int  # codes per codebook incl. specials (2051)


@dataclass(frozen=True)
class DecoderConfig:
    trunk: TrunkConfig
    audio_vocab_size: int
    audio_embedding_dim: int


@dataclass(frozen=True)
class ChromaConfig:
    thinker: ThinkerConfig
    backbone: BackboneConfig
    decoder: DecoderConfig
    codec_config: dict[str, Any]
    num_codebooks: int
    codebook_pad_id: int
    codebook_eos_id: int
    codebook_size: int  # real codes per codebook (Mimi's codebook_size, 2048)
    sample_rate: int  # codec output rate (24 kHz)
    frame_size: int  # samples per frame (1920)
    text_start_token_id: int | None
    text_end_token_id: int | None
    im_end_token_id: int | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def frame_seconds(self) -> float:
        return self.frame_size / self.sample_rate

    @staticmethod
    def from_dict(raw: dict[str, Any], *, base_thinker_config: dict[str, Any] | None = None) -> "ChromaConfig":
        if raw.get("model_type") != "chroma":
            raise CheckpointError(f"config.json: model_type is {raw.get('model_type')!r}, expected 'chroma'")
        for key in ("backbone_config", "decoder_config", "codec_config"):
            if not isinstance(raw.get(key), dict):
                raise CheckpointError(f"config.json: missing sub-config {key!r}")
        thinker_raw = raw.get("thinker_config") or base_thinker_config
        if not isinstance(thinker_raw, dict) or "text_config" not in thinker_raw:
            raise CheckpointError(
                "config.json has no usable thinker_config (with text_config); pass --base-qwen-path "
                "pointing at a Qwen2.5-Omni folder to take it from there"
            )
        text_raw = thinker_raw["text_config"]
        thinker = ThinkerConfig(
            text=TrunkConfig.from_hf(text_raw, default_theta=1_000_000.0, qkv_bias=True),
            vocab_size=int(text_raw["vocab_size"]),
            tie_word_embeddings=bool(text_raw.get("tie_word_embeddings", thinker_raw.get("tie_word_embeddings", False))),
            audio_token_id=int(thinker_raw.get("audio_token_index", thinker_raw.get("audio_token_id", 151646))),
            audio_config=dict(thinker_raw.get("audio_config") or {}),
        )
        bb_raw, dec_raw, codec = raw["backbone_config"], raw["decoder_config"], raw["codec_config"]
        backbone = BackboneConfig(
            trunk=TrunkConfig.from_hf(bb_raw, default_theta=500_000.0),
            audio_vocab_size=int(bb_raw.get("vocab_size", 2051)),
        )
        decoder = DecoderConfig(
            trunk=TrunkConfig.from_hf(dec_raw, default_theta=500_000.0),
            audio_vocab_size=int(dec_raw.get("vocab_size", 2051)),
            audio_embedding_dim=int(dec_raw.get("audio_embedding_dim", backbone.trunk.hidden_size)),
        )
        num_codebooks = int(raw.get("audio_num_codebooks", 8))
        sample_rate = int(codec.get("sampling_rate", 24000))
        frame_rate = float(codec.get("frame_rate", 12.5))
        cfg = ChromaConfig(
            thinker=thinker,
            backbone=backbone,
            decoder=decoder,
            codec_config=dict(codec),
            num_codebooks=num_codebooks,
            codebook_pad_id=int(raw.get("codebook_pad_token_id", 2050)),
            codebook_eos_id=int(raw.get("codebook_eos_token_id", 0)),
            codebook_size=int(codec.get("codebook_size", 2048)),
            sample_rate=sample_rate,
            frame_size=int(raw.get("audio_frame_freq") or round(sample_rate / frame_rate)),
            text_start_token_id=raw.get("text_start_token_id"),
            text_end_token_id=raw.get("text_end_token_id"),
            im_end_token_id=raw.get("im_end_token_id"),
            raw=raw,
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        bb, dec = self.backbone, self.decoder
        if dec.audio_embedding_dim != bb.trunk.hidden_size:
            raise CheckpointError(
                f"config.json: decoder audio_embedding_dim {dec.audio_embedding_dim} != backbone hidden_size "
                f"{bb.trunk.hidden_size} (the audio embedding is shared)"
            )
        if bb.trunk.hidden_size != self.thinker.text.hidden_size:
            raise CheckpointError(
                f"config.json: backbone hidden_size {bb.trunk.hidden_size} != thinker hidden_size "
                f"{self.thinker.text.hidden_size} (thinker states feed the backbone)"
            )
        if dec.trunk.max_position_embeddings < self.num_codebooks:
            raise CheckpointError("config.json: decoder max_position_embeddings is smaller than audio_num_codebooks")
        if not 0 < self.codebook_size < bb.audio_vocab_size:
            raise CheckpointError("config.json: codec codebook_size must be below the audio vocabulary size")


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
