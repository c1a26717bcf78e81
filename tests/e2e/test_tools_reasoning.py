"""Tool calls and reasoning through HTTP with the OpenAI SDK, on random-weight Qwen3 models.

The models have the real Qwen3 architecture and the real Qwen tokenizers (Qwen3's, and
Qwen3.5/3.6's whose template opens ``<think>`` in the prompt and writes XML tool calls); a
test-only logits processor makes them write a scripted text, so every byte of the answer is
known while the whole real path runs: template, tokenizer, MLX generation, detokenizer, parsers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from mlxd.config import parse_models
from tests.e2e.inproc import ScriptedEngine, serve_in_thread
from tools.random_model import build_random_qwen3

pytestmark = pytest.mark.e2e

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}}}}  # fmt: skip
TOOLS: Any = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What's the weather in Seoul?"}]


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[openai.OpenAI, ScriptedEngine, dict[str, Path]]]:
    base = tmp_path_factory.mktemp("qwen-tiny")
    cache = base / "token-cache"
    dirs = {
        "qwen3-tiny": build_random_qwen3(base / "q3", "tiny", cache_dir=cache),
        "qwen36-tiny": build_random_qwen3(base / "q36", "tiny", vocab="qwen3_6", cache_dir=cache),
    }
    models = parse_models(
        {"models": [{"id": k, "source": {"path": str(v)}} for k, v in dirs.items()]}, "test"
    )
    engine = ScriptedEngine()
    with serve_in_thread(models, base / "home", engine) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
        yield client, engine, dirs


def ask(client: openai.OpenAI, model: str, stream: bool, **kw: Any) -> dict[str, Any]:
    """One request; returns the message, finish reason and raw chunks in one shape."""
    base = {"model": model, "messages": kw.pop("messages", ASK), "temperature": 0,
            "max_tokens": kw.pop("max_tokens", 200)}  # fmt: skip
    if not stream:
        r = client.chat.completions.create(**base, **kw)
        msg = r.choices[0].message
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in msg.tool_calls or []]  # fmt: skip
        return {"content": msg.content, "reasoning": getattr(msg, "reasoning_content", None),
                "calls": calls, "finish": r.choices[0].finish_reason, "deltas": []}  # fmt: skip
    content, reasoning, deltas, finish = "", "", [], None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in client.chat.completions.create(**base, **kw, stream=True):
        for choice in chunk.choices:
            d = choice.delta
            content += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                deltas.append(tc)
                slot = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    slot["id"] = tc.id
                if tc.function and tc.function.name:
                    slot["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    slot["arguments"] += tc.function.arguments
            finish = choice.finish_reason or finish
    return {
        "content": content or None,
        "reasoning": reasoning or None,
        "calls": [calls[i] for i in sorted(calls)],
        "finish": finish,
        "deltas": deltas,
    }


JSON_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call>'
XML_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nSeoul\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(
    ("model", "call_text", "reasoning_text", "expected_args"),
    [
        ("qwen3-tiny", JSON_CALL, None, {"city": "Seoul"}),
        ("qwen36-tiny", XML_CALL, "The user wants the forecast.", {"city": "Seoul", "days": 3}),
    ],
    ids=["qwen3-json-calls", "qwen3.6-xml-calls-think-in-prompt"],
)
def test_agent_loop(setup: Any, model: str, call_text: str, reasoning_text: str | None,
                    expected_args: dict[str, Any], stream: bool) -> None:  # fmt: skip
    client, engine, _ = setup
    # Qwen3.6's prompt already opened <think>: the output starts inside reasoning.
    first = call_text if reasoning_text is None else f"{reasoning_text}\n</think>\n\n{call_text}"
    engine.scripts = [[first], ["It is sunny in Seoul."]]
    turn1 = ask(client, model, stream, tools=TOOLS)
    assert turn1["finish"] == "tool_calls"
    assert turn1["content"] in (None, "")
    assert turn1["reasoning"] == reasoning_text
    (call,) = turn1["calls"]
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert json.loads(call["arguments"]) == expected_args
    if stream:
        first_delta = turn1["deltas"][0]
        assert first_delta.id and first_delta.type == "function"
        assert first_delta.function.name == "get_weather"
        assert first_delta.function.arguments == ""
        # Arguments arrive as they are generated, in several pieces, not at the end in one.
        assert sum(1 for d in turn1["deltas"] if d.function.arguments) >= 2

    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "sunny", "temp": 21}'},
    ]  # fmt: skip
    if reasoning_text is not None:
        history[1]["reasoning_content"] = reasoning_text
    final_text = "It is sunny in Seoul."
    if reasoning_text is not None:
        engine.scripts = [[f"Done.\n</think>\n\n{final_text}"]]
    turn2 = ask(client, model, stream, tools=TOOLS, messages=history)
    assert turn2["finish"] == "stop"
    assert turn2["calls"] == []
    assert turn2["content"] == final_text
    assert turn2["reasoning"] == (None if reasoning_text is None else "Done.")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_reasoning_split_and_thinking_off(setup: Any, stream: bool) -> None:
    client, engine, _ = setup
    engine.scripts = [["<think>\nParis is the capital.\n</think>\n\nParis."]]
    out = ask(client, "qwen3-tiny", stream)
    assert out["reasoning"] == "Paris is the capital."
    assert out["content"] == "Paris."
    assert out["finish"] == "stop"
    # Thinking off via reasoning_effort: the template closes the think block in the prompt, so
    # the answer is plain content.
    engine.scripts = [["Paris."]]
    out = ask(client, "qwen36-tiny", stream, reasoning_effort="none")
    assert (out["content"], out["reasoning"]) == ("Paris.", None)


def test_output_ending_inside_reasoning_is_all_reasoning(setup: Any) -> None:
    client, engine, _ = setup
    engine.scripts = [["Still thinking about"]]
    out = ask(client, "qwen36-tiny", False)
    assert out["reasoning"] == "Still thinking about"
    assert out["content"] in (None, "")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_tool_choice_named_is_enforced(setup: Any, stream: bool) -> None:
    """The whole call is held to the named function's grammar; the script writes a valid one."""
    client, engine, _ = setup
    engine.scripts = [['<tool_call>\n{"name": "get_time", "arguments": {"city": "Tokyo"}}\n'
                       "</tool_call>"]]  # fmt: skip
    choice = {"type": "function", "function": {"name": "get_time"}}
    out = ask(client, "qwen3-tiny", stream, tools=TOOLS, tool_choice=choice)
    assert [c["name"] for c in out["calls"]] == ["get_time"]
    assert json.loads(out["calls"][0]["arguments"]) == {"city": "Tokyo"}
    assert out["finish"] == "tool_calls"


def test_tool_choice_required_waits_for_reasoning_then_constrains_the_call(setup: Any) -> None:
    """Thinking model: it reasons freely; only what follows </think> is held to the grammar."""
    client, engine, _ = setup
    body = "<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>"
    engine.scripts = [["Need a tool.\n</think>\n\n<tool_call>\n" + body]]
    out = ask(client, "qwen36-tiny", False, tools=TOOLS, tool_choice="required")
    assert out["reasoning"] == "Need a tool."
    assert [c["name"] for c in out["calls"]] == ["get_weather"]
    assert json.loads(out["calls"][0]["arguments"]) == {"city": "Oslo"}
    assert out["finish"] == "tool_calls"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_malformed_call_is_returned_as_content(setup: Any, stream: bool) -> None:
    client, engine, _ = setup
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    engine.scripts = [["Checking. " + broken]]
    out = ask(client, "qwen3-tiny", stream, tools=TOOLS)
    assert out["calls"] == [] or stream  # a stream may have announced it before it broke
    assert out["content"] is not None and broken in out["content"]
    assert out["finish"] == "stop"


def test_call_cut_by_max_tokens_is_length(setup: Any) -> None:
    client, engine, _ = setup
    engine.scripts = [[JSON_CALL]]
    out = ask(client, "qwen3-tiny", False, tools=TOOLS, max_tokens=8)
    assert out["finish"] == "length"
