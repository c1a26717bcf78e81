"""What the output parsers return, and the one rule they share about holding text back.

The parsers are push objects: the chat service feeds them the model's text as it is decoded
and gets back what can be sent to the client now. They may keep back only the tail of the text
that could still turn into a marker (``<think>``, ``</tool_call>`` …), so a client sees every
other character as soon as the model produced it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Split:
    """Reasoning and answer text that may be emitted now (either may be empty)."""

    reasoning: str = ""
    content: str = ""


@dataclass
class ToolCallDelta:
    """One piece of one tool call, as an OpenAI streaming ``tool_calls`` entry carries it.

    The first delta of an index carries ``id`` and ``name``; later ones only ``arguments``. The
    ``arguments`` pieces of an index, joined in order, are the call's arguments as JSON object text.
    """

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class ToolParse:
    """What :class:`~server.parsers.hermes.HermesToolParser` lets out for one piece of input.

    ``content`` is text outside tool calls. ``malformed`` is true when this piece completed a call
    that could not be parsed: its original text, tags included, is part of ``content`` here.
    ``invalidated`` lists the indices of such calls whose deltas had already been emitted (their
    name was known before the call broke); a caller that can still take them back (a non-streamed
    response) drops them, a streaming caller has already sent them.
    """

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)
    malformed: bool = False
    invalidated: list[int] = field(default_factory=list)

    def add_arguments(self, index: int, arguments: str) -> None:
        """Append argument text for `index`, merged into this piece's last delta when it matches."""
        if self.calls and self.calls[-1].index == index:
            self.calls[-1].arguments += arguments
        else:
            self.calls.append(ToolCallDelta(index, None, None, arguments))


class ToolParser(Protocol):
    """What the chat run needs of a streaming tool-call parser (one per choice).

    ``feed`` takes the model's text as it comes, ``finish`` ends it. ``call_count`` counts valid
    calls; ``truncated`` is true when the output ended inside a call, and ``incomplete_call`` is
    that call's index when its deltas were already out.
    """

    call_count: int
    truncated: bool
    incomplete_call: int | None

    def feed(self, text: str) -> ToolParse: ...

    def finish(self) -> ToolParse: ...


@dataclass
class ToolCall:
    """A whole tool call, folded from its deltas."""

    index: int
    id: str
    name: str
    arguments: str


def fold_tool_calls(deltas: Iterable[ToolCallDelta], drop: Collection[int] = ()) -> list[ToolCall]:
    """Fold streamed deltas into whole calls in index order, leaving out the indices in `drop`.

    Raises ValueError when an index's first delta lacks its id or name (the parsers never do that).
    """
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        if delta.index in drop:
            continue
        call = calls.get(delta.index)
        if call is None:
            if delta.id is None or delta.name is None:
                raise ValueError(f"tool call {delta.index} starts without an id and a name")
            calls[delta.index] = ToolCall(delta.index, delta.id, delta.name, delta.arguments)
        else:
            call.arguments += delta.arguments
    return [calls[i] for i in sorted(calls)]


def held_tag_prefix(text: str, tags: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is the beginning (not the whole) of a tag.

    That tail is all a parser may keep back: every other character is final.
    """
    longest = max(len(tag) for tag in tags) - 1
    for size in range(min(longest, len(text)), 0, -1):
        tail = text[-size:]
        if any(len(tag) > size and tag.startswith(tail) for tag in tags):
            return size
    return 0
