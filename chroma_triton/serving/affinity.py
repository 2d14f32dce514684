"""Conversation affinity: every turn of a conversation reaches the ``chroma_lm`` instance (GPU) that
served its earlier turns, where that instance's thinker prefix cache holds the conversation's
prompt so far.

Triton hands a request to any free instance; only its sequence batcher keeps requests together:
all requests of one *sequence* (one correlation ID) go to the instance the sequence started on,
until the sequence ends or stays idle for ``max_sequence_idle_microseconds``. So, with affinity on
(``--conversation-affinity on``), ``chroma_lm``'s config gets a sequence batcher (the "oldest"
strategy: any number of a sequence's requests may run at once, no batch slot is held while a reply
streams) and clients name the conversation:

* ``sequence_id``: the conversation (a string or a number); the frontend uses
  :func:`conversation_key`, a digest of the messages up to the first user turn, which every later
  turn of the conversation repeats (a client that trims its history's oldest turns starts a new
  conversation each time it does: its prompt's beginning changed, so no cache holds it anyway);
* ``sequence_start``: on the conversation's first request. The frontend sends it when none of its
  workers named the conversation within most of the idle timeout (a store the workers share); a
  client that cannot know uses :func:`opens_conversation` (no assistant turn yet). When Triton
  answers that the sequence is unknown (:func:`needs_start`: idle past the timeout, or a restarted
  server), the request is sent again with the flag, on whichever instance Triton picks;
* ``sequence_end``: on a request that no turn will follow (a one-shot request), which frees the
  sequence's slot at once instead of at the idle timeout.

Why it is off by default: in docs/benchmarks.md run 77 (2 x H200, 512 conversations on 512 rows)
gRPC clients gained (thinker prefix hits 885-923 of 2,048 requests against 615-624, 700-703
audio-s/s against 623-666, first audio p50 2.0 s against 2.4-2.8 s), but through the frontend the
tail grew (first audio p90 7.2 s against 3.4 s, 604 audio-s/s against 645), with that run's
frontend, which started a conversation only at a request without an assistant turn and so sent
1,280 of its 2,564 requests twice. Run 78 (4 x H200), with today's frontend (it remembers what it
named: no request sent twice): +8 % over gRPC again, but through the frontend the same throughput
(615.5 against 611.9 audio-s/s) with a longer tail (first audio p90 4.9 s against 4.0 s). And a
conversation stays on its instance however loaded that instance is.

Measured facts (tritonserver 2.51 of the nvidia-pytriton wheel, a decoupled Python model inside an
ensemble, two instances): the ensemble passes the correlation ID and flags on to ``chroma_lm``;
new sequences alternate between the instances and stay where they started; many sequences, and
several requests of one sequence, run at once; a request without a correlation ID is refused
("must specify a non-zero or non-empty correlation ID"), one that continues an unknown sequence too
("must specify the START flag"); a model without a sequence batcher ignores both fields, so clients
can always send them. When every candidate slot is held, a new sequence waits until one frees (an
end, or the idle timeout): the slots (``CANDIDATE_SEQUENCES`` per instance, about 1.4 KB each in
tritonserver's memory) are sized far above what the idle timeout lets accumulate.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Sequence

#: how long Triton keeps a conversation on its instance after its latest request arrived (seconds):
#: a reply streams for seconds to tens of seconds, then its listener answers; the thinker prefix
#: cache held conversations for 10-25 s between turns in docs/benchmarks.md run 76
DEFAULT_IDLE_S = 120.0
#: sequences each instance can hold at once (the "oldest" strategy's candidate sequences): with
#: ``DEFAULT_IDLE_S``, 68 new conversations a second per instance before a new one has to wait
CANDIDATE_SEQUENCES = 8192

#: the words of Triton's refusal of a request that continues a sequence it does not know
START_MISSING = "must specify the START flag"
#: the words of Triton's refusal of a request without a correlation ID (a client that names no
#: conversation, against a repository rendered with affinity)
ID_MISSING = "must specify a non-zero or non-empty correlation ID"


#: the idle timeouts taken (seconds): Triton reads 0 as its own default (1 s)
IDLE_RANGE_S = (1.0, 86_400.0)


def idle_problem(idle_s: float) -> str | None:
    """What is wrong with ``idle_s`` as a conversation idle timeout, or None."""
    lo, hi = IDLE_RANGE_S
    if not (math.isfinite(idle_s) and lo <= idle_s <= hi):
        return f"must be between {lo:g} and {hi:g} seconds, got {idle_s:g}"
    return None


def sequence_batching(idle_s: float, candidates: int = CANDIDATE_SEQUENCES) -> str:
    """The ``sequence_batching`` block of ``chroma_lm``'s config for an idle timeout of ``idle_s``."""
    problem = idle_problem(idle_s)
    if problem:
        raise ValueError(f"the conversation idle timeout {problem}")
    if candidates < 1:
        raise ValueError(f"candidate sequences must be >= 1, got {candidates}")
    return ("# conversation affinity (rendered by the launcher, chroma_triton/serving/affinity.py): the turns\n"
            "# of one conversation (one sequence_id) go to the instance its first turn went to\n"
            "sequence_batching {\n"
            f"  max_sequence_idle_microseconds: {round(idle_s * 1e6)}\n"
            f"  oldest {{ max_candidate_sequences: {candidates} }}\n"
            "}\n")


def opens_conversation(messages: Sequence[dict]) -> bool:
    """Whether a request with these chat messages is its conversation's first (no assistant turn)."""
    return not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)


def conversation_key(messages: Sequence[dict], clips: Sequence[bytes]) -> str:
    """A name for the conversation these messages belong to: a digest of the messages up to and
    including the first user turn (what every later turn resends first), an audio part by the
    digest of its clip (``{"type": "audio", "audio_index": i}`` names ``clips[i]``). Conversations
    that open with the same messages (the same system prompt and first question) share a name, and
    so an instance, as they share the beginning of their prompts in its cache."""
    def part(p):
        if isinstance(p, dict) and p.get("type") == "audio" and isinstance(p.get("audio_index"), int) \
                and 0 <= p["audio_index"] < len(clips):
            return {"type": "audio", "sha256": hashlib.sha256(clips[p["audio_index"]]).hexdigest()}
        return p

    leading = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        leading.append({"role": message.get("role") if isinstance(message, dict) else None,
                        "content": [part(p) for p in content] if isinstance(content, list) else content})
        if isinstance(message, dict) and message.get("role") == "user":
            break
    text = json.dumps(leading, sort_keys=True, ensure_ascii=False, default=str)
    return "conv-" + hashlib.sha256(text.encode()).hexdigest()[:24]


def needs_start(error_message: str) -> bool:
    """Whether Triton refused a request because it continued a sequence Triton does not know."""
    return START_MISSING.lower() in " ".join(error_message.split()).lower()
