"""IncrementalDetokenizer: its deltas add up to the whole decode, never split a character, and each
token decodes a short window, not the reply so far."""

from __future__ import annotations

import random

import pytest

from chroma_triton.engine.detokenizer import IncrementalDetokenizer, fast_decode

TEXTS = [
    "Hello there! How can I help you today?",
    "Ünïcödé: 你好，世界。Let's mix scripts — emoji too 🙂🚀 and ∑ symbols.",
    "  leading spaces,\nnew lines\tand tabs ...  ",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def feed(detok, ids):
    return [detok.add(i) for i in ids]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_whole_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, set())
    deltas = feed(detok, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert detok.text == text
    assert not any("\ufffd" in d for d in deltas)  # a character split over tokens comes out whole


def test_random_ids_and_skipped_ids(tokenizer):
    rng = random.Random(0)
    special = set(tokenizer.all_special_ids)
    ids = [rng.randrange(0, tokenizer.vocab_size) for _ in range(400)] + sorted(special)[:3]
    rng.shuffle(ids)
    skip = set(ids[:5]) | special
    detok = IncrementalDetokenizer(tokenizer, skip)
    deltas = feed(detok, ids)
    assert all(d == "" for i, d in zip(ids, deltas) if i in skip)
    kept = [i for i in ids if i not in skip]
    whole = tokenizer.decode(kept, skip_special_tokens=True)
    joined = "".join(deltas)
    assert whole.startswith(joined)  # what was emitted is right; an unfinished character may wait
    assert len(whole) - len(joined) <= 2
    assert detok.text == whole


def test_each_token_decodes_a_short_window(tokenizer):
    ids = tokenizer.encode(" ".join(["word"] * 300) + " 你好🙂" * 20, add_special_tokens=False)
    seen = []
    decode = fast_decode(tokenizer)

    def counting(window):
        seen.append(len(window))
        return decode(window)
    detok = IncrementalDetokenizer(tokenizer, set(), counting)
    assert "".join(feed(detok, ids)) == tokenizer.decode(ids)
    assert len(ids) > 300 and max(seen) <= 8  # the reply so far was up to 360 tokens


def test_fast_decode_matches_transformers(tokenizer):
    ids = tokenizer.encode(TEXTS[1]) + list(tokenizer.all_special_ids)[:2]
    assert fast_decode(tokenizer)(ids) == tokenizer.decode(ids, skip_special_tokens=True)

    class Slow:  # no Rust backend (or one whose output transformers post-processes): its own decode
        def decode(self, ids, skip_special_tokens=False):
            return f"{len(ids)}:{skip_special_tokens}"
    assert fast_decode(Slow())([1, 2]) == "2:True"


def test_a_decoder_that_rewrites_earlier_text_does_not_stop_the_deltas():
    """A tokenizer whose decode cleans up spaces (" ." -> ".") can make the window's text disagree
    with what was emitted; the detokenizer goes on instead of waiting for ever."""
    pieces = {0: "a", 1: " ", 2: ".", 3: " b", 4: " c"}

    class CleaningUp:
        def decode(self, ids, skip_special_tokens=False):
            return "".join(pieces[i] for i in ids).replace(" .", ".")
    detok = IncrementalDetokenizer(CleaningUp(), set())
    deltas = feed(detok, [0, 1, 2, 3, 4])
    assert "".join(deltas) == "a . b c"  # nothing lost: the space already out stays out
    assert detok.text == "a. b c"
