from __future__ import annotations

import pytest

from chroma_triton.errors import InvalidRequestError
from chroma_triton.model.loading import load_parts
from chroma_triton.processor import DEFAULT_SYSTEM_PROMPT, PromptBuilder, normalize_messages


@pytest.fixture(scope="module")
def builder(tiny_checkpoint):
    parts = load_parts(tiny_checkpoint, parts={"tokenizer"})
    return PromptBuilder(parts.tokenizer, parts.special.audio), parts


def test_system_prompt_added_and_audio_extracted():
    msgs, audios = normalize_messages([{"role": "user", "content": [{"type": "audio", "audio": b"x"},
                                                                    {"type": "text", "text": "hi"}]}])
    assert msgs[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    assert msgs[1]["content"] == [{"type": "audio"}, {"type": "text", "text": "hi"}]
    assert audios == [b"x"]
    msgs, _ = normalize_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert msgs[0]["content"] == "Be brief." and len(msgs) == 2


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "robot", "content": "x"}], "role must be one of"),
    ([{"role": "user"}], "content must be a string"),
    ([{"role": "user", "content": [{"type": "image", "image": "x"}]}], "type must be 'text' or 'audio'"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "without 'audio' data"),
    ([{"role": "assistant", "content": [{"type": "audio", "audio": b"x"}]}], "user messages only"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text must be a string"),
    ([{"role": "user", "content": "x"}] * 300, "too many messages"),
])
def test_invalid_messages(messages, fragment):
    with pytest.raises(InvalidRequestError, match=fragment):
        normalize_messages(messages)


def test_audio_runs_are_expanded(builder):
    b, parts = builder
    msgs, _ = normalize_messages([{"role": "user", "content": [{"type": "audio", "audio": b"1"},
                                                               {"type": "text", "text": "and"},
                                                               {"type": "audio", "audio": b"2"}]}])
    ids = b.thinker_ids(msgs, [5, 3])
    audio = parts.special.audio
    assert ids.count(audio) == 8
    text = parts.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "<|audio_bos|>" + "<|AUDIO|>" * 5 + "<|audio_eos|>and<|audio_bos|>" + "<|AUDIO|>" * 3 in text
    with pytest.raises(InvalidRequestError):
        b.thinker_ids(msgs, [5])
