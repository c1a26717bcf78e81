"""Grammars that make tool calls and structured answers valid by construction.

The chat service turns ``tool_choice`` and ``response_format`` into one Lark grammar (llguidance
dialect, JSON parts as embedded ``%json`` schemas) run by :class:`mlxd.grammar.GrammarProcessor`
(:mod:`mlxd.constraints` picks which):

* ``"required"`` / a named function: the whole output is one or more calls (one when
  ``parallel_tool_calls`` is false) in the model's own call format, each naming a function from
  ``tools`` (or the named one) with arguments valid against that function's ``parameters``.
* ``"auto"``: the model writes freely; once it opens a call the rest of that call is
  constrained the same way (:meth:`ToolCallFormat.rest_of_call`, started by the processor's
  trigger).
* ``response_format``: one JSON value (any object, or valid against the schema); with tools and
  ``auto`` the answer is that value or calls.

What one call looks like is its format's (:mod:`mlxd.toolformats`): the rules here arrange
calls, written the way the templates render history so the format's parser reads them back.

Objects in the schemas are closed (``additionalProperties: false``) unless the schema says
otherwise: output valid against the closed schema is valid against the original, and a small
model cannot wander off into invented keys.

``tool_choice: "none"`` is met by :class:`BanTokens` on a single-token call opening.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mlxd.grammar import json_schema_lark

if TYPE_CHECKING:  # only a type here: the formats import this module (parameters_of)
    from mlxd.toolformats import ToolCallFormat

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
    closed_params: dict[str, Any] = closed(params)
    return closed_params


def _calls_rules(tools: Sequence[Mapping[str, Any]], fmt: ToolCallFormat, parallel: bool) -> str:
    calls = 'calls: call ("\\n" call)*\n' if parallel else "calls: call\n"
    return calls + fmt.call_rules(tools)


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
    return _start("calls", after_think) + _lead(after_think) + _calls_rules(tools, fmt, parallel)


def answer_grammar(
    schema: dict[str, Any] | None,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    fmt: ToolCallFormat | None = None,
    parallel: bool = True,
    after_think: bool = False,
) -> str:
    """A JSON answer (``response_format``), any object when `schema` is None; or calls (`tools`,
    written in `fmt`)."""
    target = closed(schema) if schema is not None else {"type": "object"}
    value = f"value: {json_schema_lark(target)}\n"
    if not tools:
        return _start("value", after_think) + _lead(after_think) + value
    assert fmt is not None, "tools come with their call format"
    return (
        _start("(value | calls)", after_think)
        + _lead(after_think)
        + value
        + _calls_rules(tools, fmt, parallel)
    )


def named_tool(tools: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [t for t in tools if t["function"]["name"] == name]


class BanTokens:
    """Makes `token_ids` impossible (``tool_choice: "none"`` bans a call's opening token)."""

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
