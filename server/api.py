"""HTTP routes. Thin: parse, call the service, pick JSON or SSE, render errors.

The request body is parsed here rather than by FastAPI's body injection so that every
validation failure becomes one OpenAI-shaped 400 naming the offending field (``messages[0].role``),
and so the route controls exactly when streaming starts: all errors that can be known before the
first token (unknown model, context too long, memory) are raised before the SSE headers go out.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from server.chat import ChatRun, ChatService
from server.config import ModelEntry, parse_duration
from server.errors import BadRequest, Forbidden, MlxdError, ShuttingDown
from server.guard import caller_of
from server.protocol import MAX_JSON_DEPTH, ChatRequest, check_json_value
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
    message = first["msg"].removeprefix("Value error, ")
    if where:
        message = f"{where}: {message}"
    if len(exc.errors()) > 1:
        message += f" (and {len(exc.errors()) - 1} more problem(s))"
    return BadRequest(message, param=where or None)


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.mlxd
    return state


async def parse_chat_request(request: Request) -> ChatRequest:
    body = await request.body()
    try:
        data: Any = json.loads(body)
    except RecursionError:
        raise BadRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    check_json_value(data)
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def check_model_changes(request: Request, chat: ChatRequest, entry: ModelEntry) -> None:
    """Unloading (``keep_alive: 0``) and downloading a model are for trusted callers only.

    Trusted: a request with a valid API key, or, when no keys are configured, a local client
    that is not a web page (no ``Origin``). A page allowed by ``--cors-origins`` may chat but
    not unload the model or start a multi-GB download.
    """
    if caller_of(request.scope).trusted:
        return
    try:
        unloads = chat.keep_alive is not None and parse_duration(chat.keep_alive) == 0
    except ValueError:
        unloads = False  # prepare() reports the bad value
    if unloads:
        raise Forbidden(
            "keep_alive: 0 unloads the model; only a client with an API key may do that",
            param="keep_alive",
        )
    if not _state(request).registry.is_present(entry):
        raise Forbidden(
            f"model {entry.id!r} is not downloaded yet; a web page cannot start the download "
            "(run `mlxd pull`, or send the request with an API key)",
            param="model",
        )


async def until_disconnected(request: Request, run: ChatRun) -> dict[str, Any] | None:
    """The folded completion, or None if the client went away first (the run is cancelled
    within one token, so nobody's GPU time goes to an answer no one will read)."""
    task = asyncio.ensure_future(completion(run))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    run.cancel(cause="client_disconnected")
    with contextlib.suppress(Exception):
        await task
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    if state.draining:
        raise ShuttingDown("the server is shutting down; retry shortly")
    chat_request = await parse_chat_request(request)
    service: ChatService = state.chat
    entry = state.router.pick(chat_request)
    check_model_changes(request, chat_request, entry)
    slot = state.inflight.enter()
    try:
        run = await service.start(chat_request, entry)
    except BaseException:
        slot.release()
        raise
    run.on_close(slot.release)
    if request.client is not None:
        run.client = f"{request.client.host}:{request.client.port}"
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
    body = await until_disconnected(request, run)
    if body is None:
        return Response(status_code=499)  # nobody is listening; nginx's "client closed"
    if run.cause == "shutdown":
        done = body["usage"]["completion_tokens"]
        raise ShuttingDown(
            f"the server shut down before the completion finished ({done} tokens were "
            "generated); retry the request"
        )
    return JSONResponse(body, headers=headers)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {"object": "list", "data": [state.describe_model(e) for e in state.registry.entries]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    state = _state(request)
    return state.describe_model(state.registry.get(model_id))


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> dict[str, Any]:
    return await _state(request).health()


def error_response(exc: MlxdError, status: int | None = None) -> Response:
    # ASCII-escaped JSON: a message quoting client text renders whatever that text holds.
    body = json.dumps(exc.to_dict())
    return Response(body, status or exc.status_code, exc.headers, media_type="application/json")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MlxdError)
    async def _mlxd(_: Request, exc: MlxdError) -> Response:
        if exc.status_code >= 500:
            log.error("%s: %s", type(exc).__name__, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        where = field_path(tuple(errors[0]["loc"])[1:]) if errors else ""
        return error_response(
            BadRequest(f"{where}: {errors[0]['msg']}" if errors else "invalid request")
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        err = MlxdError(str(exc.detail), headers=dict(exc.headers or {}))
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(err, exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(MlxdError(f"internal error: {type(exc).__name__}: {exc}"))
