"""What a tool-call format is, and the registry the formats add themselves to.

A :class:`ToolCallFormat` is everything mlxd needs to know about one model family's way of
writing a call: the markers around it, the parser that reads it back out of streamed text, the
Lark rules that force it (:mod:`mlxd.parsers.forcing` builds whole grammars from them), and the
system-prompt text that teaches it to a model whose template drops ``tools``.

A model's format is named in models.yaml (``tool_call_format``) or found by rendering a probe
call through its chat template (:func:`probe`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mlxd.grammar import lark_literal
from mlxd.parsers.base import ToolParser

Tools = Sequence[Mapping[str, Any]]

# The function a probe call names; a format's `signature` is looked for with it filled in.
PROBE_NAME = "mlxd_probe"
# The format of a template that renders a call in no registered format's signature (or cannot
# render the probe at all): SmolLM2's template drops tool calls, and mlxd teaches it Hermes.
FALLBACK = "hermes"


@dataclass(frozen=True)
class ToolCallFormat:
    """One call format. A call is ``open``, a newline, the body, ``body_end``, then ``close``."""

    name: str  # as models.yaml's ``tool_call_format`` spells it
    open: str  # the text that opens a call: the trigger under ``tool_choice: auto``
    close: str
    # Lark rules defining ``body``, one call of one of the tools (its name and arguments).
    body: Callable[[Tools], str]
    body_end: str  # Lark for what follows the body, before ``close``
    # The streaming parser of one choice, given the request's tools (for argument types).
    parser: Callable[[Tools | None], ToolParser]
    # The system-prompt paragraph that tells a model how to write a call.
    hint: str
    # Text that a chat template rendering a call of PROBE_NAME in this format contains, with
    # ``{name}`` for the function name; None: the format is never recognised, only fallen back to.
    signature: str | None = None
    # The body is JSON: the grammar processor can wind it up before max_tokens runs out.
    json_body: bool = False

    def call_rules(self, tools: Tools) -> str:
        """Lark rules for ``call``: one whole call, markers included, of one of `tools`."""
        # The markers stand alone as literals: compile_grammar swaps in special-token ids.
        open_, close = lark_literal(self.open), lark_literal(self.close)
        return f'call: {open_} "\\n" body {self.body_end}{close}\n' + self.body(tools)

    def rest_of_call(self, tools: Tools) -> str:
        """The grammar of one call after the model wrote ``open`` (``tool_choice: auto``)."""
        return f'start: "\\n"? body {self.body_end}{lark_literal(self.close)}\n' + self.body(tools)

    def recognises(self, rendered: str) -> bool:
        """Whether `rendered` (a template's rendering of the probe call) is in this format."""
        return self.signature is not None and self.signature.format(name=PROBE_NAME) in rendered


_FORMATS: dict[str, ToolCallFormat] = {}


def register(fmt: ToolCallFormat) -> ToolCallFormat:
    """Add `fmt` to the registry (each format's module does, once, when it is imported)."""
    if fmt.name in _FORMATS:
        raise ValueError(f"tool-call format {fmt.name!r} is registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def names() -> list[str]:
    """The registered formats' names, in registration order."""
    return list(_FORMATS)


def get(name: str) -> ToolCallFormat:
    """The format called `name`; ValueError naming the known ones when there is none."""
    fmt = _FORMATS.get(name)
    if fmt is None:
        known = ", ".join(repr(n) for n in _FORMATS)
        raise ValueError(f"unknown tool-call format {name!r} (known: {known})")
    return fmt


def probe(tokenizer: Any) -> ToolCallFormat:
    """The format the model's chat template writes calls in, found by rendering a probe call.

    Rendering is more reliable than searching the template source: templates mention several
    forms in comments and instructions, but render history in exactly one.
    """
    history = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_probe", "type": "function",
             "function": {"name": PROBE_NAME, "arguments": {"a": 1}}}]},
    ]  # fmt: skip
    try:
        rendered = str(tokenizer.apply_chat_template(history, tokenize=False))
    except Exception:
        return get(FALLBACK)
    return next((f for f in _FORMATS.values() if f.recognises(rendered)), get(FALLBACK))


def format_for(tokenizer: Any, configured: str | None) -> ToolCallFormat:
    """A model's format: the one models.yaml names, else the one its template renders."""
    return get(configured) if configured is not None else probe(tokenizer)
