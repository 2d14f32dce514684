"""Errors the package raises on purpose, classified once for every caller.

`InvalidRequestError` means the caller sent something we cannot serve (a 4xx for HTTP callers);
`CheckpointError` means the model folder is unusable; `EngineError` is our side's failure.
"""


class ChromaError(Exception):
    """Base class of every error this package raises deliberately."""


class InvalidRequestError(ChromaError, ValueError):
    """The request is malformed or out of range; the message says what to fix.

    `param` names the offending field where there is one (OpenAI's error body carries it).
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class CheckpointError(ChromaError):
    """A checkpoint folder is missing files, has corrupt shards or weights of the wrong shape."""


class EngineError(ChromaError):
    """The engine failed while serving a request (not the caller's fault)."""


class CapacityError(EngineError):
    """The engine cannot take the request now (queue full, or it can never fit the context)."""
