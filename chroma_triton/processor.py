"""Chat messages -> thinker prompt ids.

Messages follow the chat-completions shape: `{"role": ..., "content": str | [parts]}` with parts
`{"type": "text", "text": ...}` and `{"type": "audio", ...}`. Audio parts become
`<|audio_bos|><|AUDIO|><|audio_eos|>` in the chat template, and each `<|AUDIO|>` is then expanded
to as many tokens as the audio tower yields for that clip. A system prompt is added when the
first message is not a system message.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidRequestError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")
AUDIO_PLACEHOLDER = "<|AUDIO|>"


def normalize_messages(messages: Any, *, max_messages: int = 256) -> tuple[list[dict], list[Any]]:
    """Validate messages; return (template-ready messages, the audio payloads in order).

    Audio parts keep only `{"type": "audio"}` for the template; their payload (whatever the
    caller put under "audio") is returned separately for decoding.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", "messages")
    if len(messages) > max_messages:
        raise InvalidRequestError(f"too many messages ({len(messages)}); at most {max_messages}", "messages")
    out, audios = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequestError(f"{where} must be an object with role and content", where)
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise InvalidRequestError(f"{where}.content must be a string or a non-empty list of parts", f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InvalidRequestError(f"{pw}.text must be a string", pw)
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "audio":
                if part.get("audio") is None:
                    raise InvalidRequestError(f"{pw} is an audio part without 'audio' data", pw)
                if role != "user":
                    raise InvalidRequestError(f"{pw}: audio is accepted in user messages only", pw)
                parts.append({"type": "audio"})
                audios.append(part["audio"])
            else:
                raise InvalidRequestError(f"{pw}.type must be 'text' or 'audio', got {kind!r}", pw)
        out.append({"role": role, "content": parts})
    if out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": DEFAULT_SYSTEM_PROMPT})
    return out, audios


class PromptBuilder:
    def __init__(self, tokenizer, audio_token_id: int):
        self.tokenizer = tokenizer
        self.audio_token_id = audio_token_id

    def thinker_ids(self, messages: list[dict], audio_token_counts: list[int]) -> list[int]:
        """Template-ready messages + tokens per audio clip -> prompt ids ending in `<|im_start|>assistant\\n`."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pieces = text.split(AUDIO_PLACEHOLDER)
        if len(pieces) - 1 != len(audio_token_counts):
            raise InvalidRequestError(
                f"the chat template produced {len(pieces) - 1} audio slots for {len(audio_token_counts)} audio clips",
                "messages")
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
            if i < len(audio_token_counts):
                ids.extend([self.audio_token_id] * audio_token_counts[i])
        return ids

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)
