"""Offline tests for chroma_triton.checkpoint.tokenizer_files (Qwen2.5-Omni tokenizer / processor files)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chroma_triton.checkpoint.tokenizer_files import (
    BASE_BPE_VOCAB_SIZE,
    CHAT_TEMPLATE,
    CHROMA_TEXT_MARKER_IDS,
    MODEL_MAX_LENGTH,
    PREPROCESSOR_CONFIG,
    QWEN25_OMNI_ADDED_TOKENS,
    THINKER_SPECIAL_TOKENS,
    TOKENIZER_FILENAMES,
    TOKENIZER_LEN,
    render_chat,
    write_tokenizer_files,
)

transformers = pytest.importorskip("transformers")

THINKER_EMBEDDING_ROWS = 151936  # Qwen2.5-Omni-3B/7B thinker text_config.vocab_size


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    dest = tmp_path_factory.mktemp("qwen25_omni_tokenizer")
    write_tokenizer_files(str(dest))  # str accepted as well as PathLike
    return dest


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


@pytest.fixture(scope="module")
def feature_extractor(tok_dir):
    return transformers.WhisperFeatureExtractor.from_pretrained(tok_dir, local_files_only=True)


# --------------------------------------------------------------------------------------------------- the table


def test_added_token_table_is_the_qwen25_omni_one():
    ids = [tid for tid, _, _ in QWEN25_OMNI_ADDED_TOKENS]
    assert ids == list(range(BASE_BPE_VOCAB_SIZE, TOKENIZER_LEN))
    assert TOKENIZER_LEN == 151665
    assert THINKER_SPECIAL_TOKENS == {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|AUDIO|>": 151646,
        "<|audio_bos|>": 151647,
        "<|audio_eos|>": 151648,
        "<|box_end|>": 151649,
        "<|quad_start|>": 151650,
        "<|quad_end|>": 151651,
        "<|vision_bos|>": 151652,
        "<|vision_eos|>": 151653,
        "<|vision_pad|>": 151654,
        "<|IMAGE|>": 151655,
        "<|VIDEO|>": 151656,
    }
    non_special = [content for _, content, special in QWEN25_OMNI_ADDED_TOKENS if not special]
    assert non_special == [
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    ]


# --------------------------------------------------------------------------------------------------- the files


def test_writes_exactly_the_expected_files(tok_dir):
    names = sorted(p.name for p in tok_dir.iterdir())
    assert names == sorted(TOKENIZER_FILENAMES)
    assert not (tok_dir / "generation_config.json").exists()
    assert not (tok_dir / "config.json").exists()


def test_tokenizer_json_added_tokens(tok_dir):
    data = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["model"]["type"] == "BPE"
    assert len(data["model"]["vocab"]) == BASE_BPE_VOCAB_SIZE
    got = [(t["id"], t["content"], t["special"]) for t in data["added_tokens"]]
    assert got == list(QWEN25_OMNI_ADDED_TOKENS)
    assert all(not t["normalized"] and not t["lstrip"] and not t["rstrip"] for t in data["added_tokens"])
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == BASE_BPE_VOCAB_SIZE
    assert (tok_dir / "merges.txt").read_text(encoding="utf-8").startswith("#version")


def test_tokenizer_config_and_chat_template_files(tok_dir):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert cfg["eos_token"] == "<|im_end|>"
    assert cfg["pad_token"] == "<|endoftext|>"
    assert cfg["bos_token"] is None
    assert cfg["model_max_length"] == MODEL_MAX_LENGTH == 32768
    assert cfg["chat_template"] == CHAT_TEMPLATE
    decoder = {int(k): (v["content"], v["special"]) for k, v in cfg["added_tokens_decoder"].items()}
    assert decoder == {tid: (content, special) for tid, content, special in QWEN25_OMNI_ADDED_TOKENS}
    assert (tok_dir / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    assert json.loads((tok_dir / "chat_template.json").read_text(encoding="utf-8")) == {"chat_template": CHAT_TEMPLATE}
    stm = json.loads((tok_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert stm["eos_token"]["content"] == "<|im_end|>"
    assert stm["pad_token"]["content"] == "<|endoftext|>"
    assert stm["audio_token"] == "<|AUDIO|>"
    assert set(stm["additional_special_tokens"]) == set(THINKER_SPECIAL_TOKENS) - {"<|endoftext|>"}


def test_rewrite_into_existing_folder(tmp_path):
    write_tokenizer_files(tmp_path)
    first = (tmp_path / "tokenizer_config.json").read_bytes()
    write_tokenizer_files(tmp_path / ".")  # PathLike, folder already populated
    assert (tmp_path / "tokenizer_config.json").read_bytes() == first


# --------------------------------------------------------------------------------------------------- tokenizer


def test_autotokenizer_loads(tokenizer):
    assert len(tokenizer) == TOKENIZER_LEN
    assert len(tokenizer) <= THINKER_EMBEDDING_ROWS
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert tokenizer.bos_token is None
    assert tokenizer.model_max_length == MODEL_MAX_LENGTH


def test_processor_facing_token_attributes(tokenizer):
    # Qwen2_5OmniProcessor reads these names off its tokenizer.
    assert tokenizer.audio_token == "<|AUDIO|>"
    assert tokenizer.audio_bos_token == "<|audio_bos|>"
    assert tokenizer.audio_eos_token == "<|audio_eos|>"
    assert tokenizer.image_token == "<|IMAGE|>"
    assert tokenizer.video_token == "<|VIDEO|>"
    assert tokenizer.vision_bos_token == "<|vision_bos|>"
    assert tokenizer.vision_eos_token == "<|vision_eos|>"


@pytest.mark.parametrize("content,tid", [(c, i) for i, c, _ in QWEN25_OMNI_ADDED_TOKENS])
def test_every_added_token_is_one_id(tokenizer, content, tid):
    assert tokenizer.encode(content, add_special_tokens=False) == [tid]
    assert tokenizer.convert_tokens_to_ids(content) == tid
    assert tokenizer.convert_ids_to_tokens(tid) == content
    assert tokenizer.decode([tid]) == content


def test_special_tokens_are_skippable(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nhi<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_audio_placeholder_runs_tokenize_per_placeholder(tokenizer):
    assert tokenizer.encode("<|AUDIO|>", add_special_tokens=False) == [151646]
    assert tokenizer.encode("<|AUDIO|><|AUDIO|>", add_special_tokens=False) == [151646, 151646]
    ids = tokenizer.encode("x<|audio_bos|>" + "<|AUDIO|>" * 7 + "<|audio_eos|>y", add_special_tokens=False)
    assert ids[1:-1] == [151647] + [151646] * 7 + [151648]
    assert ids.count(151646) == 7


def test_no_qwen3_or_qwen25_vl_names(tokenizer):
    vocab = tokenizer.get_vocab()
    for name in ("<think>", "</think>", "<tool_response>", "</tool_response>", "<|object_ref_start|>",
                 "<|box_start|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>"):
        assert name not in vocab, name
        assert len(tokenizer.encode(name, add_special_tokens=False)) > 1, name


def test_chroma_text_markers_are_embedding_ids_not_tokens(tokenizer):
    vocab = tokenizer.get_vocab()
    assert CHROMA_TEXT_MARKER_IDS == {"<|text_start|>": 151665, "<|text_end|>": 151666}
    for name, tid in CHROMA_TEXT_MARKER_IDS.items():
        assert name not in vocab
        assert TOKENIZER_LEN <= tid < THINKER_EMBEDDING_ROWS


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! How are you doing today?",
        "The quick brown fox jumps over the lazy dog.\n\nSecond paragraph:  two spaces, a tab\tand 12345 digits.",
        "It's a dog's life -- isn't it? (Yes.)",
    ],
)
def test_english_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert all(i < BASE_BPE_VOCAB_SIZE for i in ids)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text)  # real merges, not one token per byte


def test_common_english_words_are_single_tokens(tokenizer):
    assert len(tokenizer.encode("Hello", add_special_tokens=False)) == 1
    assert len(tokenizer.encode(" world", add_special_tokens=False)) == 1


@pytest.mark.parametrize("text", ["café ☕", "naïve résumé — 日本語のテキスト 🎉👍🏽", "Ünïcödé\u00a0spaces"])
def test_byte_level_utf8_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.convert_tokens_to_string(tokens) == text
    # Each byte-level token is a string of byte symbols; together they are exactly the UTF-8 bytes.
    assert sum(len(t) for t in tokens) == len(text.encode("utf-8"))


# --------------------------------------------------------------------------------------------------- chat template


def test_chat_template_system_user_audio_generation_prompt(tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is said here?"},
                {"type": "audio", "audio": "file:///tmp/question.wav", "sampling_rate": 16000},
            ],
        },
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is said here?<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(tokenizer, messages) == expected
    assert render_chat(tokenizer, messages, add_generation_prompt=False) == expected[: -len("<|im_start|>assistant\n")]
    ids = tokenizer.encode(expected, add_special_tokens=False)
    tail = tokenizer.encode("assistant\n", add_special_tokens=False)
    assert ids[0] == 151644 and ids.count(151646) == 1
    assert ids[-len(tail) - 1 :] == [151644, *tail]


def test_chat_template_parts_and_roles(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "audio", "audio_url": "x"}, {"type": "text", "text": "A"}]},
        {"role": "assistant", "content": "B"},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "x.png"},
                {"type": "video", "video": "x.mp4"},
                {"text": "C"},
                {"type": "text", "text": "D"},
            ],
        },
    ]
    assert render_chat(tokenizer, messages) == (
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>A<|im_end|>\n"
        "<|im_start|>assistant\nB<|im_end|>\n"
        "<|im_start|>user\n<|vision_bos|><|IMAGE|><|vision_eos|><|vision_bos|><|VIDEO|><|vision_eos|>CD<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_adds_no_system_prompt(tokenizer):
    out = render_chat(tokenizer, [{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_render_chat_matches_apply_chat_template(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    direct = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_chat(tokenizer, messages) == direct


def test_template_file_renders_the_same_with_plain_jinja(tok_dir, tokenizer):
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        (tok_dir / "chat_template.jinja").read_text(encoding="utf-8")
    )
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "T"}, {"type": "audio", "audio": "a"}]},
    ]
    assert template.render(messages=messages, add_generation_prompt=True) == render_chat(tokenizer, messages)


# --------------------------------------------------------------------------------------------------- audio features


def test_preprocessor_config_values(tok_dir):
    cfg = json.loads((tok_dir / "preprocessor_config.json").read_text(encoding="utf-8"))
    assert cfg == PREPROCESSOR_CONFIG
    assert cfg["feature_extractor_type"] == "WhisperFeatureExtractor"
    assert cfg["processor_class"] == "Qwen2_5OmniProcessor"
    assert cfg["n_samples"] == cfg["chunk_length"] * cfg["sampling_rate"]
    assert cfg["nb_max_frames"] == cfg["n_samples"] // cfg["hop_length"]


def test_feature_extractor_loads(feature_extractor):
    fe = feature_extractor
    assert fe.feature_size == 128
    assert fe.sampling_rate == 16000
    assert fe.hop_length == 160
    assert fe.n_fft == 400
    assert fe.chunk_length == 300
    assert fe.n_samples == 4_800_000
    assert fe.nb_max_frames == 30_000
    assert fe.padding_value == 0.0
    assert fe.return_attention_mask is True
    assert float(getattr(fe, "dither", 0.0)) == 0.0


def _tone(seconds: float, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(round(seconds * sr)), dtype=np.float32) / sr
    return (0.1 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


def test_features_are_100_frames_per_second(feature_extractor):
    clips = [_tone(1.0), _tone(2.5)]
    # return_attention_mask=True must be passed to the call (as Qwen2_5OmniProcessor does): only then does
    # WhisperFeatureExtractor return the mask per feature frame instead of per input sample.
    out = feature_extractor(
        clips, sampling_rate=16000, padding="longest", return_attention_mask=True, return_tensors="np"
    )
    assert out["input_features"].shape == (2, 128, 250)
    assert out["input_features"].dtype == np.float32
    assert out["attention_mask"].shape == (2, 250)
    assert out["attention_mask"].sum(axis=1).tolist() == [100, 250]
    assert np.isfinite(out["input_features"]).all()


def test_default_padding_is_300_seconds_with_mask(feature_extractor):
    # What Qwen2_5OmniProcessor does: pad to max_length, return the mask, then cut by mask length.
    out = feature_extractor(
        _tone(1.0), sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="np"
    )
    assert out["input_features"].shape == (1, 128, 30_000)
    assert out["attention_mask"].shape == (1, 30_000)
    assert int(out["attention_mask"].sum()) == 100
    assert out["attention_mask"][0, :100].all() and not out["attention_mask"][0, 100:].any()
