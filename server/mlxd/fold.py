"""A run's events folded into one reply: what every API's non-streamed answer is built from.

Streams and folded replies consume the same ``ChatRun.events()``, so a stream joined together
equals the folded reply for the same request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxd.chat import ChatRun, Delta, Finish
from mlxd.logprobs import TokenLogprob


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class Folded:
    """A whole choice: what a non-streamed reply is built from."""

    content: str
    reasoning: str
    calls: list[Call]
    finish: Finish
    logprobs: list[TokenLogprob] = field(default_factory=list)


class _Choice:
    """One choice's events, gathered."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, Call] = {}
        self.invalid: set[int] = set()
        self.logprobs: list[TokenLogprob] = []
        self.finish: Finish | None = None

    def add(self, event: Delta) -> None:
        self.content.append(event.content)
        self.reasoning.append(event.reasoning)
        self.invalid.update(event.invalidated)
        self.logprobs += event.logprobs
        for delta in event.tool_calls:
            call = self.calls.setdefault(delta.index, Call(delta.id or "", delta.name or ""))
            call.id = delta.id or call.id
            call.name = delta.name or call.name
            call.arguments += delta.arguments

    def folded(self) -> Folded:
        assert self.finish is not None
        valid = [self.calls[i] for i in sorted(self.calls) if i not in self.invalid]
        return Folded(
            "".join(self.content), "".join(self.reasoning), valid, self.finish, self.logprobs
        )


async def fold_choices(run: ChatRun) -> list[Folded]:
    """Every choice of ``run`` (``n`` of them), in index order. Calls the parser announced and
    then found malformed are left out (their text is in ``content``)."""
    choices = [_Choice() for _ in run.generations]
    try:
        async for event in run.events():
            if isinstance(event, Finish):
                choices[event.index].finish = event
            else:
                choices[event.index].add(event)
    finally:
        await run.aclose()
    return [c.folded() for c in choices]


async def fold(run: ChatRun) -> Folded:
    """The one choice of a run (the APIs other than chat completions have no ``n``)."""
    (only,) = await fold_choices(run)
    return only
