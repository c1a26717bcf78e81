"""The one exception tree of mlxd, rendered as OpenAI error JSON.

::

    MlxdError (500, server_error)
    ├── BadRequest (400, invalid_request_error)
    │   ├── ContextLengthExceeded (400, code=context_length_exceeded)
    │   └── InsufficientMemory (400, code=insufficient_memory)  never fits the budget
    ├── NotFound (404)                                          e.g. an unknown stored response
    │   └── ModelNotFound (404, code=model_not_found)
    ├── Overloaded (503, code=overloaded) + Retry-After        memory or queue full for now
    ├── ModelLoadFailed (500, code=model_load_failed)          files missing or corrupt
    └── EngineFailure (500, code=engine_error)                 generation raised

Everything raised towards a client is one of these; the handler in
:mod:`server.api` renders ``{"error": {"message", "type", "param", "code"}}``
with the class's status code, so a route never builds error JSON by hand.
"""

from __future__ import annotations

from typing import Any


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


class ModelLoadFailed(MlxdError):
    default_code = "model_load_failed"


class EngineFailure(MlxdError):
    default_code = "engine_error"
