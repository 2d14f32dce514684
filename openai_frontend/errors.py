"""Errors the frontend reports, classified once and rendered once, in OpenAI's error body.

Every failure ends up as an :class:`APIError` (``to_api_error`` converts the rest) and is
rendered by :func:`error_body`::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ..., "request_id": ...}}

``request_id`` is our addition (the same id is in the ``X-Request-ID`` header and every log line).
The HTTP handlers in :mod:`openai_frontend.app` and the in-band stream error event both use
these two functions, so a client sees the same body whichever way an error reaches it.
"""

from __future__ import annotations

import logging
from typing import Any

from chroma_triton.audio_io import AudioDecodeError
from chroma_triton.errors import CapacityError, ChromaError, InvalidRequestError

log = logging.getLogger("openai_frontend")


class APIError(Exception):
    """An error with its HTTP status and OpenAI error ``type``; ``message`` says what to fix."""

    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers: dict[str, str] = {}  # extra response headers (e.g. Allow on a 405)

    @property
    def is_client_error(self) -> bool:
        return self.status_code < 500


class InvalidRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class Unauthorized(APIError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class NotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowed(APIError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimited(APIError):
    """The server is full (the engine's queue); retrying later helps."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "server_busy"


class InternalError(APIError):
    status_code = 500
    error_type = "server_error"
    default_code = "internal_error"


class ServiceUnavailable(APIError):
    """Triton is unreachable, not ready, or dropped the request."""

    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


class GatewayTimeout(APIError):
    status_code = 504
    error_type = "server_error"
    default_code = "timeout"


class ClientDisconnected(Exception):
    """The HTTP client went away; nothing is sent back (not an API error)."""


def to_api_error(exc: BaseException) -> APIError:
    """Classify any exception once: ours as they are, the package's by kind, the rest as 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return InvalidRequest(str(exc), param=exc.param)
    if isinstance(exc, AudioDecodeError):
        return InvalidRequest(str(exc), code="invalid_audio")
    if isinstance(exc, CapacityError):
        return RateLimited(f"{exc}; retry later")
    if isinstance(exc, ChromaError):
        return InternalError(str(exc))
    return InternalError("internal server error; the server log has the details (search it for the request id)")


def error_body(err: APIError, request_id: str | None) -> dict[str, Any]:
    return {
        "error": {
            "message": err.message,
            "type": err.error_type,
            "param": err.param,
            "code": err.code,
            "request_id": request_id,
        }
    }


def log_error(err: APIError, cause: BaseException, where: str) -> None:
    """One log line per error: client errors at INFO, server errors at ERROR (with traceback
    when the cause was not one of ours, i.e. a bug)."""
    if err.is_client_error:
        log.info("%s -> %d %s: %s", where, err.status_code, err.code or err.error_type, err.message)
    elif cause is err or isinstance(cause, ChromaError):
        log.error("%s -> %d %s: %s", where, err.status_code, err.code or err.error_type, err.message)
    else:
        log.error("%s -> %d unexpected %s: %s", where, err.status_code, type(cause).__name__, cause,
                  exc_info=(type(cause), cause, cause.__traceback__))
