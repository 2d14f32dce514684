"""Write a random-weight Chroma checkpoint in exactly the real layout.

Same config keys, weight names and shape relations as FlashLabs/Chroma-4B, sharded safetensors
with an index, Qwen2.5-Omni tokenizer/processor files and a generation config. Presets:
`tiny` (seconds on a CPU; what the tests use; deliberately odd sizes such as a 64-code
codebook so nothing can silently assume 2048) and `full` (the real dimensions, for GPU
benchmarks; generated where it is used, never committed). Same seed, same bytes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ChromaConfig
from ..model.frame_model import FrameModel
from ..model.thinker import ThinkerLM
from .tokenizer_files import CHROMA_TEXT_MARKER_IDS, THINKER_SPECIAL_TOKENS, write_tokenizer_files

QWEN_VOCAB = 151936


def _llama3_rope(theta, factor, low, high, original):
    return {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original}


def _thinker_config(text: dict, audio: dict, vision: dict) -> dict:
    ids = THINKER_SPECIAL_TOKENS
    # mrope splits the rotary half-dim into (time, height, width) sections: [16, 24, 24] for the
    # real head_dim 128; keep the same 2:3:3 split so transformers' thinker accepts other sizes.
    half = text["hidden_size"] // text["num_attention_heads"] // 2
    mrope_section = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]
    return {
        "model_type": "qwen2_5_omni_thinker",
        "text_config": {"model_type": "qwen2_5_omni_text", "vocab_size": QWEN_VOCAB, "rms_norm_eps": 1e-6,
                        "hidden_act": "silu", "max_position_embeddings": 32768, "tie_word_embeddings": False,
                        "rope_theta": 1000000.0,
                        "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": mrope_section},
                        **text},
        "audio_config": {"model_type": "qwen2_5_omni_audio_encoder", "num_mel_bins": 128, "max_source_positions": 1500,
                         "n_window": 100, **audio},
        "vision_config": {"model_type": "qwen2_5_omni_vision_encoder", "in_channels": 3, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, **vision},
        "audio_token_index": ids["<|AUDIO|>"], "image_token_index": ids["<|IMAGE|>"],
        "video_token_index": ids["<|VIDEO|>"], "audio_start_token_id": ids["<|audio_bos|>"],
        "audio_end_token_id": ids["<|audio_eos|>"], "vision_start_token_id": ids["<|vision_bos|>"],
        "vision_end_token_id": ids["<|vision_eos|>"], "bos_token_id": ids["<|im_start|>"],
        "pad_token_id": ids["<|endoftext|>"], "position_id_per_seconds": 25, "seconds_per_chunk": 2,
    }


PRESETS: dict[str, dict] = {
    "tiny": {
        "thinker": _thinker_config(
            {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
            {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 64, "output_dim": 64},
            {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 64,
             "fullatt_block_indexes": [0]},
        ),
        "backbone": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048,
                     "rope_parameters": _llama3_rope(500000.0, 32.0, 0.125, 0.5, 1024)},
        "decoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 33,
                    "rope_parameters": _llama3_rope(500000.0, 32.0, 0.001953125, 0.0078125, 16)},
        "codec": {"hidden_size": 32, "num_filters": 8, "codebook_size": 64, "codebook_dim": 16,
                  "vector_quantization_hidden_dimension": 16, "upsample_groups": 32, "num_hidden_layers": 2,
                  "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8,
                  "num_quantizers": 8},
        "shard_bytes": 16 * 2**20,
    },
    "full": {
        "thinker": _thinker_config(
            {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
             "num_key_value_heads": 2},
            {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
             "output_dim": 2048},
            {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
             "fullatt_block_indexes": [7, 15, 23, 31]},
        ),
        "backbone": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 2048,
                     "rope_parameters": _llama3_rope(500000.0, 32.0, 0.125, 0.5, 1024)},
        "decoder": {"hidden_size": 1024, "intermediate_size": 8192, "num_hidden_layers": 4, "num_attention_heads": 8,
                    "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 33,
                    "rope_parameters": _llama3_rope(500000.0, 32.0, 0.001953125, 0.0078125, 16)},
        "codec": {"num_quantizers": 32},  # kyutai/mimi: the model reads the first 8
        "shard_bytes": 4 * 2**30,
    },
}


def build_config(preset: str) -> dict:
    p = copy.deepcopy(PRESETS[preset])
    codebook_size = p["codec"].get("codebook_size", 2048)
    audio_vocab = codebook_size + 3  # codes + specials; pad is the last id
    common = {"hidden_act": "silu", "rms_norm_eps": 1e-5, "attention_bias": False, "mlp_bias": False,
              "audio_num_codebooks": 8, "vocab_size": audio_vocab}
    return {
        "model_type": "chroma",
        "architectures": ["ChromaForConditionalGeneration"],
        "thinker_config": p["thinker"],
        "backbone_config": {"model_type": "chroma_backbone", **common, **p["backbone"]},
        "decoder_config": {"model_type": "chroma_decoder", **common, "audio_embedding_dim": p["backbone"]["hidden_size"],
                           **p["decoder"]},
        "codec_config": {"model_type": "mimi", "sampling_rate": 24000, "frame_rate": 12.5, **p["codec"]},
        "audio_num_codebooks": 8,
        "codebook_pad_token_id": audio_vocab - 1,
        "codebook_eos_token_id": 0,
        "text_start_token_id": CHROMA_TEXT_MARKER_IDS["<|text_start|>"],
        "text_end_token_id": CHROMA_TEXT_MARKER_IDS["<|text_end|>"],
        "im_end_token_id": THINKER_SPECIAL_TOKENS["<|im_end|>"],
        "audio_frame_freq": 1920,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1",  # what the real checkpoint records
    }


def _key_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def _random_like(key: str, shape, seed: int, dtype) -> torch.Tensor:
    """Seeded per key, so the bytes do not depend on the order tensors are made in."""
    if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
        return torch.ones(shape, dtype=dtype)
    if key.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(_key_seed(seed, key))
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def _meta_state(build, prefix: str, seed: int, dtype) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        module = build()
    return {prefix + k: _random_like(prefix + k, v.shape, seed, dtype) for k, v in module.state_dict().items()}


def _hf_state(build, prefix: str, seed: int, dtype) -> dict[str, torch.Tensor]:
    """transformers modules keep their own init (Mimi's codebooks need sane cluster usage)."""
    torch.manual_seed(_key_seed(seed, prefix))
    module = build()
    return {prefix + k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}


def _mimi_state(codec_config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Mimi as transformers initialises it, but with random codebooks: its init leaves every
    codebook vector at zero (embed_sum = 0), which would make the decoded audio ignore the codes."""
    from transformers import MimiConfig, MimiModel

    state = _hf_state(lambda: MimiModel(MimiConfig(**codec_config)), "codec_model.", seed, torch.float32)
    for key in [k for k in state if k.endswith("codebook.embed_sum")]:
        g = torch.Generator().manual_seed(_key_seed(seed, key))
        state[key] = torch.randn(state[key].shape, generator=g)
    return state


def make_checkpoint(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0, *, with_visual: bool = True,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the checkpoint into `out_dir` (created; existing files are overwritten)."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (
        Qwen2_5OmniAudioEncoderConfig,
        Qwen2_5OmniVisionEncoderConfig,
    )
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniAudioEncoder,
        Qwen2_5OmniVisionEncoder,
    )

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = build_config(preset)
    cfg = ChromaConfig.from_dict(raw)
    th = raw["thinker_config"]

    state: dict[str, torch.Tensor] = {}
    state.update(_meta_state(lambda: ThinkerLM(cfg.thinker), "thinker.", seed, dtype))
    state.update(_hf_state(lambda: Qwen2_5OmniAudioEncoder(Qwen2_5OmniAudioEncoderConfig(**th["audio_config"])),
                           "thinker.audio_tower.", seed, dtype))
    if with_visual:
        state.update(_hf_state(lambda: Qwen2_5OmniVisionEncoder(Qwen2_5OmniVisionEncoderConfig(**th["vision_config"])),
                               "thinker.visual.", seed, dtype))
    frame_state = _meta_state(lambda: FrameModel(cfg), "", seed, dtype)
    state.update(frame_state)
    # stored tied copy, as the real checkpoint has it
    state["decoder.audio_embedding.embed_audio_tokens.weight"] = frame_state["backbone.audio_embedding.embed_audio_tokens.weight"]
    state.update(_mimi_state(raw["codec_config"], seed))

    _write_shards(out, state, PRESETS[preset]["shard_bytes"])
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 50, "temperature": 1.0}, indent=2) + "\n")
    write_tokenizer_files(out)
    return out


def _write_shards(out: Path, state: dict[str, torch.Tensor], shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        t = state[key]
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        # tied copies must be distinct storage for safetensors
        shards[-1][key] = t.clone() if any(t.data_ptr() == u.data_ptr() for u in shards[-1].values()) else t
        size += n
    total = len(shards)
    weight_map, total_size = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{total:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = name
            total_size += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
