"""The prompt of a chat request: OpenAI messages rendered through the model's chat template.

Tool definitions go to the template (``tools=``), or into the system message when the template
drops them (:mod:`mlxd.tool_prompt`); a conversation that ends with an assistant message is
continued rather than answered (a prefill).
"""

from __future__ import annotations

import json
from typing import Any

from mlxd.config import ModelEntry
from mlxd.errors import BadRequest
from mlxd.protocol import ChatRequest, Message
from mlxd.tool_prompt import template_ignores_tools, with_tools_in_system
from mlxd.toolformats import ToolCallFormat


def template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """OpenAI messages → the dicts chat templates expect.

    Templates iterate tool-call arguments as a mapping (Qwen3.5's XML form) or print them
    (Qwen3's JSON form), so arguments sent as a JSON string are decoded when they parse.
    """
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        item: dict[str, Any] = {
            "role": "system" if msg.role == "developer" else msg.role,
            "content": msg.text(),
        }
        if msg.name:
            item["name"] = msg.name
        if msg.tool_call_id:
            item["tool_call_id"] = msg.tool_call_id
        reasoning = msg.reasoning_content or msg.reasoning
        if reasoning:
            item["reasoning_content"] = reasoning
        if msg.tool_calls:
            calls = []
            for j, call in enumerate(msg.tool_calls):
                args: Any = call.function.arguments
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError:
                        raise BadRequest(
                            "tool call arguments must be a JSON string",
                            param=f"messages[{i}].tool_calls[{j}].function.arguments",
                        ) from None
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": args},
                    }
                )
            item["tool_calls"] = calls
        out.append(item)
    return out


def template_kwargs(request: ChatRequest, entry: ModelEntry) -> dict[str, Any]:
    kwargs = dict(entry.chat_template_kwargs)
    if request.reasoning_effort is not None:
        kwargs["enable_thinking"] = request.reasoning_effort not in ("none", "minimal")
        kwargs["reasoning_effort"] = request.reasoning_effort
    kwargs.update(request.chat_template_kwargs or {})
    return kwargs


def render_prompt(
    tokenizer: Any,
    request: ChatRequest,
    entry: ModelEntry,
    tools: list[dict[str, Any]] | None,
    fmt: ToolCallFormat | None,
) -> str:
    """The prompt text; `fmt`, the model's call format, comes with `tools` (for the hint)."""
    messages = template_messages(request.messages)
    if tools and template_ignores_tools(tokenizer, entry.id):
        assert fmt is not None, "tools come with their call format"
        messages, tools = with_tools_in_system(messages, tools, fmt), None
    continue_final = messages[-1]["role"] == "assistant"
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
            **template_kwargs(request, entry),
        )
    except Exception as exc:  # template errors are the request's fault (e.g. role order)
        raise BadRequest(
            f"the chat template of {entry.id!r} rejected the messages: {exc}", param="messages"
        ) from None
    return str(text)
