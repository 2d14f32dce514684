"""Schemathesis hooks for fuzzing the frontend (loaded through ``SCHEMATHESIS_HOOKS``).

The schema types ``model`` as any string, as OpenAI's does, but this server knows one id: nearly
every generated chat request would stop at the 404 for an unknown model and never reach the
validation of messages, audio and sampling, nor the engine. So 4 of 5 chat bodies whose ``model``
is a string get ``"chroma"`` (a generated non-string ``model`` is left alone: it is the negative
case's point).
"""

import random

import schemathesis

_RNG = random.Random(0)
MODEL = "chroma"


@schemathesis.hook
def map_body(context, body):
    operation = context.operation
    if (operation is not None and operation.path == "/v1/chat/completions" and isinstance(body, dict)
            and isinstance(body.get("model"), str) and _RNG.random() < 0.8):
        body["model"] = MODEL
    return body
