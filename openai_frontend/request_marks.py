"""Moments of a request, for its log line: when its body was read, when it was parsed and validated
(the route's handler entered), when its plan was ready (the request to Triton about to go), when
its first audio came back from Triton and when that audio's event went to the client. ``app.RequestContext``
opens a request's marks and logs them as milliseconds since the request arrived, e.g.
``POST /v1/chat/completions -> 200 in 1730 ms (body read 2 ms, validated 3 ms, planned 6 ms, first audio
85 ms, first audio sent 86 ms)``.

A context variable holds one dict per request; the tasks a request starts (its streamed reply)
inherit the variable, so they write into the same dict."""

from __future__ import annotations

import contextvars
import time

_MARKS: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("request_marks", default=None)

#: the marks, in the order of a request's life, with their words in the log line
LABELS = {"body": "body read", "validated": "validated", "planned": "planned", "first_audio": "first audio",
          "first_sent": "first audio sent"}


def open_marks() -> tuple[dict[str, float], contextvars.Token]:
    """Start the current request's marks; reset the returned token when it ends."""
    marks: dict[str, float] = {}
    return marks, _MARKS.set(marks)


def close_marks(token: contextvars.Token) -> None:
    _MARKS.reset(token)


def mark(name: str) -> None:
    """Note that the current request reached `name` now (the first time only); nothing outside one."""
    marks = _MARKS.get()
    if marks is not None and name not in marks:
        marks[name] = time.perf_counter()


def describe(marks: dict[str, float], start: float) -> str:
    """``" (body read 2 ms, ...)"`` for the marks reached, or ``""``."""
    parts = [f"{LABELS[name]} {(marks[name] - start) * 1000:.0f} ms" for name in LABELS if name in marks]
    return f" ({', '.join(parts)})" if parts else ""
