"""OpenAI Responses API (``/v1/responses``) onto the chat service.

``input`` (a string or items: ``message``, ``function_call``, ``function_call_output``,
``reasoning``) and ``instructions`` become chat messages; the run's content blocks become output
items (``reasoning``, ``message`` with ``output_text``, ``function_call``). A stream sends the
typed events the SDKs parse, each with a ``sequence_number``::

    response.created, response.in_progress,
    per item: response.output_item.added, [response.content_part.added],
              response.output_text.delta* | response.reasoning_text.delta* |
              response.function_call_arguments.delta*,
              …done events…, response.output_item.done
    response.completed (or response.incomplete when max_output_tokens cut it)

``previous_response_id`` continues a stored conversation: replies are kept (unless
``store: false``) in a bounded in-memory store, oldest dropped first.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from mlxd.api import sse_response, start_run, until_disconnected
from mlxd.apis.common import (
    BlockEvent,
    Blocks,
    app_state,
    chat_request,
    guarded,
    parse_body,
)
from mlxd.chat import ChatRun, Finish
from mlxd.errors import BadRequest, MlxdError, NotFound
from mlxd.fold import Call, Folded, fold
from mlxd.protocol import ChatRequest, Temperature, TopP, dumps

router = APIRouter()

STORE_SIZE = 256


class ResponseTool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: dict[str, Any] | None = None


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="allow")
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[ResponseTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: Temperature = None
    top_p: TopP = None
    reasoning: Reasoning | None = None
    text: TextConfig | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    background: bool = False
    include: list[str] | None = None
    metadata: dict[str, Any] | None = None


@dataclass
class Stored:
    response: dict[str, Any]
    messages: list[dict[str, Any]]  # the conversation including this reply, as chat messages


class ResponseStore:
    """The last ``size`` stored responses, for ``GET`` and ``previous_response_id``."""

    def __init__(self, size: int = STORE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, item: Stored) -> None:
        self._items[item.response["id"]] = item
        self._items.move_to_end(item.response["id"])
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, response_id: str, param: str = "response_id") -> Stored:
        item = self._items.get(response_id)
        if item is None:
            raise NotFound(f"Response with id {response_id!r} not found.", param=param)
        return item


def _text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest("content must be a string or a list of parts", param=param)
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            raise BadRequest(
                f"content part type {kind!r} is not supported (only text)",
                param=f"{param}[{i}].type",
            )
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input items → chat messages; calls join the assistant turn they follow."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    reasoning = ""

    def assistant() -> dict[str, Any]:
        nonlocal reasoning
        if not out or out[-1]["role"] != "assistant":
            out.append({"role": "assistant", "content": ""})
        if reasoning:
            out[-1]["reasoning_content"] = reasoning
            reasoning = ""
        return out[-1]

    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequest(f"unknown role {role!r}", param=f"{where}.role")
            text = _text(item.get("content"), f"{where}.content")
            if role == "assistant":
                msg = assistant()
                msg["content"] += text
            else:
                out.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            if not item.get("call_id") or not item.get("name"):
                raise BadRequest("function_call items need 'call_id' and 'name'", param=where)
            msg = assistant()
            msg.setdefault("tool_calls", []).append(
                {
                    "id": item["call_id"],
                    "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"},
                }
            )
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, f"{where}.output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            text = _text(parts, f"{where}.content")
            opaque = item.get("encrypted_content")
            reasoning += text or (opaque if isinstance(opaque, str) else "")
        else:
            raise BadRequest(f"input item type {kind!r} is not supported", param=f"{where}.type")
    return out


def chat_fields(req: ResponsesRequest, history: list[dict[str, Any]]) -> dict[str, Any]:
    if req.background:
        raise BadRequest("background responses are not supported", param="background")
    messages = list(history)
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    messages += input_messages(req.input)
    if not messages:
        raise BadRequest("input must not be empty", param="input")
    data: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "parallel_tool_calls": req.parallel_tool_calls,
    }
    if req.tools:
        tools = []
        for i, tool in enumerate(req.tools):
            if tool.type != "function" or not tool.name:
                raise BadRequest(
                    f"tool type {tool.type!r} is not available; only named 'function' tools are",
                    param=f"tools[{i}].type",
                )
            tools.append(
                {
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": tool.description,
                        "parameters": tool.parameters or {"type": "object", "properties": {}},
                    },
                }
            )
        data["tools"] = tools
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not choice.get("name"):
            raise BadRequest(
                "tool_choice must be 'auto', 'none', 'required' or "
                "{'type': 'function', 'name': ...}",
                param="tool_choice",
            )
        data["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None:
        data["tool_choice"] = choice
    if req.reasoning is not None and req.reasoning.effort is not None:
        effort = req.reasoning.effort
        data["reasoning_effort"] = "high" if effort == "xhigh" else effort
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.get("type") != "text":
        # Structured output belongs to the chat path: its response_format, in chat's shape.
        if fmt.get("type") == "json_schema":
            schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
            data["response_format"] = {"type": "json_schema", "json_schema": schema}
        else:
            data["response_format"] = {"type": fmt.get("type")}
    return data


def to_chat_request(req: ResponsesRequest, history: list[dict[str, Any]]) -> ChatRequest:
    return chat_request(chat_fields(req, history))


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(finish: Finish, reasoning_tokens: int) -> dict[str, Any]:
    u = finish.usage
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


class Shape:
    """The response envelope and items of one reply (ids fixed up front, so a stream and its
    final ``response.completed`` agree)."""

    def __init__(self, req: ResponsesRequest, run: ChatRun) -> None:
        self.id = new_id("resp")
        self.created = int(time.time())
        self.req = req
        self.run = run
        self.opaque = "reasoning.encrypted_content" in (req.include or [])

    def envelope(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        req = self.req
        fmt = (req.text.format if req.text is not None else None) or {"type": "text"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.run.model,
            "output": output,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "previous_response_id": req.previous_response_id,
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None},
            "text": {"format": fmt},
            "store": req.store,
            "metadata": req.metadata or {},
            "error": None,
            "incomplete_details": None,
            "usage": None,
        }

    def finished(self, finish: Finish, output: list[dict[str, Any]]) -> dict[str, Any]:
        incomplete = finish.reason == "length"
        body = self.envelope("incomplete" if incomplete else "completed", output)
        if incomplete:
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        reasoning = "".join(
            part["text"]
            for item in output
            if item["type"] == "reasoning"
            for part in item.get("content") or []
        )
        tokens = (
            len(self.run.prepared.tokenizer.encode(reasoning, add_special_tokens=False))
            if reasoning
            else 0
        )
        body["usage"] = usage(finish, tokens)
        return body


def reasoning_item(
    item_id: str, text: str, status: str = "completed", opaque: bool = False
) -> dict[str, Any]:
    """``opaque``: also in ``encrypted_content`` (asked for by ``include``), which clients that
    do not store responses (Codex CLI with ``store: false``) send back to continue a turn; here it
    is the reasoning text itself, as there is nothing to hide from the machine that wrote it."""
    content = [{"type": "reasoning_text", "text": text}] if text else []
    item = {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}
    if opaque and status == "completed":
        item["encrypted_content"] = text
    return item


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    content = [] if text is None else [text_part(text)]
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def call_item(item_id: str, call: Call, status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if status == "completed" else "",
        "status": status,
    }


def output_items(folded: Folded, opaque: bool = False) -> list[dict[str, Any]]:
    out = []
    if folded.reasoning:
        out.append(reasoning_item(new_id("rs"), folded.reasoning, opaque=opaque))
    if folded.content or not folded.calls:
        out.append(message_item(new_id("msg"), folded.content))
    out += [call_item(new_id("fc"), call) for call in folded.calls]
    return out


def reply_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A reply's output items as the chat messages a follow-up request continues from."""
    return input_messages([{k: v for k, v in item.items() if k != "id"} for item in output])


class Events:
    """Typed stream events with a running ``sequence_number``."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # finished output items
        self._item_id = ""

    def event(self, kind: str, **data: Any) -> dict[str, str]:
        payload = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return {"event": kind, "data": dumps(payload)}

    def block(self, ev: BlockEvent) -> list[dict[str, str]]:
        i = ev.index
        if ev.action == "open":
            prefix = {"reasoning": "rs", "text": "msg", "tool": "fc"}[ev.kind]
            self._item_id = new_id(prefix)
            if ev.kind == "reasoning":
                item = reasoning_item(self._item_id, "", "in_progress")
            elif ev.kind == "text":
                item = message_item(self._item_id, None, "in_progress")
            else:
                assert ev.call is not None
                item = call_item(self._item_id, ev.call, "in_progress")
            out = [self.event("response.output_item.added", output_index=i, item=item)]
            if ev.kind == "text":
                out.append(
                    self.event(
                        "response.content_part.added",
                        item_id=self._item_id,
                        output_index=i,
                        content_index=0,
                        part=text_part(""),
                    )
                )
            return out
        where = {"item_id": self._item_id, "output_index": i}
        if ev.action == "delta":
            if ev.kind == "tool":
                return [
                    self.event("response.function_call_arguments.delta", **where, delta=ev.text)
                ]
            if ev.kind == "reasoning":
                return [
                    self.event(
                        "response.reasoning_text.delta", **where, content_index=0, delta=ev.text
                    )
                ]
            return [
                self.event(
                    "response.output_text.delta",
                    **where,
                    content_index=0,
                    delta=ev.text,
                    logprobs=[],
                )
            ]
        if ev.kind == "tool":
            assert ev.call is not None
            item = call_item(self._item_id, ev.call)
            out = [
                self.event(
                    "response.function_call_arguments.done",
                    **where,
                    arguments=ev.call.arguments,
                    name=ev.call.name,
                )
            ]
        elif ev.kind == "reasoning":
            item = reasoning_item(self._item_id, ev.text, opaque=self.shape.opaque)
            out = [
                self.event("response.reasoning_text.done", **where, content_index=0, text=ev.text)
            ]
        else:
            item = message_item(self._item_id, ev.text)
            out = [
                self.event(
                    "response.output_text.done", **where, content_index=0, text=ev.text, logprobs=[]
                ),
                self.event(
                    "response.content_part.done", **where, content_index=0, part=text_part(ev.text)
                ),
            ]
        self.items.append(item)
        return [*out, self.event("response.output_item.done", output_index=i, item=item)]


async def _events(
    events: Events, remember: Callable[[dict[str, Any]], None]
) -> AsyncIterator[dict[str, str]]:
    shape = events.shape
    blocks = Blocks()
    yield events.event("response.created", response=shape.envelope("in_progress", []))
    yield events.event("response.in_progress", response=shape.envelope("in_progress", []))
    async for ev in shape.run.events():
        if isinstance(ev, Finish):
            for block in blocks.close():
                for frame in events.block(block):
                    yield frame
            body = shape.finished(ev, events.items)
            remember(body)
            yield events.event(f"response.{body['status']}", response=body)
            continue
        for block in blocks.feed(ev):
            for frame in events.block(block):
                yield frame


def stream(
    shape: Shape, remember: Callable[[dict[str, Any]], None]
) -> AsyncIterator[dict[str, str]]:
    """The typed events of one reply; an error after the start is an ``error`` event."""
    events = Events(shape)

    def error(exc: MlxdError) -> dict[str, str]:
        return events.event("error", code=exc.code, message=exc.message, param=exc.param)

    return guarded(shape.run, _events(events, remember), error)


def _store(http: Request) -> ResponseStore:
    store: ResponseStore = http.app.state.mlxd_responses
    return store


@router.post("/v1/responses")
async def create_response(http: Request) -> Response:
    state = app_state(http)
    store = _store(http)
    req = await parse_body(http, ResponsesRequest)
    history: list[dict[str, Any]] = []
    if req.previous_response_id:
        history = store.get(req.previous_response_id, "previous_response_id").messages
    chat = to_chat_request(req, history)
    turn = [m.model_dump(exclude_none=True) for m in chat.messages]
    if req.instructions:
        turn = turn[1:]  # instructions apply to this request only, not to later turns

    def remember(body: dict[str, Any]) -> None:
        if req.store:
            store.put(Stored(body, turn + reply_messages(body["output"])))

    run = await start_run(http, chat, state.router.pick(chat))
    shape = Shape(req, run)
    headers = {"x-mlxd-model": run.model}
    if req.stream:
        events = stream(shape, remember)
        return sse_response(events, run, state.settings.sse_ping_seconds, headers)
    folded = await until_disconnected(http, run, fold(run))
    if folded is None:
        return Response(status_code=499)  # the client is gone
    body = shape.finished(folded.finish, output_items(folded, shape.opaque))
    remember(body)
    return JSONResponse(body, headers=headers)


@router.get("/v1/responses/{response_id}")
async def get_response(http: Request, response_id: str) -> dict[str, Any]:
    return _store(http).get(response_id).response
