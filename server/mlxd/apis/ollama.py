"""Ollama's API (``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``) onto the chat service, so apps that speak only Ollama can use mlxd.

Replies stream as NDJSON by default (``"stream": false`` for one object); the last line has
``done: true``, ``done_reason`` and the token counts and durations (nanoseconds) Ollama reports.
``options`` map onto chat sampling (``num_predict`` → max_tokens, ``repeat_penalty`` →
repetition_penalty); ``num_ctx`` and other runner options are accepted, the context comes from
models.yaml. Tool calls go out whole, one chunk per call, with ``arguments`` as an object.
A chat without messages (a generate without a prompt) loads the model, or unloads it with
``keep_alive: 0``. Errors are ``{"error": "..."}`` with the status code of mlxd's error.
Model names may carry Ollama's ``:latest`` tag.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from mlxd.api import check_model_changes, refuse_if_draining, start_run, until_disconnected
from mlxd.apis.common import (
    Blocks,
    app_state,
    arguments_object,
    chat_request,
    error_route,
    guarded,
    json_arguments,
    parse_body,
)
from mlxd.apis.completions import build_prompt, fim_style
from mlxd.chat import ChatRun, Finish, context_limit
from mlxd.config import ModelEntry, parse_duration
from mlxd.errors import BadRequest, MlxdError
from mlxd.estimate.files import read_config
from mlxd.fold import Call, fold
from mlxd.manager import KeepAlive
from mlxd.protocol import ChatRequest, dumps
from mlxd.state import AppState

# The Ollama release whose API this follows; clients gate features (tools, think) on it.
OLLAMA_API_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"


def error_body(exc: MlxdError) -> dict[str, Any]:
    return {"error": exc.message}


router = APIRouter(route_class=error_route(error_body))


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    num_predict: int | None = None
    num_ctx: int | None = Field(default=None, ge=1)
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | None = None
    thinking: str | None = None
    images: list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None


class Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    format: str | dict[str, Any] | None = None
    options: Options = Field(default_factory=Options)
    stream: bool = True
    keep_alive: str | int | float | None = None
    think: bool | str | None = None
    tools: list[dict[str, Any]] | None = None


class ChatBody(Common):
    messages: list[OllamaMessage] = Field(default_factory=list)


class GenerateBody(Common):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    images: list[Any] | None = None
    context: list[int] | None = None


class ShowBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None
    verbose: bool = False


def local_name(name: str) -> str:
    """Ollama names carry a tag; ``:latest`` is the only one a configured model has."""
    return name.removesuffix(":latest")


def messages_of(body: ChatBody) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(body.messages):
        if msg.images:
            raise BadRequest("images are not supported", param=f"messages[{i}].images")
        item: dict[str, Any] = {"role": msg.role, "content": msg.content or ""}
        if msg.thinking:
            item["reasoning_content"] = msg.thinking
        if msg.tool_calls:
            calls = []
            for j, call in enumerate(msg.tool_calls):
                where = f"messages[{i}].tool_calls[{j}].function"
                fn = call.get("function") or {}
                if not fn.get("name"):
                    raise BadRequest("tool calls need a function name", param=f"{where}.name")
                args = json_arguments(fn.get("arguments", {}), f"{where}.arguments")
                calls.append(
                    {
                        "id": call.get("id") or f"call_{i}_{j}",
                        "type": "function",
                        "function": {"name": fn["name"], "arguments": args},
                    }
                )
            item["tool_calls"] = calls
        if msg.tool_name:
            item["name"] = msg.tool_name
        out.append(item)
    return out


def chat_fields(body: Common, messages: list[dict[str, Any]]) -> dict[str, Any]:
    o = body.options
    limit = o.num_predict if o.num_predict is not None and o.num_predict > 0 else None
    data: dict[str, Any] = {
        "model": local_name(body.model),
        "messages": messages,
        "max_tokens": limit,
        "temperature": o.temperature,
        "top_p": o.top_p,
        "top_k": o.top_k,
        "min_p": o.min_p,
        "seed": o.seed,
        "stop": o.stop or None,
        "repetition_penalty": o.repeat_penalty,
        "presence_penalty": o.presence_penalty,
        "frequency_penalty": o.frequency_penalty,
        "keep_alive": body.keep_alive,
    }
    if body.tools:
        data["tools"] = body.tools
    if isinstance(body.think, bool):
        data["chat_template_kwargs"] = {"enable_thinking": body.think}
    elif body.think is not None:
        data["reasoning_effort"] = body.think
    if body.format == "json":
        data["response_format"] = {"type": "json_object"}
    elif isinstance(body.format, dict):
        data["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "ollama", "schema": body.format},
        }
    elif body.format:
        raise BadRequest(
            f"format must be 'json' or a JSON schema, got {body.format!r}", param="format"
        )
    if isinstance(data["keep_alive"], float):
        data["keep_alive"] = f"{data['keep_alive']}s"
    return data


def to_chat_request(body: Common, messages: list[dict[str, Any]]) -> ChatRequest:
    return chat_request(chat_fields(body, messages))


def timestamp(at: float | None = None) -> str:
    moment = datetime.fromtimestamp(at if at is not None else time.time(), timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


def tool_call(call: Call) -> dict[str, Any]:
    return {"function": {"name": call.name, "arguments": arguments_object(call.arguments)}}


class Reply:
    """The chunks of one Ollama reply: ``message`` objects for chat, ``response`` text for
    generate, and the final ``done`` line with counts and durations."""

    def __init__(self, name: str, run: ChatRun, chat: bool, t0: float) -> None:
        self.name, self.run, self.chat, self.t0 = name, run, chat, t0
        self.loaded_at = time.perf_counter()

    def chunk(
        self, content: str = "", thinking: str = "", calls: list[Call] | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.name, "created_at": timestamp()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = [tool_call(c) for c in calls]
            out["message"] = message
        else:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
        out["done"] = False
        return out

    def done(self, finish: Finish, **message: Any) -> dict[str, Any]:
        out = self.chunk(**message)
        end = time.perf_counter()
        first = self.run.first_token_at or end
        ns = 1_000_000_000
        out.update(
            {
                "done": True,
                "done_reason": "length" if finish.reason == "length" else "stop",
                "total_duration": int((end - self.t0) * ns),
                "load_duration": int((self.loaded_at - self.t0) * ns),
                "prompt_eval_count": finish.usage.prompt_tokens,
                "prompt_eval_duration": int((first - self.run.started_at) * ns),
                "eval_count": finish.usage.completion_tokens,
                "eval_duration": int((end - first) * ns),
            }
        )
        return out


async def _lines(reply: Reply) -> AsyncIterator[str]:
    blocks = Blocks()
    async for event in reply.run.events():
        if isinstance(event, Finish):
            for close in blocks.close():
                if close.kind == "tool" and close.call is not None:
                    yield dumps(reply.chunk(calls=[close.call])) + "\n"
            yield dumps(reply.done(event)) + "\n"
            continue
        for block in blocks.feed(event):
            if block.action == "delta" and block.kind == "text":
                yield dumps(reply.chunk(content=block.text)) + "\n"
            elif block.action == "delta" and block.kind == "reasoning":
                yield dumps(reply.chunk(thinking=block.text)) + "\n"
            elif block.action == "close" and block.kind == "tool" and block.call is not None:
                yield dumps(reply.chunk(calls=[block.call])) + "\n"


def ndjson(reply: Reply) -> AsyncIterator[str]:
    """One JSON object per line; an error after the start is an ``{"error": ...}`` line."""
    return guarded(reply.run, _lines(reply), lambda exc: dumps(error_body(exc)) + "\n")


async def answer(http: Request, reply: Reply, stream: bool) -> Response:
    if stream:
        return StreamingResponse(
            ndjson(reply), media_type=NDJSON, background=BackgroundTask(reply.run.aclose)
        )
    folded = await until_disconnected(http, reply.run, fold(reply.run))
    if folded is None:
        return Response(status_code=499)  # the client is gone
    return JSONResponse(
        reply.done(
            folded.finish, content=folded.content, thinking=folded.reasoning, calls=folded.calls
        )
    )


async def load_or_unload(http: Request, body: Common, is_chat: bool) -> Response:
    """Ollama's way to (un)load: a request with nothing to generate (the same rights apply as
    for a generation: unloading or a first download needs a trusted caller)."""
    state = app_state(http)
    refuse_if_draining(http)
    entry = state.router.pick_name(local_name(body.model))
    check_model_changes(http, to_chat_request(body, [{"role": "user", "content": ""}]), entry)
    try:
        seconds = parse_duration(body.keep_alive) if body.keep_alive is not None else None
    except ValueError as exc:
        raise BadRequest(str(exc), param="keep_alive") from None
    if body.keep_alive is not None and seconds == 0:
        if state.manager.resident == entry:
            await state.manager.unload()
        reason = "unload"
    else:
        keep = KeepAlive(seconds) if body.keep_alive is not None else None
        async with state.manager.acquire(entry, keep_alive=keep):
            pass
        reason = "load"
    out: dict[str, Any] = {"model": body.model, "created_at": timestamp()}
    if is_chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out.update({"done": True, "done_reason": reason})
    return JSONResponse(out)


@router.post("/api/chat")
async def chat(http: Request) -> Response:
    t0 = time.perf_counter()
    state = app_state(http)
    body = await parse_body(http, ChatBody)
    if not body.messages:
        return await load_or_unload(http, body, is_chat=True)
    chat = to_chat_request(body, messages_of(body))
    run = await start_run(http, chat, state.router.pick(chat), cap_max_tokens=True)
    return await answer(http, Reply(body.model, run, True, t0), body.stream)


@router.post("/api/generate")
async def generate(http: Request) -> Response:
    t0 = time.perf_counter()
    state = app_state(http)
    body = await parse_body(http, GenerateBody)
    if body.images:
        raise BadRequest("images are not supported", param="images")
    if body.template:
        raise BadRequest(
            "a custom template is not supported (the model's own is used)", param="template"
        )
    if body.context:
        raise BadRequest(
            "'context' is not supported; send the conversation to /api/chat", param="context"
        )
    if not body.prompt and body.suffix is None:
        return await load_or_unload(http, body, is_chat=False)
    if body.raw or body.suffix is not None:
        chat = to_chat_request(body, [{"role": "user", "content": ""}])
        entry = state.router.pick(chat)
        tokenizer = await state.registry.tokenizer(entry)
        ids, stops = build_prompt(tokenizer, entry.id, body.prompt, body.suffix)
        if stops:
            chat = chat.model_copy(update={"stop": chat.stop_list + stops})
        run = await start_run(http, chat, entry, raw_prompt=ids, cap_max_tokens=True)
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": body.prompt})
        chat = to_chat_request(body, messages)
        run = await start_run(http, chat, state.router.pick(chat), cap_max_tokens=True)
    return await answer(http, Reply(body.model, run, False, t0), body.stream)


def _digest(entry: ModelEntry) -> str:
    return hashlib.sha256(entry.model_dump_json().encode()).hexdigest()


def _config(state: AppState, entry: ModelEntry) -> dict[str, Any]:
    if not state.registry.is_present(entry):
        return {}
    try:
        return read_config(state.registry.model_dir(entry), entry.id)
    except MlxdError:
        return {}


def details(state: AppState, entry: ModelEntry) -> dict[str, Any]:
    config = _config(state, entry)
    family = str(config.get("model_type") or "")
    bits = (config.get("quantization") or {}).get("bits")
    return {
        "parent_model": "",
        "format": "mlx",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": "",
        "quantization_level": f"Q{bits}" if bits else "",
    }


def _modified(state: AppState, entry: ModelEntry) -> str:
    if state.registry.is_present(entry):
        try:
            return timestamp(state.registry.model_dir(entry).stat().st_mtime)
        except OSError:
            pass
    return timestamp(state.started)


def model_item(state: AppState, entry: ModelEntry) -> dict[str, Any]:
    name = f"{entry.id}:latest"
    return {
        "name": name,
        "model": name,
        "modified_at": _modified(state, entry),
        "size": state.router.weights_estimate(entry) or 0,
        "digest": _digest(entry),
        "details": details(state, entry),
    }


@router.get("/api/tags")
async def tags(http: Request) -> dict[str, Any]:
    state = app_state(http)
    return {"models": [model_item(state, e) for e in state.registry.entries]}


@router.get("/api/ps")
async def ps(http: Request) -> dict[str, Any]:
    state = app_state(http)
    entry, loaded = state.manager.resident, state.manager.loaded
    if entry is None or loaded is None:
        return {"models": []}
    item = model_item(state, entry)
    del item["modified_at"]
    context = context_limit(entry, loaded.config)
    item.update(
        {
            "size": loaded.active_bytes,
            "size_vram": loaded.active_bytes,
            "expires_at": None,
            "context_length": context,
        }
    )
    return {"models": [item]}


@router.post("/api/show")
async def show(http: Request) -> dict[str, Any]:
    state = app_state(http)
    body = await parse_body(http, ShowBody)
    name = body.model or body.name
    if not name:
        raise BadRequest("model: Field required", param="model")
    entry = state.router.pick_name(local_name(name))
    tokenizer = await state.registry.tokenizer(entry)
    config = await state.registry.config(entry)
    template = str(getattr(tokenizer, "chat_template", None) or "")
    capabilities = ["completion"]
    if "tools" in template:
        capabilities.append("tools")
    if tokenizer.has_thinking:
        capabilities.append("thinking")
    fim = fim_style(tokenizer)
    if fim is not None:
        capabilities.append("insert")
        # Clients (Continue) look for ".Suffix" in an Ollama template to decide whether a model
        # can fill in the middle; this line says, in Ollama's template syntax, how mlxd frames it.
        style = fim[0]
        fim_line = (
            f"{{{{- if .Suffix }}}}{style.prefix}{{{{ .Prompt }}}}{style.suffix}"
            f"{{{{ .Suffix }}}}{style.middle}{{{{- end }}}}\n"
        )
        template = fim_line + template
    arch = str(config.get("model_type") or "unknown")
    info: dict[str, Any] = {
        "general.architecture": arch,
        f"{arch}.context_length": context_limit(entry, config),
    }
    for key, suffix in (
        ("hidden_size", "embedding_length"),
        ("num_hidden_layers", "block_count"),
        ("num_attention_heads", "attention.head_count"),
        ("num_key_value_heads", "attention.head_count_kv"),
    ):
        if isinstance(config.get(key), int):
            info[f"{arch}.{suffix}"] = config[key]
    defaults = entry.defaults.model_dump(exclude_none=True)
    parameters = "\n".join(f"{k} {v}" for k, v in defaults.items())
    return {
        "modelfile": f"# served by mlxd from models.yaml entry {entry.id!r}\n",
        "parameters": parameters,
        "template": template,
        "details": details(state, entry),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": _modified(state, entry),
    }


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION}
