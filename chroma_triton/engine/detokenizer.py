"""Incremental detokenization that never splits a UTF-8 character across deltas."""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_ids: set[int]):
        self.tokenizer = tokenizer
        self.skip_ids = skip_ids
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token_id: int) -> str:
        """Append a token; return the newly completed text (may be empty)."""
        if token_id in self.skip_ids:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for more tokens
            return ""
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)
