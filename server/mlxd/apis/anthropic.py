"""Anthropic Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) onto the chat service.

The request becomes an OpenAI-style :class:`~server.protocol.ChatRequest` (so admission, the
template, parsers and tool_choice forcing are the chat path's own); the run's events become
Anthropic content blocks: ``thinking`` (reasoning), ``text`` and ``tool_use``. A stream is the
exact event sequence the Anthropic SDKs parse::

    message_start, ping, (content_block_start, content_block_delta*, content_block_stop)*,
    message_delta (stop_reason, usage), message_stop

Errors are ``{"type": "error", "error": {"type", "message"}}`` with the same status codes.
``x-api-key`` and ``anthropic-version`` headers are accepted and not checked (a local server).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from mlxd.api import sse_response, start_run, until_disconnected
from mlxd.apis.common import (
    BlockEvent,
    Blocks,
    app_state,
    arguments_object,
    chat_request,
    error_route,
    guarded,
    parse_body,
)
from mlxd.chat import ChatRun, Finish
from mlxd.errors import BadRequest, MlxdError
from mlxd.fold import Call, fold
from mlxd.protocol import ChatRequest, dumps

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(exc: MlxdError) -> dict[str, Any]:
    kind = ERROR_TYPES.get(exc.status_code, "api_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


router = APIRouter(route_class=error_route(error_body))


class Block(BaseModel):
    """One content block; which fields matter depends on ``type``."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    thinking: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[Block] | None = None
    is_error: bool | None = None


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["user", "assistant"]
    content: str | list[Block]


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    type: str | None = None


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1)


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: dict[str, Any] | None = None


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    system: str | list[Block] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


def _block_text(content: str | list[Block] | None, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if block.type != "text":
            raise BadRequest(
                f"content blocks of type {block.type!r} are not supported here (only 'text')",
                param=f"{param}[{i}].type",
            )
        parts.append(block.text or "")
    return "".join(parts)


def to_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    """Anthropic turns → OpenAI chat messages (tool results become ``tool`` messages)."""
    out: list[dict[str, Any]] = []
    system = _block_text(req.system, "system")
    if system:
        out.append({"role": "system", "content": system})
    for i, msg in enumerate(req.messages):
        where = f"messages[{i}].content"
        if isinstance(msg.content, str):
            out.append({"role": msg.role, "content": msg.content})
            continue
        text: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(msg.content):
            if block.type == "text":
                text.append(block.text or "")
            elif block.type == "thinking" and msg.role == "assistant":
                reasoning.append(block.thinking or "")
            elif block.type == "redacted_thinking" and msg.role == "assistant":
                continue  # encrypted by Anthropic; nothing a local model can read
            elif block.type == "tool_use" and msg.role == "assistant":
                if not block.id or not block.name:
                    raise BadRequest("tool_use blocks need 'id' and 'name'", param=f"{where}[{j}]")
                calls.append(
                    {
                        "id": block.id,
                        "type": "function",
                        "function": {"name": block.name, "arguments": block.input or {}},
                    }
                )
            elif block.type == "tool_result" and msg.role == "user":
                if text:  # keep the order the client wrote
                    out.append({"role": "user", "content": "".join(text)})
                    text = []
                result = _block_text(block.content, f"{where}[{j}].content")
                if block.is_error:
                    result = f"Error: {result}"
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": result})
            else:
                raise BadRequest(
                    f"content block type {block.type!r} is not supported in a {msg.role} message",
                    param=f"{where}[{j}].type",
                )
        if msg.role == "assistant":
            item: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
            if reasoning:
                item["reasoning_content"] = "".join(reasoning)
            if calls:
                item["tool_calls"] = calls
            out.append(item)
        elif text:
            out.append({"role": "user", "content": "".join(text)})
    return out


def chat_fields(req: MessagesRequest) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": req.model,
        "messages": to_messages(req),
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "stop": req.stop_sequences or None,
    }
    if req.tools:
        for i, tool in enumerate(req.tools):
            if tool.type not in (None, "custom"):
                raise BadRequest(
                    f"server tool {tool.type!r} is not available; only client tools are",
                    param=f"tools[{i}].type",
                )
        data["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.input_schema,
                },
            }
            for t in req.tools
        ]
    choice = req.tool_choice
    if choice is not None and req.tools:
        if choice.type == "tool":
            if not choice.name:
                raise BadRequest("tool_choice of type 'tool' needs 'name'", param="tool_choice")
            data["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            data["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:
            data["parallel_tool_calls"] = False
    if req.thinking is not None and req.thinking.type != "adaptive":
        data["chat_template_kwargs"] = {"enable_thinking": req.thinking.type == "enabled"}
    out = req.output_config
    if out is not None and out.effort is not None:
        data["reasoning_effort"] = "high" if out.effort in ("xhigh", "max") else out.effort
    if out is not None and out.format is not None:
        # Structured output is the chat path's: its response_format, in chat's shape.
        schema = {"name": "output", "schema": out.format.get("schema") or {}}
        data["response_format"] = {"type": "json_schema", "json_schema": schema}
    return data


def to_chat_request(req: MessagesRequest) -> ChatRequest:
    return chat_request(chat_fields(req))


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def stop_reason(finish: Finish) -> str:
    if finish.reason == "length":
        return "max_tokens"
    if finish.reason == "tool_calls":
        return "tool_use"
    if finish.stop_sequence is not None:
        return "stop_sequence"
    return "end_turn"


def usage(finish: Finish) -> dict[str, int]:
    """Anthropic counts cache reads apart from ``input_tokens`` (they sum to the prompt)."""
    u = finish.usage
    return {
        "input_tokens": u.prompt_tokens - u.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached_tokens,
        "output_tokens": u.completion_tokens,
    }


def tool_use_block(call: Call) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": tool_use_id(call.id),
        "name": call.name,
        "input": arguments_object(call.arguments),
    }


async def message(run: ChatRun, msg_id: str) -> dict[str, Any]:
    folded = await fold(run)
    content: list[dict[str, Any]] = []
    if folded.reasoning:
        content.append({"type": "thinking", "thinking": folded.reasoning, "signature": ""})
    if folded.content:
        content.append({"type": "text", "text": folded.content})
    content += [tool_use_block(call) for call in folded.calls]
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": run.model,
        "content": content,
        "stop_reason": stop_reason(folded.finish),
        "stop_sequence": folded.finish.stop_sequence,
        "usage": usage(folded.finish),
    }


def _sse(kind: str, data: dict[str, Any]) -> dict[str, str]:
    return {"event": kind, "data": dumps({"type": kind, **data})}


def block_events(event: BlockEvent) -> list[dict[str, str]]:
    """One block event → the Anthropic SSE events for it."""
    i = event.index
    if event.action == "open":
        if event.kind == "tool":
            assert event.call is not None
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": tool_use_id(event.call.id),
                "name": event.call.name,
                "input": {},
            }
        elif event.kind == "reasoning":
            block = {"type": "thinking", "thinking": "", "signature": ""}
        else:
            block = {"type": "text", "text": ""}
        return [_sse("content_block_start", {"index": i, "content_block": block})]
    if event.action == "delta":
        if event.kind == "tool":
            delta = {"type": "input_json_delta", "partial_json": event.text}
        elif event.kind == "reasoning":
            delta = {"type": "thinking_delta", "thinking": event.text}
        else:
            delta = {"type": "text_delta", "text": event.text}
        return [_sse("content_block_delta", {"index": i, "delta": delta})]
    out = []
    if event.kind == "reasoning":
        # Local reasoning is not signed; the empty signature keeps clients' block state simple.
        signature = {"type": "signature_delta", "signature": ""}
        out.append(_sse("content_block_delta", {"index": i, "delta": signature}))
    out.append(_sse("content_block_stop", {"index": i}))
    return out


async def _events(run: ChatRun, msg_id: str) -> AsyncIterator[dict[str, str]]:
    start: dict[str, Any] = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": run.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": len(run.prepared.prompt), "output_tokens": 0},
    }
    blocks = Blocks()
    yield _sse("message_start", {"message": start})
    yield _sse("ping", {})
    async for event in run.events():
        if isinstance(event, Finish):
            for closing in blocks.close():
                for frame in block_events(closing):
                    yield frame
            delta = {"stop_reason": stop_reason(event), "stop_sequence": event.stop_sequence}
            yield _sse("message_delta", {"delta": delta, "usage": usage(event)})
            yield _sse("message_stop", {})
            continue
        for block in blocks.feed(event):
            for frame in block_events(block):
                yield frame


def stream(run: ChatRun, msg_id: str) -> AsyncIterator[dict[str, str]]:
    """The SSE events of one reply; an error after the start is an ``error`` event."""
    return guarded(
        run, _events(run, msg_id), lambda exc: {"event": "error", "data": dumps(error_body(exc))}
    )


@router.post("/v1/messages")
async def create_message(http: Request) -> Response:
    state = app_state(http)
    req = await parse_body(http, MessagesRequest)
    if req.max_tokens is None:
        raise BadRequest("max_tokens: Field required", param="max_tokens")
    chat = to_chat_request(req)
    run = await start_run(http, chat, state.router.pick(chat), cap_max_tokens=True)
    msg_id = message_id()
    headers = {"x-mlxd-model": run.model, "request-id": msg_id}
    if req.stream:
        return sse_response(stream(run, msg_id), run, state.settings.sse_ping_seconds, headers)
    body = await until_disconnected(http, run, message(run, msg_id))
    if body is None:
        return Response(status_code=499)  # the client is gone
    return JSONResponse(body, headers=headers)


@router.post("/v1/messages/count_tokens")
async def count_tokens(http: Request) -> dict[str, int]:
    state = app_state(http)
    chat = to_chat_request(await parse_body(http, MessagesRequest))
    prepared = await state.chat.prepare(chat, state.router.pick(chat), cap_max_tokens=True)
    return {"input_tokens": len(prepared.prompt)}
