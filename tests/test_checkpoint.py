"""Checkpoint generator and loader: real layout, round trip, and clear errors for broken files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chroma_triton.checkpoint.factory import make_checkpoint
from chroma_triton.checkpoint.loader import Checkpoint
from chroma_triton.errors import CheckpointError
from chroma_triton.model.loading import ALL_PARTS, load_parts


def _index(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_layout_has_every_real_prefix(tiny_checkpoint):
    keys = _index(tiny_checkpoint)
    for prefix in ("thinker.audio_tower.", "thinker.visual.", "thinker.model.layers.0.self_attn.q_proj.bias",
                   "thinker.model.embed_tokens.weight", "thinker.lm_head.weight", "backbone.model.layers.0.mlp.gate_proj",
                   "backbone.model.norm.weight", "backbone.codebook0_head.weight",
                   "backbone.audio_embedding.embed_audio_tokens.weight", "decoder.projection.weight",
                   "decoder.model.layers.0.", "decoder.codebook_head.weight",
                   "decoder.audio_embedding.embed_audio_tokens.weight", "codec_model.quantizer.",
                   "codec_model.decoder_transformer.", "codec_model.encoder."):
        assert any(k.startswith(prefix) for k in keys), prefix
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "chroma"
    for key in ("thinker_config", "backbone_config", "decoder_config", "codec_config", "audio_num_codebooks",
                "codebook_pad_token_id", "codebook_eos_token_id"):
        assert key in cfg
    shards = set(_index(tiny_checkpoint).values())
    assert len(shards) > 1, "tiny preset should be sharded to exercise the index"
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json",
                 "generation_config.json"):
        assert (tiny_checkpoint / name).is_file(), name


def test_shape_relations(tiny_checkpoint):
    ck = Checkpoint(tiny_checkpoint)
    cfg = ck.config
    t = ck.read(["decoder.codebook_head.weight", "backbone.audio_embedding.embed_audio_tokens.weight",
                 "backbone.codebook0_head.weight", "decoder.projection.weight"])
    k, vocab = cfg.num_codebooks, cfg.backbone.audio_vocab_size
    assert t["decoder.codebook_head.weight"].shape == (k - 1, cfg.decoder.trunk.hidden_size, vocab)
    assert t["backbone.audio_embedding.embed_audio_tokens.weight"].shape == (k * vocab, cfg.backbone.trunk.hidden_size)
    assert t["backbone.codebook0_head.weight"].shape == (vocab, cfg.backbone.trunk.hidden_size)
    assert t["decoder.projection.weight"].shape == (cfg.decoder.trunk.hidden_size, cfg.backbone.trunk.hidden_size)
    assert cfg.codebook_pad_id == vocab - 1 and cfg.codebook_eos_id == 0


def test_generator_is_deterministic(tmp_path, tiny_checkpoint):
    again = make_checkpoint(tmp_path / "again", "tiny", seed=0)
    other = make_checkpoint(tmp_path / "other", "tiny", seed=1)

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}

    assert digest(again) == digest(tiny_checkpoint)
    assert digest(other) != digest(tiny_checkpoint)


def test_round_trip_loads_every_weight(tiny_checkpoint):
    parts = load_parts(tiny_checkpoint, parts=ALL_PARTS)
    assert parts.unexpected_keys == []
    ck = Checkpoint(tiny_checkpoint)
    state = {}
    for name, module, prefix in (("thinker", parts.thinker_lm, "thinker."),
                                 ("tower", parts.audio_tower.module, "thinker.audio_tower."),
                                 ("frames", parts.frame_model, ""), ("codec", parts.codec.mimi, "codec_model.")):
        for k, v in module.state_dict().items():
            state[prefix + k] = v
    stored = set(_index(tiny_checkpoint))
    visual = {k for k in stored if k.startswith("thinker.visual.")}
    tied = {"decoder.audio_embedding.embed_audio_tokens.weight"}
    assert visual, "the generator writes the vision tower so the loader's skip is exercised"
    assert stored - visual - tied == set(state), "every stored weight (but visual/tied) maps onto a module"
    # values equal what is stored (spot-check one tensor of each part, in the stored dtype)
    for key in ("thinker.model.layers.1.mlp.down_proj.weight", "thinker.audio_tower.conv1.weight",
                "backbone.model.layers.0.self_attn.o_proj.weight", "decoder.codebook_head.weight",
                "codec_model.quantizer.semantic_residual_vector_quantizer.layers.0.codebook.embed_sum"):
        want = ck.read([key])[key]
        assert torch.equal(state[key].to(want.dtype).cpu(), want), key


def test_visual_weights_are_never_read(tiny_checkpoint, monkeypatch):
    read = []
    original = Checkpoint.read

    def spy(self, keys):
        keys = list(keys)
        read.extend(keys)
        return original(self, keys)

    monkeypatch.setattr(Checkpoint, "read", spy)
    load_parts(tiny_checkpoint)
    assert read and not any(k.startswith("thinker.visual.") for k in read)


def test_truncated_shard_is_a_clear_error(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    shard = folder / _index(folder)["backbone.codebook0_head.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_parts(folder, parts={"frame_model"})
    assert shard.name in str(err.value)


def test_wrong_shape_names_file_and_key(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    key = "backbone.codebook0_head.weight"
    shard = folder / _index(folder)[key]
    with safe_open(str(shard), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_parts(folder, parts={"frame_model"})
    msg = str(err.value)
    assert key in msg and shard.name in msg and "shape" in msg


def test_missing_weight_and_missing_shard(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["decoder.projection.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="decoder.projection.weight"):
        load_parts(folder, parts={"frame_model"})
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        Checkpoint(folder)


def test_unexpected_keys_are_reported(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    extra = folder / "extra.safetensors"
    save_file({"backbone.mystery.weight": torch.zeros(2)}, str(extra))
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["backbone.mystery.weight"] = "extra.safetensors"
    index_path.write_text(json.dumps(index))
    assert load_parts(folder).unexpected_keys == ["backbone.mystery.weight"]


def test_bad_config_and_folder(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        Checkpoint(tmp_path / "nope")
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type"):
        Checkpoint(folder)


def test_base_qwen_path_supplies_thinker_config_and_tokenizer(tiny_checkpoint, tmp_path):
    chroma = _copy(tiny_checkpoint, tmp_path)
    base = tmp_path / "qwen"
    base.mkdir()
    cfg = json.loads((chroma / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni", "thinker_config": cfg.pop("thinker_config")}))
    (chroma / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "preprocessor_config.json",
                 "special_tokens_map.json", "chat_template.json", "chat_template.jinja"):
        shutil.move(str(chroma / name), base / name)
    with pytest.raises(CheckpointError, match="base-qwen-path"):
        Checkpoint(chroma)
    parts = load_parts(chroma, base_qwen_path=base)
    assert parts.tokenizer is not None and parts.audio_tower is not None
    assert parts.special.im_end == 151645
