"""A run's events folded into one reply: what every API's non-streamed answer is built from.

Streams and folded replies consume the same ``ChatRun.events()``, so a stream joined together
equals the folded reply for the same request.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.chat import ChatRun, Finish


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class Folded:
    """A whole run: what a non-streamed reply is built from."""

    content: str
    reasoning: str
    calls: list[Call]
    finish: Finish


async def fold(run: ChatRun) -> Folded:
    """Calls the parser announced and then found malformed are left out (their text is in
    ``content``)."""
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, Call] = {}
    invalid: set[int] = set()
    finish: Finish | None = None
    try:
        async for event in run.events():
            if isinstance(event, Finish):
                finish = event
                continue
            content.append(event.content)
            reasoning.append(event.reasoning)
            invalid.update(event.invalidated)
            for delta in event.tool_calls:
                call = calls.setdefault(delta.index, Call(delta.id or "", delta.name or ""))
                call.id = delta.id or call.id
                call.name = delta.name or call.name
                call.arguments += delta.arguments
    finally:
        await run.aclose()
    assert finish is not None
    valid = [calls[i] for i in sorted(calls) if i not in invalid]
    return Folded("".join(content), "".join(reasoning), valid, finish)
