"""Chat-service events → OpenAI JSON: SSE chunks, or one folded completion.

Both renderings consume the same ``ChatRun.events()`` stream, so a streamed reply joined together
equals the non-streamed reply for the same request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from server.chat import ChatRun, Delta, Finish
from server.errors import EngineFailure, MlxdError
from server.fold import fold
from server.parsers.hermes import ToolCallDelta
from server.protocol import dumps, usage_dict

SYSTEM_FINGERPRINT = "mlxd"


def _usage(finish: Finish) -> dict[str, Any]:
    u = finish.usage
    return usage_dict(u.prompt_tokens, u.completion_tokens, u.cached_tokens)


def _tool_call_chunk(call: ToolCallDelta) -> dict[str, Any]:
    item: dict[str, Any] = {"index": call.index}
    function: dict[str, Any] = {"arguments": call.arguments}
    if call.id is not None:
        item["id"] = call.id
        item["type"] = "function"
    if call.name is not None:
        function["name"] = call.name
    item["function"] = function
    return item


class ChunkWriter:
    """Frames one run's events as ``chat.completion.chunk`` JSON strings."""

    def __init__(self, run: ChatRun) -> None:
        # The envelope is constant; only the choices change, so it is encoded once.
        head = dumps(
            {
                "id": run.id,
                "object": "chat.completion.chunk",
                "created": run.created,
                "model": run.model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
        )
        self._prefix = head[:-1] + ',"choices":['
        self._head = head

    def choice(
        self, delta: dict[str, Any], finish_reason: str | None = None, detail: str | None = None
    ) -> str:
        body = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if detail:
            body["finish_detail"] = detail  # why the server ended it early
        return self._prefix + dumps(body) + "]}"

    def content(self, text: str) -> str:
        # The hot path (one call per token): skip building the dict around the text.
        return self._prefix + '{"index":0,"delta":{"content":' + dumps(text) + (
            '},"logprobs":null,"finish_reason":null}]}'
        )  # fmt: skip

    def delta(self, event: Delta) -> list[str]:
        out: list[str] = []
        if event.reasoning:
            out.append(self.choice({"reasoning_content": event.reasoning}))
        if event.content:
            out.append(self.content(event.content))
        if event.tool_calls:
            calls = [_tool_call_chunk(c) for c in event.tool_calls]
            out.append(self.choice({"tool_calls": calls}))
        return out

    def usage(self, finish: Finish) -> str:
        return self._head[:-1] + ',"choices":[],"usage":' + dumps(_usage(finish)) + "}"


async def sse_events(run: ChatRun, include_usage: bool) -> AsyncIterator[str]:
    """The ``data:`` payloads of a streamed reply, ending with ``[DONE]``."""
    writer = ChunkWriter(run)
    try:
        yield writer.choice({"role": "assistant", "content": ""})
        async for event in run.events():
            if isinstance(event, Finish):
                yield writer.choice({}, event.reason, event.detail)
                if include_usage:
                    yield writer.usage(event)
            else:
                for frame in writer.delta(event):
                    yield frame
    except MlxdError as exc:
        # Headers are gone already: report in-band, the way OpenAI streams errors.
        yield dumps(exc.to_dict())
    except Exception as exc:
        yield dumps(EngineFailure(f"{type(exc).__name__}: {exc}").to_dict())
    finally:
        await run.aclose()
    yield "[DONE]"


async def completion(run: ChatRun) -> dict[str, Any]:
    """Fold one run's events into a ``chat.completion`` object."""
    folded = await fold(run)
    message: dict[str, Any] = {"role": "assistant", "content": folded.content}
    if folded.calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in folded.calls
        ]
        if not message["content"]:
            message["content"] = None
    if folded.reasoning:
        message["reasoning_content"] = folded.reasoning
    finish = folded.finish
    choice: dict[str, Any] = {
        "index": 0, "message": message, "logprobs": None, "finish_reason": finish.reason
    }  # fmt: skip
    if finish.detail:
        choice["finish_detail"] = finish.detail  # why the server ended it early
    return {
        "id": run.id,
        "object": "chat.completion",
        "created": run.created,
        "model": run.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [choice],
        "usage": _usage(finish),
    }
