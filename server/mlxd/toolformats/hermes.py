"""Hermes JSON calls (Qwen2.5, Qwen3, and what mlxd teaches models whose template drops tools).

``<tool_call>\\n{"name": "f", "arguments": {…}}\\n</tool_call>``: the body is one JSON object
whose ``arguments`` are valid against the function's ``parameters``.
"""

from mlxd.grammar import json_schema_lark
from mlxd.parsers.forcing import parameters_of
from mlxd.parsers.hermes import TOOL_CLOSE, TOOL_OPEN, HermesToolParser
from mlxd.toolformats.base import ToolCallFormat, Tools, register


def body(tools: Tools) -> str:
    """``body``: the call object, naming one of `tools`, as one embedded JSON schema."""
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


HERMES = register(
    ToolCallFormat(
        name="hermes",
        open=TOOL_OPEN,
        close=TOOL_CLOSE,
        body=body,
        body_end='"\\n" ',
        parser=HermesToolParser,
        hint=(
            "To call a function, answer with one block per call, each holding a JSON object "
            f"with the function name and its arguments:\n{TOOL_OPEN}\n"
            f'{{"name": "<function name>", "arguments": {{"<parameter>": <value>}}}}\n{TOOL_CLOSE}'
        ),
        json_body=True,
    )
)
