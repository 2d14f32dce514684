"""Build the model parts from a checkpoint: the thinker LM, audio tower, backbone + decoder,
codec, tokenizer and feature extractor. Each Triton model loads only the parts it needs."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.loader import Checkpoint
from ..config import ChromaConfig
from ..errors import CheckpointError
from .audio_tower import AudioTower
from .codec import Codec
from .frame_model import FrameModel
from .thinker import ThinkerLM, TorchThinker

log = logging.getLogger(__name__)

ALL_PARTS = frozenset({"thinker", "audio_tower", "frame_model", "codec", "tokenizer"})
DEFAULT_TOP_K = 50
THINKER_BACKENDS = ("auto", "torch", "sglang")


@dataclass(frozen=True)
class SpecialTokens:
    im_start: int
    im_end: int
    audio: int
    text_start: int
    text_end: int

    @staticmethod
    def from_tokenizer(tokenizer, cfg: ChromaConfig) -> "SpecialTokens":
        def tid(name: str, fallback: int | None) -> int:
            i = tokenizer.convert_tokens_to_ids(name)
            if isinstance(i, int) and i != tokenizer.unk_token_id and i >= 0:
                return i
            if fallback is None:
                raise CheckpointError(f"tokenizer has no {name} token and config.json gives no id for it")
            return int(fallback)

        return SpecialTokens(
            im_start=tid("<|im_start|>", None),
            im_end=tid("<|im_end|>", cfg.im_end_token_id),
            audio=tid("<|AUDIO|>", cfg.thinker.audio_token_id),
            text_start=tid("<|text_start|>", cfg.text_start_token_id),
            text_end=tid("<|text_end|>", cfg.text_end_token_id),
        )


@dataclass
class ChromaParts:
    config: ChromaConfig
    folder: Path
    device: torch.device
    dtype: torch.dtype
    top_k: int = DEFAULT_TOP_K
    tokenizer: object | None = None
    special: SpecialTokens | None = None
    thinker_lm: ThinkerLM | None = None
    audio_tower: AudioTower | None = None
    frame_model: FrameModel | None = None
    codec: Codec | None = None
    unexpected_keys: list[str] = field(default_factory=list)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_parts(
    model_path,
    *,
    base_qwen_path=None,
    parts=ALL_PARTS,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> ChromaParts:
    parts = frozenset(parts)
    unknown = parts - ALL_PARTS
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {sorted(ALL_PARTS)}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda": the current GPU, by number (graphs,
        device = torch.device("cuda", torch.cuda.current_device())  # set_device need one)
    dtype = dtype or default_dtype(device)
    ckpt = Checkpoint(model_path, base_qwen_path)
    cfg = ckpt.config
    out = ChromaParts(config=cfg, folder=ckpt.folder, device=device, dtype=dtype, top_k=_read_top_k(ckpt.folder))
    if parts & {"tokenizer", "thinker"}:
        out.tokenizer = _load_tokenizer(ckpt)
        out.special = SpecialTokens.from_tokenizer(out.tokenizer, cfg)
    if "thinker" in parts:
        out.thinker_lm = _load_thinker_lm(ckpt, device, dtype)
        out.thinker_lm.model.fuse()
    if "audio_tower" in parts:
        out.audio_tower = _load_audio_tower(ckpt, device, dtype)
    if "frame_model" in parts:
        out.frame_model = _load_meta_module(ckpt, lambda: FrameModel(cfg), "", device, dtype)
        out.frame_model.backbone.model.fuse()
        out.frame_model.decoder.model.fuse()
    if "codec" in parts:
        out.codec = _load_codec(ckpt, device)
    if parts == ALL_PARTS:
        out.unexpected_keys = ckpt.unexpected_keys()
        if out.unexpected_keys:
            log.warning("checkpoint has %d unexpected weight(s), e.g. %s", len(out.unexpected_keys), out.unexpected_keys[:5])
    return out


def _read_top_k(folder: Path) -> int:
    path = folder / "generation_config.json"
    if not path.exists():
        return DEFAULT_TOP_K
    try:
        top_k = json.loads(path.read_text()).get("top_k")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    return int(top_k) if top_k else DEFAULT_TOP_K


def _load_tokenizer(ckpt: Checkpoint):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = ckpt.asset_folder("tokenizer.json", "vocab.json", "tokenizer_config.json")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer warns that model_type "chroma" is not a tokenizer type
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({exc})") from None
    finally:
        hf_logging.set_verbosity(level)


def _load_meta_module(ckpt, build, prefix, device, dtype, aliases=None):
    with torch.device("meta"):
        module = build()
    ckpt.load_module(module, prefix, aliases=aliases)
    return module.to(device=device, dtype=dtype).eval()


def _load_thinker_lm(ckpt: Checkpoint, device, dtype) -> ThinkerLM:
    cfg = ckpt.config.thinker
    aliases = {}
    if "thinker.lm_head.weight" not in ckpt.weight_map and cfg.tie_word_embeddings:
        aliases["lm_head.weight"] = "thinker.model.embed_tokens.weight"
    return _load_meta_module(ckpt, lambda: ThinkerLM(cfg), "thinker.", device, dtype, aliases=aliases)


def _load_audio_tower(ckpt: Checkpoint, device, dtype) -> AudioTower:
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    audio_cfg = Qwen2_5OmniAudioEncoderConfig(**ckpt.config.thinker.audio_config)
    audio_cfg._attn_implementation = "sdpa"
    module = Qwen2_5OmniAudioEncoder(audio_cfg)
    ckpt.load_module(module, "thinker.audio_tower.")
    folder = ckpt.asset_folder("preprocessor_config.json")
    try:
        fe = WhisperFeatureExtractor.from_pretrained(str(folder))
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot load the feature extractor ({exc})") from None
    return AudioTower(module.to(device=device, dtype=dtype).eval(), fe)


def _load_codec(ckpt: Checkpoint, device) -> Codec:
    from transformers import MimiConfig, MimiModel

    cfg = ckpt.config
    mimi = MimiModel(MimiConfig(**cfg.codec_config))
    ckpt.load_module(mimi, "codec_model.")
    # Mimi stays in float32 (its audio is what users hear); codec_decoder's matmul_tf32 puts its
    # transformer's products on TF32 tensor cores, as cuDNN does its convolutions by default
    return Codec(mimi.to(device=device).eval(), cfg.num_codebooks, cfg.codebook_size, cfg.sample_rate, cfg.frame_size)


# -- thinker backend selection (chroma_lm's `thinker_backend` parameter) ------------------------------
def sglang_available() -> bool:
    """SGLang is installed (not imported here: importing it is slow and may fail late)."""
    return importlib.util.find_spec("sglang") is not None


def resolve_thinker_backend(backend: str | None, device) -> str:
    """'torch' or 'sglang' for `thinker_backend` auto | torch | sglang. auto: SGLang when it is
    installed and the model runs on a GPU, else PyTorch. An explicit 'sglang' that cannot work
    raises with the reason (no silent fallback)."""
    choice = (backend or "auto").strip().lower()
    if choice not in THINKER_BACKENDS:
        raise ValueError(f"thinker_backend must be one of {', '.join(THINKER_BACKENDS)}; got {backend!r}")
    device = torch.device(device)
    if choice == "auto":
        return "sglang" if device.type == "cuda" and sglang_available() else "torch"
    if choice == "sglang":
        if device.type != "cuda":
            raise ValueError(f"thinker_backend 'sglang' needs a CUDA device; this model runs on {device}")
        if not sglang_available():
            raise ImportError("thinker_backend 'sglang' needs the sglang package, which is not installed "
                              "(pip install 'chroma-triton[sglang]')")
    return choice


def make_thinker(parts: ChromaParts, backend: str | None, rows: int, max_len: int, **options):
    """The engine's thinker for `parts`: TorchThinker, or SGLangThinker (options go to
    `SGLangThinker.from_parts`: engine_kwargs, slots, timeout_s, free_torch_thinker, work_dir)."""
    if parts.thinker_lm is None:
        raise ValueError("the thinker part is not loaded")
    choice = resolve_thinker_backend(backend, parts.device)
    if choice == "sglang":
        from .sglang_thinker import SGLangThinker

        try:
            return SGLangThinker.from_parts(parts, rows, max_len, **options)
        except ImportError as exc:
            if (backend or "auto").strip().lower() != "auto":
                raise
            log.warning("thinker_backend auto: SGLang is installed but not importable (%s); using the PyTorch thinker", exc)
    return TorchThinker(parts.thinker_lm, parts.config.thinker, rows, max_len)
