"""Chat-service events → OpenAI JSON: SSE chunks, or one folded completion.

Both renderings consume the same ``ChatRun.events()`` stream, so a streamed reply joined together
equals the non-streamed reply for the same request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from mlxd.chat import ChatRun, Delta, Finish
from mlxd.errors import EngineFailure, MlxdError
from mlxd.fold import Folded, fold_choices
from mlxd.parsers.base import ToolCallDelta
from mlxd.protocol import dumps, usage_dict

SYSTEM_FINGERPRINT = "mlxd"


def _usage(finishes: list[Finish]) -> dict[str, Any]:
    """One usage for all choices: the prompt once, every choice's completion tokens."""
    first = finishes[0].usage
    completion_tokens = sum(f.usage.completion_tokens for f in finishes)
    return usage_dict(first.prompt_tokens, completion_tokens, first.cached_tokens)


def _logprobs(event: Delta) -> dict[str, Any] | None:
    return {"content": [t.to_dict() for t in event.logprobs]} if event.logprobs else None


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
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        index: int = 0,
        logprobs: dict[str, Any] | None = None,
        detail: str | None = None,
    ) -> str:
        body = {"index": index, "delta": delta, "logprobs": logprobs,
                "finish_reason": finish_reason}  # fmt: skip
        if detail:
            body["finish_detail"] = detail  # why the server ended it early
        return self._prefix + dumps(body) + "]}"

    def content(self, text: str, index: int = 0) -> str:
        # The hot path (one call per token): skip building the dict around the text.
        return self._prefix + f'{{"index":{index},"delta":{{"content":' + dumps(text) + (
            '},"logprobs":null,"finish_reason":null}]}'
        )  # fmt: skip

    def delta(self, event: Delta) -> list[str]:
        out: list[str] = []
        i = event.index
        if event.reasoning:
            out.append(self.choice({"reasoning_content": event.reasoning}, index=i))
        if event.content:
            if event.logprobs:
                out.append(self.choice({"content": event.content}, None, i, _logprobs(event)))
            else:
                out.append(self.content(event.content, i))
        elif event.logprobs:  # the token's text is held back (a possible stop or tag)
            out.append(self.choice({"content": ""}, None, i, _logprobs(event)))
        if event.tool_calls:
            calls = [_tool_call_chunk(c) for c in event.tool_calls]
            out.append(self.choice({"tool_calls": calls}, index=i))
        return out

    def usage(self, finishes: list[Finish]) -> str:
        return self._head[:-1] + ',"choices":[],"usage":' + dumps(_usage(finishes)) + "}"


async def sse_events(run: ChatRun, include_usage: bool) -> AsyncIterator[str]:
    """The ``data:`` payloads of a streamed reply, ending with ``[DONE]``."""
    writer = ChunkWriter(run)
    finishes: list[Finish] = []
    try:
        for index in range(len(run.generations)):
            yield writer.choice({"role": "assistant", "content": ""}, index=index)
        async for event in run.events():
            if isinstance(event, Finish):
                finishes.append(event)
                yield writer.choice({}, event.reason, event.index, detail=event.detail)
                if include_usage and len(finishes) == len(run.generations):
                    yield writer.usage(finishes)
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


def _choice(index: int, folded: Folded, with_logprobs: bool) -> dict[str, Any]:
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
    logprobs = {"content": [t.to_dict() for t in folded.logprobs]} if with_logprobs else None
    choice: dict[str, Any] = {"index": index, "message": message, "logprobs": logprobs,
                              "finish_reason": folded.finish.reason}  # fmt: skip
    if folded.finish.detail:
        choice["finish_detail"] = folded.finish.detail  # why the server ended it early
    return choice


async def completion(run: ChatRun) -> dict[str, Any]:
    """Fold one run's events (``n`` choices) into a ``chat.completion`` object."""
    choices = await fold_choices(run)
    with_logprobs = run.prepared.logprobs is not None
    return {
        "id": run.id,
        "object": "chat.completion",
        "created": run.created,
        "model": run.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [_choice(i, c, with_logprobs) for i, c in enumerate(choices)],
        "usage": _usage([c.finish for c in choices]),
    }
