"""Incremental detokenization that never splits a UTF-8 character across deltas, at a cost per
token that does not grow with the reply.

Decoding the whole reply again for every new token costs time in proportion to the reply's
length: at 256 streams the engine's thread did that once per stream every other step, through
transformers' Python `decode` (about 20 µs of wrapper per call on top of the decode itself).
Here each token decodes only a window, the tokens not yet emitted and the ones emitted just before
them, through the tokenizers library directly when transformers would add nothing to its output.
"""

from __future__ import annotations

import os


def fast_decode(tokenizer):
    """`ids -> text` as `tokenizer.decode(ids, skip_special_tokens=True)` gives it: the Rust
    tokenizer's own decode where transformers would only wrap it (a fast tokenizer that does not
    clean up spaces), else transformers' decode."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_ids: set[int], decode=None):
        """`decode`: a `fast_decode(tokenizer)` to share between detokenizers (made here if None)."""
        self._decode = decode or fast_decode(tokenizer)
        self.skip_ids = skip_ids
        self.ids: list[int] = []
        self._start = 0  # the window: ids[_start:_read] were emitted already and give the context
        self._read = 0  # ids[_read:] are not emitted yet

    def add(self, token_id: int) -> str:
        """Append a token; return the newly completed text (may be empty)."""
        if token_id in self.skip_ids:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._start:self._read])
        text = self._decode(self.ids[self._start:])
        # an unfinished multi-byte character (or nothing new yet): wait for more tokens
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._start, self._read = self._read, len(self.ids)
        # a decoder that rewrites what it decoded before (a tokenizer that cleans up spaces, " ."
        # -> ".") can make the window's text disagree with what was emitted: what was emitted
        # stays, the text past the part both agree on goes out
        return text[len(os.path.commonprefix([before, text])):]

    @property
    def text(self) -> str:
        return self._decode(self.ids)
