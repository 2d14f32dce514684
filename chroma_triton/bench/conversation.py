"""The conversations the benchmarks send: a user turn per audio part, the assistant's text reply
between them, as a voice agent resends its history with every turn (about 120 prompt tokens per
turn with the question clip)."""

from __future__ import annotations

HISTORY_REPLY = "Sure. It should stay dry and mild all afternoon, with a light breeze from the west."


def conversation(parts: list[dict]) -> list[dict]:
    """Chat messages: a user turn per content part (the last one the new question), ``HISTORY_REPLY``
    as the assistant's reply after each earlier one."""
    earlier = []
    for part in parts[:-1]:
        earlier += [{"role": "user", "content": [part]}, {"role": "assistant", "content": HISTORY_REPLY}]
    return earlier + [{"role": "user", "content": [parts[-1]]}]
