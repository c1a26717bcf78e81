"""HTTP routes. Thin: parse, call the service, pick JSON or SSE, render errors.

The request body is parsed here rather than by FastAPI's body injection so that every
validation failure becomes one OpenAI-shaped 400 naming the offending field (``messages[0].role``),
and so the route controls exactly when streaming starts: all errors that can be known before the
first token (unknown model, context too long, memory) are raised before the SSE headers go out.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.chat import ChatService
from server.errors import BadRequest, MlxdError
from server.protocol import ChatRequest
from server.render import completion, sse_events
from server.state import AppState

log = logging.getLogger("mlxd.api")
router = APIRouter()


_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
               "list": "an array", "dict": "an object", "none": "null"}  # fmt: skip


def _is_branch(part: int | str) -> bool:
    """pydantic names union branches in a location by type (``str``, ``list[TextPart]``,
    ``literal['auto','none']``, ``function-after[...]``, ``NamedToolChoice``); a client never
    wrote those names."""
    if isinstance(part, int):
        return False
    return (
        part.split("[")[0] in _TYPE_WORDS
        or not part[:1].islower()
        or any(c in part for c in "[]()-'")
    )


def field_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's ``("messages", 0, "content", "str")`` → ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_branch(part):
            out += f".{part}" if out else part
    return out


def _branch_word(tag: str) -> str:
    if tag.startswith("literal["):
        return "one of " + tag[len("literal[") : -1].replace(",", ", ")
    return _TYPE_WORDS.get(tag.split("[")[0], "an object")


def validation_error(exc: ValidationError) -> BadRequest:
    """The first problem, worded with the client's field names.

    A value that fits no branch of a union (``content: 5``) fails every branch; that is one
    problem ("must be a string or an array"). When the value has one branch's type but is wrong
    inside it (a content part without ``text``), that inner problem is the one reported.
    """
    errors = exc.errors()
    first = errors[0]
    loc = tuple(first["loc"])
    at = next((i for i, part in enumerate(loc) if _is_branch(part)), None)
    group = [first]
    message = first["msg"]
    if at is not None:
        group = [e for e in errors if len(e["loc"]) > at and tuple(e["loc"])[:at] == loc[:at]]
        deepest = max(group, key=lambda e: len(e["loc"]))
        if len(deepest["loc"]) > at + 1:
            first, message = deepest, deepest["msg"]
        else:
            words = dict.fromkeys(_branch_word(str(e["loc"][at])) for e in group)
            message = "must be " + " or ".join(words)
    where = field_path(tuple(first["loc"]))
    if where:
        message = f"{where}: {message}"
    others = len(errors) - len(group)
    if others > 0:
        message += f" (and {others} more problem(s))"
    return BadRequest(message, param=where or None)


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.mlxd
    return state


async def parse_chat_request(request: Request) -> ChatRequest:
    body = await request.body()
    try:
        data: Any = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    chat_request = await parse_chat_request(request)
    service: ChatService = state.chat
    entry = state.router.pick(chat_request)
    run = await service.start(chat_request, entry)
    headers = {"x-mlxd-model": run.model}
    if chat_request.stream:
        return EventSourceResponse(
            sse_events(run, chat_request.include_usage),
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            ping=state.settings.sse_ping_seconds,
            sep="\n",
            # If the client is gone before the body starts, the generator never runs its
            # cleanup; this releases the model lease in that case (aclose is idempotent).
            background=BackgroundTask(run.aclose),
        )
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
