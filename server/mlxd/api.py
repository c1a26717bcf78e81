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
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlxd.chat import ChatRun, ChatService
from mlxd.config import ModelEntry, parse_duration
from mlxd.errors import BadRequest, Forbidden, MlxdError, ShuttingDown
from mlxd.guard import caller_of
from mlxd.protocol import MAX_JSON_DEPTH, ChatRequest, check_json_value
from mlxd.render import completion, sse_events
from mlxd.state import AppState

log = logging.getLogger("mlxd.api")
T = TypeVar("T")
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
    message = first["msg"].removeprefix("Value error, ")
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


def _state(http: Request) -> AppState:
    state: AppState = http.app.state.mlxd
    return state


async def read_json_object(http: Request) -> dict[str, Any]:
    """The request body as a JSON object (every API's routes read their bodies through this)."""
    body = await http.body()
    try:
        data: Any = json.loads(body)
    except RecursionError:
        raise BadRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    check_json_value(data)
    return data


async def parse_chat_request(http: Request) -> ChatRequest:
    data = await read_json_object(http)
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


def check_model_changes(http: Request, chat: ChatRequest, entry: ModelEntry) -> None:
    """Unloading (``keep_alive: 0``) and downloading a model are for trusted callers only.

    Trusted: a request with a valid API key, or, when no keys are configured, a local client
    that is not a web page (no ``Origin``). A page allowed by ``--cors-origins`` may chat but
    not unload the model or start a multi-GB download.
    """
    if caller_of(http.scope).trusted:
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
    if not _state(http).registry.is_present(entry):
        raise Forbidden(
            f"model {entry.id!r} is not downloaded yet; a web page cannot start the download "
            "(run `mlxd pull`, or send the request with an API key)",
            param="model",
        )


async def until_disconnected(http: Request, run: ChatRun, reply: Awaitable[T]) -> T | None:
    """The folded ``reply`` to ``run``, or None if the client went away first (the run is
    cancelled within one token, so nobody's GPU time goes to an answer no one will read)."""
    task = asyncio.ensure_future(reply)
    gone = asyncio.ensure_future(_disconnected(http))
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


async def _disconnected(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


def refuse_if_draining(http: Request) -> None:
    if _state(http).draining:
        raise ShuttingDown("the server is shutting down; retry shortly")


async def start_run(http: Request, chat: ChatRequest, entry: ModelEntry, **options: Any) -> ChatRun:
    """Admit one generation, whichever API asked: the caller's rights, the in-flight limit,
    then the chat service (``options`` go to :meth:`ChatService.start`)."""
    state = _state(http)
    refuse_if_draining(http)
    check_model_changes(http, chat, entry)
    slot = state.inflight.enter()
    service: ChatService = state.chat
    try:
        run = await service.start(chat, entry, **options)
    except BaseException:
        slot.release()
        raise
    run.on_close(slot.release)
    if http.client is not None:
        run.client = f"{http.client.host}:{http.client.port}"
    return run


@router.post("/v1/chat/completions")
async def chat_completions(http: Request) -> Response:
    state = _state(http)
    refuse_if_draining(http)
    chat = await parse_chat_request(http)
    entry = state.router.pick(chat)
    run = await start_run(http, chat, entry)
    headers = {"x-mlxd-model": run.model}
    if chat.stream:
        events = sse_events(run, chat.include_usage)
        return sse_response(events, run, state.settings.sse_ping_seconds, headers)
    body = await until_disconnected(http, run, completion(run))
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
async def list_models(http: Request) -> dict[str, Any]:
    state = _state(http)
    return {"object": "list", "data": [state.describe_model(e) for e in state.registry.entries]}


@router.get("/v1/models/{model_id:path}")
async def get_model(http: Request, model_id: str) -> dict[str, Any]:
    state = _state(http)
    return state.describe_model(state.registry.get(model_id))


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(http: Request) -> dict[str, Any]:
    return await _state(http).health()


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
