"""Tool use, thinking and fill-in-the-middle through the Anthropic, Responses, Completions and
Ollama APIs, with their official SDKs, on random-weight Qwen3 models scripted to write a known
text (see tests/e2e/test_tools_reasoning.py: real template, tokenizer, MLX generation, parsers).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest
from mlx_lm.utils import load_tokenizer

from mlxd.config import parse_models
from tests.e2e.inproc import ScriptedEngine, serve_in_thread
from tools.random_model import build_random_qwen3

pytestmark = pytest.mark.e2e

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
TIME_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
JSON_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call>'
ASK = "What's the weather in Seoul?"
GREEDY = {"temperature": 0}


class Setup:
    def __init__(self, root: str, engine: ScriptedEngine, dirs: dict[str, Path]) -> None:
        self.root = root
        self.engine = engine
        self.dirs = dirs
        self.claude = anthropic.Anthropic(base_url=root, api_key="x", max_retries=0, timeout=120)
        self.oai = openai.OpenAI(base_url=f"{root}/v1", api_key="x", max_retries=0, timeout=120)
        self.olla = ollama.Client(host=root, timeout=120)

    def script(self, *runs: list[str | int]) -> None:
        self.engine.scripts = list(runs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("apis-qwen-tiny")
    cache = base / "token-cache"
    dirs = {
        "qwen3-tiny": build_random_qwen3(base / "q3", "tiny", cache_dir=cache),
        "qwen36-tiny": build_random_qwen3(base / "q36", "tiny", vocab="qwen3_6", cache_dir=cache),
    }
    models = parse_models(
        {
            "models": [{"id": k, "source": {"path": str(v)}} for k, v in dirs.items()],
            # What Claude Code asks for, mapped onto a local model.
            "patterns": {"claude-*": "qwen3-tiny"},
        },
        "test",
    )
    engine = ScriptedEngine()
    with serve_in_thread(models, base / "home", engine) as url:
        yield Setup(url.removesuffix("/v1"), engine, dirs)


# ---- Anthropic Messages ------------------------------------------------------------------------

CLAUDE_TOOLS: Any = [
    {"name": "get_weather", "description": "Weather for a city", "input_schema": SCHEMA},
    {"name": "get_time", "input_schema": TIME_SCHEMA},
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_anthropic_tool_use_round_trip(setup: Setup, stream: bool) -> None:
    setup.script([JSON_CALL], ["It is sunny in Seoul."])
    ask = [{"role": "user", "content": ASK}]
    kw: Any = {"model": "claude-haiku-4-5", "max_tokens": 100, "tools": CLAUDE_TOOLS,
               "extra_body": GREEDY}  # fmt: skip
    if stream:
        with setup.claude.messages.stream(messages=ask, **kw) as s:
            events = [e.type for e in s if e.type not in ("text", "input_json")]
            first = s.get_final_message()
        assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
        assert events[1] == "content_block_start" and events[-3] == "content_block_stop"
        assert events.count("content_block_delta") >= 2  # arguments arrive in pieces
    else:
        first = setup.claude.messages.create(messages=ask, **kw)
    assert first.model == "qwen3-tiny"
    assert first.stop_reason == "tool_use"
    (use,) = first.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Seoul"}
    assert use.id.startswith("toolu_")

    history: Any = [
        *ask,
        {"role": "assistant", "content": [u.model_dump() for u in first.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id, "content": '{"sky": "sunny"}'}]},
    ]  # fmt: skip
    second = setup.claude.messages.create(messages=history, **kw)
    assert second.stop_reason == "end_turn"
    assert [(b.type, b.text) for b in second.content] == [("text", "It is sunny in Seoul.")]  # type: ignore[union-attr]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_anthropic_thinking_blocks(setup: Setup, stream: bool) -> None:
    setup.script(["<think>\nParis is the capital.\n</think>\n\nParis."])
    kw: Any = {"model": "qwen3-tiny", "max_tokens": 100, "extra_body": GREEDY,
               "thinking": {"type": "enabled", "budget_tokens": 1024},
               "messages": [{"role": "user", "content": "Capital of France?"}]}  # fmt: skip
    if stream:
        with setup.claude.messages.stream(**kw) as s:
            deltas = [e.delta.type for e in s if e.type == "content_block_delta"]
            msg = s.get_final_message()
        assert deltas[0] == "thinking_delta" and deltas[-1] == "text_delta"
        assert "signature_delta" in deltas
    else:
        msg = setup.claude.messages.create(**kw)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "Paris is the capital."  # type: ignore[union-attr]
    assert msg.content[1].text == "Paris."  # type: ignore[union-attr]

    # Thinking off: Qwen3.6's template closes the think block in the prompt.
    setup.script(["Paris."])
    off = setup.claude.messages.create(**{**kw, "model": "qwen36-tiny",
                                          "thinking": {"type": "disabled"}})  # fmt: skip
    assert [(b.type, getattr(b, "text", None)) for b in off.content] == [("text", "Paris.")]


def test_anthropic_tool_choice_tool_and_any_are_enforced(setup: Setup) -> None:
    # The whole call is held to the named function's grammar; the script writes a valid one.
    setup.script(
        ['<tool_call>\n{"name": "get_time", "arguments": {"city": "Tokyo"}}\n</tool_call>']
    )
    kw: Any = {"model": "qwen3-tiny", "max_tokens": 100, "tools": CLAUDE_TOOLS,
               "extra_body": GREEDY, "messages": [{"role": "user", "content": ASK}]}  # fmt: skip
    named = setup.claude.messages.create(tool_choice={"type": "tool", "name": "get_time"}, **kw)
    assert [(b.type, b.name, b.input) for b in named.content] == [  # type: ignore[union-attr]
        ("tool_use", "get_time", {"city": "Tokyo"})
    ]
    setup.script(
        ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>']
    )
    anyone = setup.claude.messages.create(tool_choice={"type": "any"}, **kw)
    assert anyone.stop_reason == "tool_use"
    assert anyone.content[0].input == {"city": "Oslo"}  # type: ignore[union-attr]


# ---- OpenAI Responses --------------------------------------------------------------------------

RESP_TOOLS: Any = [
    {"type": "function", "name": "get_weather", "description": "Weather", "parameters": SCHEMA}
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_responses_function_call_round_trip(setup: Setup, stream: bool) -> None:
    setup.script([JSON_CALL], ["It is sunny in Seoul."])
    kw: Any = {"model": "qwen3-tiny", "tools": RESP_TOOLS, "temperature": 0,
               "max_output_tokens": 100}  # fmt: skip
    if stream:
        with setup.oai.responses.stream(input=ASK, **kw) as s:
            kinds = [e.type for e in s]
            first = s.get_final_response()
        assert kinds[:3] == ["response.created", "response.in_progress",
                             "response.output_item.added"]  # fmt: skip
        assert kinds.count("response.function_call_arguments.delta") >= 2
        assert kinds[-3:] == ["response.function_call_arguments.done",
                              "response.output_item.done", "response.completed"]  # fmt: skip
    else:
        first = setup.oai.responses.create(input=ASK, **kw)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Seoul"}
    # The follow-up names the stored response instead of resending the conversation.
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    second = setup.oai.responses.create(input=[output], previous_response_id=first.id, **kw)
    assert second.output_text == "It is sunny in Seoul." and second.status == "completed"
    # The same conversation sent explicitly as items gives the same prompt.
    setup.script(["It is sunny in Seoul."])
    items: Any = [{"role": "user", "content": ASK},
                  {"type": "function_call", "call_id": call.call_id, "name": call.name,
                   "arguments": call.arguments}, output]  # fmt: skip
    explicit = setup.oai.responses.create(input=items, **kw)
    assert explicit.output_text == second.output_text
    assert explicit.usage is not None and second.usage is not None
    assert explicit.usage.input_tokens == second.usage.input_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_responses_reasoning_items(setup: Setup, stream: bool) -> None:
    setup.script(["The user wants Paris.\n</think>\n\nParis."])
    kw: Any = {"model": "qwen36-tiny", "input": "Capital of France?", "temperature": 0,
               "max_output_tokens": 100, "reasoning": {"effort": "high"},
               "include": ["reasoning.encrypted_content"], "store": False}  # fmt: skip
    if stream:
        with setup.oai.responses.stream(**kw) as s:
            kinds = [e.type for e in s]
            r = s.get_final_response()
        assert kinds.index("response.reasoning_text.delta") < kinds.index(
            "response.output_text.delta"
        )
        assert "response.reasoning_text.done" in kinds
    else:
        r = setup.oai.responses.create(**kw)
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "The user wants Paris."
    # Without a stored response, the client continues from the opaque copy it was given.
    assert r.output[0].encrypted_content == "The user wants Paris."  # type: ignore[union-attr, index]
    assert r.output_text == "Paris."
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens > 0


def test_responses_cut_by_max_output_tokens_is_incomplete(setup: Setup) -> None:
    setup.script(["one two three four five six seven eight nine ten"])
    r = setup.oai.responses.create(model="qwen3-tiny", input="count", max_output_tokens=3,
                                   temperature=0, reasoning={"effort": "none"})  # fmt: skip
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"


# ---- Completions with fill-in-the-middle --------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_completions_fill_in_the_middle_uses_the_models_fim_tokens(
    setup: Setup, stream: bool
) -> None:
    prefix, suffix, middle = "def add(a, b):\n", "\n    return c\n", "    c = a + b"
    setup.script([middle])
    kw: Any = {"model": "qwen3-tiny", "prompt": prefix, "suffix": suffix, "max_tokens": 30,
               "temperature": 0}  # fmt: skip
    if stream:
        chunks = list(setup.oai.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        c = setup.oai.completions.create(**kw)
        text, finish = c.choices[0].text, c.choices[0].finish_reason
        tok = load_tokenizer(setup.dirs["qwen3-tiny"])
        framed = tok.encode(f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>")
        assert c.usage is not None and c.usage.prompt_tokens == len(framed)
    assert text == middle and finish == "stop"


def test_completions_raw_prompt_skips_the_chat_template(setup: Setup) -> None:
    setup.script(["<think>not parsed</think> raw"])
    c = setup.oai.completions.create(model="qwen3-tiny", prompt="Once", max_tokens=30,
                                     temperature=0)  # fmt: skip
    assert c.choices[0].text == "<think>not parsed</think> raw"
    tok = load_tokenizer(setup.dirs["qwen3-tiny"])
    assert c.usage is not None and c.usage.prompt_tokens == len(tok.encode("Once"))


# ---- Ollama ------------------------------------------------------------------------------------

OLLAMA_TOOLS: Any = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather", "parameters": SCHEMA}}]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["json", "ndjson"])
def test_ollama_tool_round_trip_and_thinking(setup: Setup, stream: bool) -> None:
    setup.script([JSON_CALL], ["It is sunny in Seoul."])
    ask = [{"role": "user", "content": ASK}]
    kw: Any = {"model": "qwen3-tiny:latest", "tools": OLLAMA_TOOLS, "options": GREEDY}
    if stream:
        parts = list(setup.olla.chat(messages=ask, stream=True, **kw))
        calls = [c for p in parts for c in p.message.tool_calls or []]
        assert parts[-1].done and parts[-1].done_reason == "stop"
    else:
        r = setup.olla.chat(messages=ask, **kw)
        calls = list(r.message.tool_calls or [])
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Seoul"})
    ]
    history: Any = [
        *ask,
        {"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "content": '{"sky": "sunny"}', "tool_name": "get_weather"},
    ]
    final = setup.olla.chat(messages=history, **kw)
    assert final.message.content == "It is sunny in Seoul." and not final.message.tool_calls

    setup.script(["<think>\nParis is the capital.\n</think>\n\nParis."])
    think = {"model": "qwen3-tiny", "options": GREEDY, "think": True,
             "messages": [{"role": "user", "content": "Capital of France?"}]}  # fmt: skip
    if stream:
        parts = list(setup.olla.chat(stream=True, **think))
        thinking = "".join(p.message.thinking or "" for p in parts)
        content = "".join(p.message.content or "" for p in parts)
    else:
        r = setup.olla.chat(**think)
        thinking, content = r.message.thinking or "", r.message.content or ""
    assert (thinking, content) == ("Paris is the capital.", "Paris.")


def test_ollama_generate_with_suffix_and_show_capabilities(setup: Setup) -> None:
    setup.script(["    c = a + b"])
    g = setup.olla.generate(model="qwen3-tiny", prompt="def add(a, b):\n",
                            suffix="\n    return c\n", options=GREEDY)  # fmt: skip
    assert g.response == "    c = a + b" and g.done_reason == "stop"
    shown = setup.olla.show("qwen3-tiny")
    assert {"completion", "tools", "thinking", "insert"} <= set(shown.capabilities or [])
    assert ".Suffix" in (shown.template or "")  # how Continue decides a model can fill in
