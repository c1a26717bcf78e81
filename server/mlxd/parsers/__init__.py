"""Turning raw model text into OpenAI ``reasoning_content``, ``content`` and ``tool_calls``."""

from mlxd.parsers.base import Split, ToolCall, ToolCallDelta, ToolParse, fold_tool_calls
from mlxd.parsers.hermes import HermesToolParser
from mlxd.parsers.reasoning import ThinkSplitter, prompt_opens_reasoning

__all__ = [
    "HermesToolParser",
    "Split",
    "ThinkSplitter",
    "ToolCall",
    "ToolCallDelta",
    "ToolParse",
    "fold_tool_calls",
    "prompt_opens_reasoning",
]
