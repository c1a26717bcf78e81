"""Qwen XML calls (Qwen3.5/3.6, Qwen3-Coder), recognised by ``<function=NAME>`` in history.

``<tool_call>\\n<function=f>\\n<parameter=p>\\nvalue\\n</parameter>\\n…</function>\\n</tool_call>``:
a string parameter is raw text (up to its closing tag), an enum of strings one of its values,
any other parameter JSON valid against its schema.
"""

import dataclasses
from typing import Any

from mlxd.grammar import json_schema_lark, lark_literal
from mlxd.parsers.forcing import parameters_of
from mlxd.toolformats.base import Tools, register
from mlxd.toolformats.hermes import HERMES


def _string_choices(schema: Any) -> list[str] | None:
    """The allowed strings of an ``enum``/``const`` of strings (raw text in the XML form)."""
    if not isinstance(schema, dict):
        return None
    options = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if options and all(isinstance(o, str) for o in options):
        return list(options)
    return None


def body(tools: Tools) -> str:
    """``body``: ``<function=NAME>`` and its parameters, one rule per function and parameter."""
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


# Hermes's envelope and parser (which reads either body: unforced, a model may write either).
QWEN_XML = register(
    dataclasses.replace(
        HERMES,
        name="qwen_xml",
        body=body,
        body_end="",
        hint=(
            f"To call a function, answer with one block per call:\n{HERMES.open}\n"
            "<function=function_name>\n<parameter=parameter_name>\nvalue\n</parameter>\n"
            f"</function>\n{HERMES.close}"
        ),
        signature="<function={name}>",
        json_body=False,
    )
)
