"""Grammars that make tool calls and structured answers valid by construction.

The chat service turns ``tool_choice`` and ``response_format`` into one Lark grammar (llguidance
dialect, JSON parts as embedded ``%json`` schemas) run by :class:`server.grammar.GrammarProcessor`:

* ``"required"`` / a named function: the whole output is one or more calls (one when
  ``parallel_tool_calls`` is false) in the model's own call format, each naming a function from
  ``tools`` (or the named one) with arguments valid against that function's ``parameters``.
* ``"auto"``: the model writes freely; once it opens ``<tool_call>`` the rest of that call is
  constrained the same way (:func:`open_call_grammar`, started by the processor's trigger).
* ``response_format``: one JSON value (any object, or valid against the schema); with tools and
  ``auto`` the answer is that value or calls.

Two call formats, both inside ``<tool_call>…</tool_call>``, written the way the templates render
history (so the parser in :mod:`server.parsers.hermes` reads them back):

* ``json``: ``{"name": "f", "arguments": {…}}``
* ``xml`` (Qwen3.5/3.6, Qwen3-Coder): ``<function=f>\\n<parameter=p>\\nvalue\\n</parameter>\\n…
  </function>``; a string parameter is raw text, any other is JSON.

Objects in the schemas are closed (``additionalProperties: false``) unless the schema says
otherwise: output valid against the closed schema is valid against the original, and a small
model cannot wander off into invented keys.

``tool_choice: "none"`` is met by :class:`BanTokens` on a single-token ``<tool_call>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import mlx.core as mx

from mlxd.grammar import json_schema_lark, lark_literal

ToolCallFormat = Literal["json", "xml"]
TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"

# Reasoning models write "</think>\n\n" before the answer; the grammar starts after </think>.
AFTER_THINK = r"\n{1,2}"


def closed(schema: Any) -> Any:
    """`schema` with every object that lists properties closed to other keys (see module doc)."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(
            value, dict
        ):
            out[key] = {name: closed(sub) for name, sub in value.items()}
        elif key in ("const", "enum", "default", "examples"):
            out[key] = value
        else:
            out[key] = closed(value)
    if (
        "properties" in out
        and "additionalProperties" not in out
        and ("patternProperties" not in out)
    ):
        out["additionalProperties"] = False
    return out


def parameters_of(tool: Mapping[str, Any]) -> dict[str, Any]:
    """A tool's ``parameters`` schema (any object when it has none)."""
    params = tool["function"].get("parameters")
    if not isinstance(params, dict) or not params:
        return {"type": "object"}
    return closed(params)


def _json_body(tools: Sequence[Mapping[str, Any]]) -> str:
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["function"]["name"]},
                "arguments": parameters_of(tool),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return f"body: {json_schema_lark(schema)}\n"


def _string_choices(schema: Any) -> list[str] | None:
    """The allowed strings of an ``enum``/``const`` of strings (raw text in the XML form)."""
    if not isinstance(schema, dict):
        return None
    options = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if options and all(isinstance(o, str) for o in options):
        return list(options)
    return None


def _xml_body(tools: Sequence[Mapping[str, Any]]) -> str:
    rules = []
    alternatives = []
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        params = parameters_of(tool)
        properties = params.get("properties") or {}
        required = set(params.get("required") or [])
        parts = []
        for j, (pname, pschema) in enumerate(properties.items()):
            rule = f"f{i}_p{j}"
            open_tag = lark_literal(f"<parameter={pname}>\n")
            choices = _string_choices(pschema)
            if choices is not None:  # raw text, one of the listed strings
                alternatives_v = " | ".join(lark_literal(c) for c in choices)
                rules.append(f'{rule}: {open_tag} {rule}_v "\\n</parameter>\\n"')
                rules.append(f"{rule}_v: {alternatives_v}")
            elif (
                isinstance(pschema, dict)
                and pschema.get("type") == "string"
                and not ({"pattern", "format"} & pschema.keys())
            ):
                # Raw text up to the closing tag (which the stop consumes).
                rules.append(f"{rule}: {open_tag} {rule}_v")
                rules.append(f'{rule}_v[stop="\\n</parameter>\\n"]: /(.|\\n)+/')
            else:
                value = json_schema_lark(pschema if isinstance(pschema, dict) else {})
                rules.append(f'{rule}: {open_tag} {rule}_v "\\n</parameter>\\n"')
                rules.append(f"{rule}_v: {value}")
            parts.append(rule if pname in required else f"{rule}?")
        head = lark_literal(f"<function={name}>\n")
        rules.append(f'f{i}: {head} {" ".join(parts)} "</function>\\n"')
        alternatives.append(f"f{i}")
    return f"body: {' | '.join(alternatives)}\n" + "\n".join(rules) + "\n"


def _body_rules(tools: Sequence[Mapping[str, Any]], fmt: ToolCallFormat) -> str:
    return _xml_body(tools) if fmt == "xml" else _json_body(tools)


def _calls_rules(fmt: ToolCallFormat, parallel: bool) -> str:
    # The tags stand alone as literals: compile_grammar swaps in special-token ids for them.
    close = '"\\n" ' if fmt == "json" else ""
    call = f'call: "{TOOL_OPEN}" "\\n" body {close}"{TOOL_CLOSE}"\n'
    return call + ('calls: call ("\\n" call)*\n' if parallel else "calls: call\n")


def _lead(after_think: bool) -> str:
    return f"lead: /{AFTER_THINK}/\n" if after_think else ""


def _start(main: str, after_think: bool) -> str:
    return f"start: lead? {main}\n" if after_think else f"start: {main}\n"


def calls_grammar(
    tools: Sequence[Mapping[str, Any]],
    fmt: ToolCallFormat,
    *,
    parallel: bool = True,
    after_think: bool = False,
) -> str:
    """The whole answer is tool calls (``tool_choice`` required, or named: pass that one tool)."""
    return (
        _start("calls", after_think)
        + _lead(after_think)
        + _calls_rules(fmt, parallel)
        + _body_rules(tools, fmt)
    )


def open_call_grammar(tools: Sequence[Mapping[str, Any]], fmt: ToolCallFormat) -> str:
    """The rest of one call after the model wrote ``<tool_call>`` (``tool_choice: auto``)."""
    close = '"\\n" ' if fmt == "json" else ""
    return f'start: "\\n"? body {close}"{TOOL_CLOSE}"\n' + _body_rules(tools, fmt)


def answer_grammar(
    schema: dict[str, Any] | None,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    fmt: ToolCallFormat = "json",
    parallel: bool = True,
    after_think: bool = False,
) -> str:
    """A JSON answer (``response_format``), any object when `schema` is None; or calls (`tools`)."""
    target = closed(schema) if schema is not None else {"type": "object"}
    value = f"value: {json_schema_lark(target)}\n"
    if not tools:
        return _start("value", after_think) + _lead(after_think) + value
    return (
        _start("(value | calls)", after_think)
        + _lead(after_think)
        + value
        + _calls_rules(fmt, parallel)
        + _body_rules(tools, fmt)
    )


def named_tool(tools: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [t for t in tools if t["function"]["name"] == name]


class BanTokens:
    """Makes `token_ids` impossible (``tool_choice: "none"`` bans ``<tool_call>``)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        if not token_ids:
            raise ValueError("nothing to ban")
        self.token_ids = sorted(set(token_ids))
        self._mask: mx.array | None = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        vocab = logits.shape[-1]
        if self._mask is None or self._mask.shape[-1] != vocab:
            if self.token_ids[-1] >= vocab or self.token_ids[0] < 0:
                raise ValueError(f"token ids {self.token_ids} do not fit a vocabulary of {vocab}")
            mask = mx.zeros((vocab,), dtype=mx.bool_)
            mask[mx.array(self.token_ids)] = True
            self._mask = mask
        return mx.where(self._mask, mx.array(-mx.inf, logits.dtype), logits)
