"""The one exception tree of mlxd, rendered as OpenAI error JSON.

::

    MlxdError (500, server_error)
    ├── BadRequest (400, invalid_request_error)
    │   ├── ContextLengthExceeded (400, code=context_length_exceeded)
    │   └── InsufficientMemory (400, code=insufficient_memory)  never fits the budget
    ├── Unauthorized (401, code=invalid_api_key)              missing or wrong API key
    ├── Forbidden (403, code=forbidden)                       Host, Origin, or not allowed
    ├── NotFound (404)                                          e.g. an unknown stored response
    │   └── ModelNotFound (404, code=model_not_found)
    ├── RequestTimeout (408, code=request_timeout)            body arrived too slowly
    ├── PayloadTooLarge (413, code=payload_too_large)
    ├── UnsupportedMediaType (415, code=unsupported_media_type)
    ├── HeadersTooLarge (431, code=headers_too_large)
    ├── Overloaded (503, code=overloaded) + Retry-After        memory or queue full for now
    │   └── ShuttingDown (503, code=server_shutdown)           drain timeout cut it off
    ├── ModelLoadFailed (500, code=model_load_failed)          files missing or corrupt
    └── EngineFailure (500, code=engine_error)                 generation raised

Everything raised towards a client is one of these; the handler in
:mod:`server.api` renders ``{"error": {"message", "type", "param", "code"}}``
with the class's status code, so a route never builds error JSON by hand.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from starlette.types import Send


class MlxdError(Exception):
    """Base of every client-visible error."""

    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(MlxdError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    default_code = "context_length_exceeded"


class InsufficientMemory(BadRequest):
    """The request can never fit the memory budget, whatever else is unloaded."""

    default_code = "insufficient_memory"


class Unauthorized(MlxdError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(MlxdError):
    status_code = 403
    error_type = "invalid_request_error"
    default_code = "forbidden"


class ConnectionSpoiled(MlxdError):
    """A refusal after which the connection cannot carry another request (the rest of the body
    or headers was not read), so the response closes it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class RequestTimeout(ConnectionSpoiled):
    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class PayloadTooLarge(ConnectionSpoiled):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class UnsupportedMediaType(MlxdError):
    status_code = 415
    error_type = "invalid_request_error"
    default_code = "unsupported_media_type"


class HeadersTooLarge(ConnectionSpoiled):
    status_code = 431
    error_type = "invalid_request_error"
    default_code = "headers_too_large"


class NotFound(MlxdError):
    status_code = 404
    error_type = "invalid_request_error"


class ModelNotFound(NotFound):
    default_code = "model_not_found"

    def __init__(self, model: str, known: list[str]) -> None:
        listed = ", ".join(known) if known else "(none configured)"
        super().__init__(
            f"The model '{model}' does not exist. Configured models: {listed}",
            param="model",
        )


class Overloaded(MlxdError):
    """Temporarily unable to serve: memory or the queue is full. Retry later."""

    status_code = 503
    error_type = "server_error"
    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after)))})
        self.retry_after = retry_after


class ShuttingDown(Overloaded):
    """The server is stopping; what was running was ended at the drain timeout."""

    default_code = "server_shutdown"


class ModelLoadFailed(MlxdError):
    default_code = "model_load_failed"


class GGUFImportError(ModelLoadFailed):
    """A GGUF file that cannot be imported, with a message meant for the user."""


class EngineFailure(MlxdError):
    default_code = "engine_error"


async def send_error(
    send: Send, exc: MlxdError, extra_headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Answer with ``exc`` straight from ASGI middleware (before any route runs)."""
    body = json.dumps(exc.to_dict()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in exc.headers.items()),
        *extra_headers,
    ]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
