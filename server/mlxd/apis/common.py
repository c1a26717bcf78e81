"""What every API translation shares: body parsing, error-shaped routes, and two views of a run.

A run's events (``Delta`` … ``Finish``) are seen either folded (:func:`fold`, for JSON replies) or
as a sequence of content blocks (:class:`Blocks`, for streams): reasoning, text and each tool call
open, grow and close in the order the model wrote them. Anthropic's ``content_block_*`` events,
the Responses API's output items and Ollama's chunks are all renderings of those two views.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from mlxd.api import read_json_object, validation_error
from mlxd.chat import ChatRun, Delta
from mlxd.errors import BadRequest, EngineFailure, MlxdError
from mlxd.fold import Call
from mlxd.parsers.base import ToolCallDelta
from mlxd.protocol import ChatRequest
from mlxd.state import AppState

log = logging.getLogger("mlxd.apis")

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
ErrorBody = Callable[[MlxdError], dict[str, Any]]


def app_state(http: Request) -> AppState:
    state: AppState = http.app.state.mlxd
    return state


async def parse_body(http: Request, model: type[M]) -> M:
    data = await read_json_object(http)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def chat_request(fields: dict[str, Any]) -> ChatRequest:
    """A translated request, validated by the chat schema (its limits are every API's limits)."""
    try:
        return ChatRequest.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(exc) from None


def error_route(render: ErrorBody) -> type[APIRoute]:
    """A route class whose errors are drawn in one API's own error shape.

    The app-wide handler draws OpenAI's shape; Anthropic and Ollama clients parse their own, so
    their routers catch mlxd's errors first and draw them with ``render`` (same status codes).
    """

    class ShapedRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def shaped(http: Request) -> Response:
                try:
                    return await handler(http)
                except MlxdError as exc:
                    if exc.status_code >= 500:
                        log.error("%s: %s", type(exc).__name__, exc.message)
                    return JSONResponse(
                        render(exc), status_code=exc.status_code, headers=exc.headers
                    )

            return shaped

    return ShapedRoute


async def guarded(
    run: ChatRun, frames: AsyncIterator[T], error: Callable[[MlxdError], T]
) -> AsyncIterator[T]:
    """A stream's frames, then its error (headers are gone: in-band) as the API draws one;
    the run is closed however the stream ends."""
    try:
        async for frame in frames:
            yield frame
    except MlxdError as exc:
        yield error(exc)
    except Exception as exc:
        yield error(EngineFailure(f"{type(exc).__name__}: {exc}"))
    finally:
        await run.aclose()


def arguments_object(arguments: str) -> dict[str, Any]:
    """Tool-call arguments as the object Anthropic and Ollama send (the parser checked them)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def json_arguments(value: Any, param: str) -> dict[str, Any]:
    """Client-sent call arguments (an object, or a JSON string of one) as an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise BadRequest("tool call arguments must be a JSON object", param=param) from None
    if not isinstance(value, dict):
        raise BadRequest("tool call arguments must be a JSON object", param=param)
    return value


Kind = Literal["reasoning", "text", "tool"]


@dataclass(frozen=True)
class BlockEvent:
    action: Literal["open", "delta", "close"]
    kind: Kind
    index: int  # position of the block in the reply, from 0
    text: str = ""  # delta: the new text (a tool's argument JSON piece); close: the whole block
    call: Call | None = None  # tool blocks: id and name (arguments so far on close)


@dataclass
class Blocks:
    """Cuts a run's deltas into content blocks; a block closes when the next kind begins."""

    count: int = 0
    kind: Kind | None = None
    text: list[str] = field(default_factory=list)
    call: Call | None = None
    calls: list[Call] = field(default_factory=list)

    def feed(self, delta: Delta) -> list[BlockEvent]:
        out: list[BlockEvent] = []
        if delta.reasoning:
            out += self._grow("reasoning", delta.reasoning)
        if delta.content:
            out += self._grow("text", delta.content)
        for piece in delta.tool_calls:
            out += self._tool(piece)
        return out

    def close(self) -> list[BlockEvent]:
        if self.kind is None:
            return []
        text = "".join(self.text)
        event = BlockEvent("close", self.kind, self.count - 1, text, self.call)
        self.kind, self.text, self.call = None, [], None
        return [event]

    def _open(self, kind: Kind, call: Call | None = None) -> list[BlockEvent]:
        out = self.close()
        self.kind, self.call = kind, call
        self.count += 1
        return [*out, BlockEvent("open", kind, self.count - 1, call=call)]

    def _grow(self, kind: Kind, text: str) -> list[BlockEvent]:
        out = self._open(kind) if self.kind != kind else []
        self.text.append(text)
        return [*out, BlockEvent("delta", kind, self.count - 1, text, self.call)]

    def _tool(self, piece: ToolCallDelta) -> list[BlockEvent]:
        out: list[BlockEvent] = []
        if piece.id is not None or self.call is None:
            call = Call(piece.id or "", piece.name or "")
            self.calls.append(call)
            out += self._open("tool", call)
        assert self.call is not None
        if piece.arguments:
            self.call.arguments += piece.arguments
            self.text.append(piece.arguments)
            out.append(BlockEvent("delta", "tool", self.count - 1, piece.arguments, self.call))
        return out
