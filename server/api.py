"""HTTP routes. Thin: parse, call the service, pick JSON or SSE, render errors.

The request body is parsed here rather than by FastAPI's body injection so that every
validation failure becomes one OpenAI-shaped 400 naming the offending field (``messages[0].role``),
and so the route controls exactly when streaming starts: all errors that can be known before the
first token (unknown model, context too long, memory) are raised before the SSE headers go out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.chat import ChatRun, ChatService
from server.errors import BadRequest, MlxdError
from server.protocol import ChatRequest
from server.render import completion, sse_events
from server.state import AppState

log = logging.getLogger("mlxd.api")
router = APIRouter()


def field_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's ``("messages", 0, "content")`` → ``messages[0].content``.

    Union branches add type names to the location (``str``, ``list[TextPart]``,
    ``function-after[...]``); they say nothing to a client and are dropped.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part[:1].islower() and not any(c in part for c in "[]()-"):
            out += f".{part}" if out else part
    return out


def validation_error(exc: ValidationError) -> BadRequest:
    first = exc.errors()[0]
    where = field_path(tuple(first["loc"]))
    message = first["msg"]
    if where:
        message = f"{where}: {message}"
    if len(exc.errors()) > 1:
        message += f" (and {len(exc.errors()) - 1} more problem(s))"
    return BadRequest(message, param=where or None)


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.mlxd
    return state


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (every API's routes read their bodies through this)."""
    body = await request.body()
    try:
        data: Any = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


async def parse_chat_request(request: Request) -> ChatRequest:
    data = await read_json_object(request)
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def sse_response(
    events: AsyncIterator[Any], run: ChatRun, seconds: float, headers: dict[str, str]
) -> EventSourceResponse:
    """An SSE reply for ``run`` (every API's streams go out this way)."""
    return EventSourceResponse(
        events,
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        ping=seconds,
        sep="\n",
        # If the client is gone before the body starts, the generator never runs its
        # cleanup; this releases the model lease in that case (aclose is idempotent).
        background=BackgroundTask(run.aclose),
    )


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    chat_request = await parse_chat_request(request)
    service: ChatService = state.chat
    entry = state.router.pick(chat_request)
    run = await service.start(chat_request, entry)
    headers = {"x-mlxd-model": run.model}
    if chat_request.stream:
        events = sse_events(run, chat_request.include_usage)
        return sse_response(events, run, state.settings.sse_ping_seconds, headers)
    return JSONResponse(await completion(run), headers=headers)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {"object": "list", "data": [state.describe_model(e) for e in state.registry.entries]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    state = _state(request)
    return state.describe_model(state.registry.get(model_id))


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return await _state(request).health()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MlxdError)
    async def _mlxd(_: Request, exc: MlxdError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("%s: %s", type(exc).__name__, exc.message)
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        where = field_path(tuple(errors[0]["loc"])[1:]) if errors else ""
        err = BadRequest(f"{where}: {errors[0]['msg']}" if errors else "invalid request")
        return JSONResponse(err.to_dict(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = MlxdError(str(exc.detail))
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = err.to_dict()
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        body = MlxdError(f"internal error: {type(exc).__name__}: {exc}").to_dict()
        return JSONResponse(body, status_code=500)
