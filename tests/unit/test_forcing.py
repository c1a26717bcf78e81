"""tool_choice / response_format enforcement: grammars, the grammar processor, real Qwen tokens.

The grammars are checked against the exact text mlxd's chat template renders for tool calls (so
the parser reads what the grammar lets out), and run inside mlx-lm's generation loop on a
random-weight Qwen3: whatever the weights want, the output is a valid call.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any, cast

import jsonschema
import llguidance
import mlx.core as mx
import pytest

from mlxd.errors import BadRequest
from mlxd.grammar import GrammarProcessor, compile_grammar, llg_tokenizer
from mlxd.parsers import HermesToolParser
from mlxd.parsers.forcing import BanTokens, answer_grammar, calls_grammar, closed, named_tool
from mlxd.toolformats import ToolCallFormat
from mlxd.toolformats.hermes import HERMES
from mlxd.toolformats.qwen_xml import QWEN_XML
from tools.random_model import VOCABS, ScriptedLogits, build_qwen_tokenizer, qwen3_config

VOCAB = 32
WEATHER: Any = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}  # fmt: skip
UNIT: Any = {"type": "function", "function": {"name": "set_unit", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "n": {"type": "integer",
    "minimum": 0, "maximum": 9}}, "required": ["unit", "n"]}}}  # fmt: skip
TOOLS = [WEATHER, UNIT]
MARKERS = (HERMES.open, HERMES.close)  # both formats' (matched by token id in these vocabs)


@functools.cache
def tokenizer(vocab: str) -> Any:
    """The real Qwen tokenizer (mlx-lm wrapper) with mlxd's template."""
    from mlx_lm.utils import load_tokenizer

    from tools.random_model import write_chat_template

    out = Path(tempfile.mkdtemp())
    build_qwen_tokenizer(out, vocab)
    write_chat_template(out)  # its tool_call_format variable picks the call form when rendering
    return load_tokenizer(out)


def rendered_call(vocab: str, name: str, args: dict[str, Any], fmt: ToolCallFormat) -> str:
    """A call exactly as the chat template writes it into history (its "json" or "xml" form)."""
    tok = tokenizer(vocab)
    history = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": name, "arguments": args}}]},
    ]  # fmt: skip
    form = "xml" if fmt is QWEN_XML else "json"
    text = tok.apply_chat_template(history, tokenize=False, tool_call_format=form)
    start = text.index("<tool_call>")
    return str(text[start : text.index("</tool_call>", start) + len("</tool_call>")])


def accepts(vocab: str, lark: str, text: str) -> bool:
    tok = tokenizer(vocab)
    grammar = compile_grammar(tok, lark, "x", MARKERS)
    matcher = llguidance.LLMatcher(llg_tokenizer(tok), grammar)
    ids = tok.encode(text, add_special_tokens=False)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


@pytest.mark.parametrize("vocab", sorted(VOCABS))
@pytest.mark.parametrize("fmt", [HERMES, QWEN_XML], ids=["hermes", "qwen_xml"])
def test_grammars_accept_what_the_template_renders(vocab: str, fmt: ToolCallFormat) -> None:
    call = rendered_call(vocab, "get_weather", {"city": "Oslo", "days": 3}, fmt)
    other = rendered_call(vocab, "set_unit", {"unit": "c", "n": 2}, fmt)
    assert accepts(vocab, calls_grammar(TOOLS, fmt), call)
    assert accepts(vocab, calls_grammar(TOOLS, fmt), call + "\n" + other)  # parallel calls
    assert not accepts(vocab, calls_grammar(TOOLS, fmt, parallel=False), call + "\n" + other)
    assert accepts(vocab, calls_grammar(named_tool(TOOLS, "set_unit"), fmt), other)
    assert not accepts(vocab, calls_grammar(named_tool(TOOLS, "set_unit"), fmt), call)
    assert accepts(vocab, calls_grammar(TOOLS, fmt, after_think=True), "\n\n" + call)
    assert accepts(vocab, fmt.rest_of_call(TOOLS), call[len("<tool_call>") :])
    assert accepts(vocab, answer_grammar(None, tools=TOOLS, fmt=fmt), call)


@pytest.mark.parametrize(
    "bad",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": 1}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"days": 2}}\n</tool_call>',
        '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "set_unit", "arguments": {"unit": "k", "n": 2}}\n</tool_call>',
        '<tool_call>\n{"name": "set_unit", "arguments": {"unit": "c", "n": 2, "x": 1}}\n'
        "</tool_call>",
        "Sure! " + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "a"}}\n</tool_call>',
    ],
    ids=["args-not-object", "missing-required", "unknown-name", "enum", "extra-key", "text-first"],
)
def test_calls_grammar_rejects_invalid_calls(bad: str) -> None:
    assert not accepts("qwen3", calls_grammar(TOOLS, HERMES), bad)


def test_answer_grammar_and_unsupported_keywords() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert accepts("qwen3", answer_grammar(schema), '{"a": 5}')
    assert not accepts("qwen3", answer_grammar(schema), '{"a": 5, "b": 1}')  # closed
    assert not accepts("qwen3", answer_grammar(schema), '{"a": "5"}')
    assert accepts("qwen3", answer_grammar(None), '{"any": [1, {"b": null}]}')
    with pytest.raises(BadRequest, match="'not'") as err:
        compile_grammar(tokenizer("qwen3"), answer_grammar({"not": {"type": "string"}}), "rf")
    assert err.value.param == "rf"


def test_closed_keeps_explicit_choices() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}},
              "b": {"type": "object", "properties": {}, "additionalProperties": True}},
              "$defs": {"d": {"properties": {"x": {}}}}}  # fmt: skip
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["b"]["additionalProperties"] is True
    assert out["$defs"]["d"]["additionalProperties"] is False


def test_ban_tokens() -> None:
    logits = mx.random.normal((1, VOCAB), key=mx.random.key(0))
    out = BanTokens([7, 3, 7])(mx.array([1, 2]), logits)
    banned = mx.arange(VOCAB) < 0
    banned[mx.array([3, 7])] = True
    assert mx.all(mx.isneginf(out[0]) == banned).item()
    assert mx.array_equal(mx.where(banned, 0, out), mx.where(banned, 0, logits)).item()
    with pytest.raises(ValueError):
        BanTokens([VOCAB])(mx.array([1]), logits)
    with pytest.raises(ValueError):
        BanTokens([])


def generate(vocab: str, prompt: str, processors: list[Any], max_tokens: int) -> str:
    """mlx-lm's own pipelined loop on a random-weight Qwen3; returns the generated text."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.qwen3 import Model, ModelArgs

    tok = tokenizer(vocab)
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(qwen3_config("tiny", vocab, dtype="float32")))
    ids = tok.encode(prompt, add_special_tokens=False)
    eos = set(tok.eos_token_ids)
    out: list[int] = []
    steps = generate_step(mx.array(ids), model, max_tokens=max_tokens, logits_processors=processors)
    for token, _ in steps:
        if cast(int, token) in eos:
            break
        out.append(cast(int, token))
    return str(tok.decode(out, skip_special_tokens=False))


def parsed_calls(text: str) -> list[tuple[str, dict[str, Any]]]:
    parser = HermesToolParser(tools=TOOLS)
    first, last = parser.feed(text), parser.finish()
    deltas = first.calls + last.calls
    names = {d.index: d.name for d in deltas if d.name}
    args: dict[int, str] = {}
    for d in deltas:
        args[d.index] = args.get(d.index, "") + d.arguments
    return [(names[i], json.loads(args[i])) for i in sorted(names)]


@pytest.mark.parametrize("vocab", sorted(VOCABS))
def test_random_weights_write_a_valid_call_after_thinking(vocab: str) -> None:
    """The model reasons (scripted, unconstrained), then the named call is forced by grammar."""
    tok = tokenizer(vocab)
    fmt = QWEN_XML if vocab != "qwen3" else HERMES
    thinking = tok.encode("Use the tool.\n</think>", add_special_tokens=False)
    grammar = compile_grammar(
        tok,
        calls_grammar(named_tool(TOOLS, "set_unit"), fmt, parallel=False, after_think=True),
        "tools",
        MARKERS,
    )
    processor = GrammarProcessor(tok, grammar, trigger="</think>", budget=80)
    prompt = "<|im_start|>user\nUnit?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    text = generate(vocab, prompt, [ScriptedLogits(thinking), processor], 80)
    assert text.startswith("Use the tool.\n</think>")
    calls = parsed_calls(text.split("</think>", 1)[1])
    assert [name for name, _ in calls] == ["set_unit"]
    jsonschema.validate(calls[0][1], UNIT["function"]["parameters"])
    assert processor.failed is None


def test_auto_lets_text_through_and_finishes_an_opened_call() -> None:
    tok = tokenizer("qwen3")
    grammar = compile_grammar(tok, HERMES.rest_of_call([UNIT]), "tools", MARKERS)
    processor = GrammarProcessor(tok, grammar, trigger="<tool_call>", rearm=True, budget=60)
    opening = tok.encode("Let me check.<tool_call>", add_special_tokens=False)
    prompt = "<|im_start|>user\nUnit?<|im_end|>\n<|im_start|>assistant\n"
    text = generate("qwen3", prompt, [ScriptedLogits(opening), processor], 60)
    assert text.startswith("Let me check.<tool_call>")
    calls = parsed_calls(text)
    assert calls and calls[0][0] == "set_unit"
    jsonschema.validate(calls[0][1], UNIT["function"]["parameters"])


def test_json_is_wound_up_before_the_budget_ends() -> None:
    """Random weights under an open-ended schema: the answer still closes within max_tokens."""
    tok = tokenizer("qwen3")
    schema = {"type": "object", "properties": {"notes": {"type": "array", "items": {
        "type": "object", "properties": {"text": {"type": "string"}}}}}}  # fmt: skip
    grammar = compile_grammar(tok, answer_grammar(schema), "response_format")
    for budget in (12, 30):
        text = generate("qwen3", "<|im_start|>assistant\n", [GrammarProcessor(
            tok, grammar, budget=budget)], budget)  # fmt: skip
        jsonschema.validate(json.loads(text), schema)
