"""Tool definitions in the system prompt, for chat templates that drop ``tools``.

Many chat templates (SmolLM2's among them) ignore the ``tools`` argument: the model would never
learn which functions exist. mlxd finds out by rendering a probe conversation with and without a
probe tool; when the two renderings are equal it writes the definitions and the model's call
format (its :class:`~mlxd.toolformats.ToolCallFormat` hint; Hermes JSON unless models.yaml names
another) into the system message itself, and logs that once per model. Constrained decoding then
holds the model to that format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from mlxd.toolformats import ToolCallFormat

log = logging.getLogger("mlxd.tools")

_PROBE_TOOL = {"type": "function", "function": {
    "name": "mlxd_probe_tool", "description": "probe",
    "parameters": {"type": "object", "properties": {}}}}  # fmt: skip
_ignores: dict[str, bool] = {}


def template_ignores_tools(tokenizer: Any, model_id: str) -> bool:
    """True when the model's chat template renders the same prompt with and without tools."""
    known = _ignores.get(model_id)
    if known is not None:
        return known
    probe = [{"role": "user", "content": "x"}]
    try:
        plain = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        tooled = tokenizer.apply_chat_template(
            probe, tools=[_PROBE_TOOL], tokenize=False, add_generation_prompt=True
        )
        ignores = bool(plain == tooled)
    except Exception:  # a template that fails on tools cannot render them either
        ignores = True
    if ignores:
        log.info(
            "model %s: its chat template ignores tools; mlxd puts tool definitions and the "
            "call format into the system prompt",
            model_id,
        )
    _ignores[model_id] = ignores
    return ignores


def tools_instructions(tools: Sequence[Mapping[str, Any]], fmt: ToolCallFormat) -> str:
    """The system-prompt text that describes `tools` and how to call them in `fmt`."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to help with the user's request. "
        f"The functions are described inside <tools></tools>:\n<tools>\n{listed}\n</tools>\n\n"
        + fmt.hint
    )


def with_tools_in_system(
    messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]], fmt: ToolCallFormat
) -> list[dict[str, Any]]:
    """`messages` with the tool instructions appended to (or forming) the system message."""
    text = tools_instructions(tools, fmt)
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{text}" if first["content"] else text
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
