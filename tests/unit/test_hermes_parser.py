"""HermesToolParser: JSON and XML calls, malformed and truncated ones, under every chunking."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import pytest

from mlxd.parsers import (
    HermesToolParser,
    ThinkSplitter,
    ToolCallDelta,
    ToolParse,
    fold_tool_calls,
)
from mlxd.parsers.hermes import typed_value
from tests.chunkings import chunkings


def _function(name: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {"type": "object", "properties": properties},
        },
    }


TOOLS = [
    _function(
        "get_weather",
        city={"type": "string"},
        days={"type": "integer"},
        metric={"type": "boolean"},
        lat={"type": "number"},
        opts={"type": "object"},
        tags={"type": "array", "items": {"type": "string"}},
        note={"type": ["string", "null"]},
        zip={"type": "string"},
        limit={"anyOf": [{"type": "integer"}, {"type": "null"}]},
    ),
    _function("write_file", path={"type": "string"}, content={"type": "string"}),
    _function("list_files"),
]


@dataclass(frozen=True)
class Outcome:
    content: str
    calls: tuple[tuple[str, str], ...]  # (name, arguments) of the calls not invalidated
    invalid: tuple[int, ...] = ()
    malformed: int = 0
    truncated: bool = False
    incomplete: int | None = None
    reasoning: str = ""


def check_deltas(pieces: list[ToolParse]) -> None:
    """The stream is well formed: ids and names once per index, indices in order."""
    seen: dict[int, str] = {}
    for delta in (d for p in pieces for d in p.calls):
        if delta.index in seen:
            assert (delta.id, delta.name) == (None, None), delta
        else:
            assert delta.index == len(seen), "indices start at 0 and grow by one"
            assert delta.id is not None and delta.id.startswith("call_"), delta
            assert delta.name
            seen[delta.index] = delta.id
    assert len(set(seen.values())) == len(seen), "ids are unique"


def parse(chunks: list[str], tools: Any = TOOLS) -> Outcome:
    parser = HermesToolParser(tools)
    pieces = [*(parser.feed(c) for c in chunks), parser.finish()]
    check_deltas(pieces)
    invalidated = [i for p in pieces for i in p.invalidated]
    assert invalidated == parser.invalid_calls
    # One piece may carry several malformed calls.
    assert sum(p.malformed for p in pieces) <= parser.malformed_count
    assert any(p.malformed for p in pieces) == (parser.malformed_count > 0)
    calls = fold_tool_calls([d for p in pieces for d in p.calls], drop=parser.invalid_calls)
    expected_valid = len(calls) - (parser.incomplete_call is not None)
    assert parser.call_count == expected_valid
    return Outcome(
        content="".join(p.content for p in pieces),
        calls=tuple((c.name, c.arguments) for c in calls),
        invalid=tuple(parser.invalid_calls),
        malformed=parser.malformed_count,
        truncated=parser.truncated,
        incomplete=parser.incomplete_call,
    )


def call(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


def xml(function: str, *parameters: tuple[str, str]) -> str:
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in parameters)
    return call(f"<function={function}>\n{params}</function>")


WEATHER = '{"name": "get_weather", "arguments": {"city": "Seoul"}}'
WEATHER_CALL = ("get_weather", '{"city": "Seoul"}')

# (id, model output, expected outcome)
CASES: list[tuple[str, str, Outcome]] = [
    (
        "plain-text",
        "Just text: a < b, <tool is no tag, </tool_call> neither.",
        Outcome("Just text: a < b, <tool is no tag, </tool_call> neither.", ()),
    ),
    ("json-single", call(WEATHER), Outcome("", (WEATHER_CALL,))),
    (
        "json-text-around",
        f"Let me check.\n{call(WEATHER)}\nDone.",
        Outcome("Let me check.\nDone.", (WEATHER_CALL,)),
    ),
    (
        "json-parallel",
        call(WEATHER) + "\n" + call('{"name": "get_weather", "arguments": {"city": "Busan"}}'),
        Outcome("", (WEATHER_CALL, ("get_weather", '{"city": "Busan"}'))),
    ),
    (
        "json-nested",
        call(
            '{"name": "f", "arguments": {"q": {"a": [1, 2, {"b": null}], "c": true}, "n": -1.5e3}}'
        ),
        Outcome("", (("f", '{"q": {"a": [1, 2, {"b": null}], "c": true}, "n": -1.5e3}'),)),
    ),
    (
        "json-tags-and-braces-in-strings",
        call(
            r'{"name": "f", "arguments": {"code": "if (x) { y(); } </tool_call> <tool_call>", '
            r'"q": "\"quoted\" \\ {"}}'
        ),
        Outcome(
            "",
            (
                (
                    "f",
                    r'{"code": "if (x) { y(); } </tool_call> <tool_call>", "q": "\"quoted\" \\ {"}',
                ),
            ),
        ),
    ),
    (
        "json-unicode",
        call('{"name": "get_weather", "arguments": {"city": "서울", "note": "비 🌧 \\u00e9"}}'),
        Outcome("", (("get_weather", '{"city": "서울", "note": "비 🌧 \\u00e9"}'),)),
    ),
    (
        "json-empty-arguments",
        call('{"name": "ping", "arguments": {}}'),
        Outcome("", (("ping", "{}"),)),
    ),
    ("json-missing-arguments", call('{"name": "ping"}'), Outcome("", (("ping", "{}"),))),
    (
        "json-null-arguments",
        call('{"name": "ping", "arguments": null}'),
        Outcome("", (("ping", "{}"),)),
    ),
    (
        "json-arguments-before-name",
        call('{"arguments": {"a": [1, "}"]}, "name": "f"}'),
        Outcome("", (("f", '{"a": [1, "}"]}'),)),
    ),
    (
        "json-parameters-alias",
        call('{"name": "f", "parameters": {"a": 1}}'),
        Outcome("", (("f", '{"a": 1}'),)),
    ),
    (
        "json-arguments-as-string",
        call('{"name": "f", "arguments": "{\\"a\\": \\"é\\"}"}'),
        Outcome("", (("f", '{"a": "é"}'),)),
    ),
    (
        "json-raw-control-characters-escaped",
        call('{"name": "f", "arguments": {"text": "one\ntwo\tthree"}}'),
        Outcome("", (("f", '{"text": "one\\ntwo\\tthree"}'),)),
    ),
    (
        "json-compact",
        '<tool_call>{"name":"f","arguments":{"a":1}}</tool_call>',
        Outcome("", (("f", '{"a":1}'),)),
    ),
    ("json-close-tag-missing-at-end", f"<tool_call>\n{WEATHER}\n", Outcome("", (WEATHER_CALL,))),
    (
        "json-close-tag-missing-before-next-call",
        f"<tool_call>\n{WEATHER}\n" + call('{"name": "ping", "arguments": {}}'),
        Outcome("", (WEATHER_CALL, ("ping", "{}"))),
    ),
    (
        "json-unknown-tool",
        call('{"name": "not_offered", "arguments": {"x": 1}}'),
        Outcome("", (("not_offered", '{"x": 1}'),)),
    ),
    (
        "json-trailing-comma",
        call('{"name": "f", "arguments": {"a": 1,}}'),
        Outcome(call('{"name": "f", "arguments": {"a": 1,}}'), (), invalid=(0,), malformed=1),
    ),
    (
        "json-not-json",
        'x<tool_call>\nget_weather(city="Seoul")\n</tool_call>y',
        Outcome('x<tool_call>\nget_weather(city="Seoul")\n</tool_call>y', (), malformed=1),
    ),
    (
        "json-cut-then-closed",
        '<tool_call>\n{"name": "f", "arguments": {"a": 1\n</tool_call>after',
        Outcome(
            '<tool_call>\n{"name": "f", "arguments": {"a": 1\n</tool_call>after',
            (),
            invalid=(0,),
            malformed=1,
        ),
    ),
    (
        "json-extra-brace",
        call('{"name": "f", "arguments": {"a": 1}}}'),
        Outcome(call('{"name": "f", "arguments": {"a": 1}}}'), (), invalid=(0,), malformed=1),
    ),
    (
        "json-duplicate-arguments",
        call('{"name": "f", "arguments": {"a": 1}, "arguments": {"a": 2}}'),
        Outcome(
            call('{"name": "f", "arguments": {"a": 1}, "arguments": {"a": 2}}'),
            (),
            invalid=(0,),
            malformed=1,
        ),
    ),
    (
        "json-name-not-a-string",
        call('{"name": 5, "arguments": {}}'),
        Outcome(call('{"name": 5, "arguments": {}}'), (), malformed=1),
    ),
    (
        "json-name-missing",
        call('{"arguments": {"a": 1}}'),
        Outcome(call('{"arguments": {"a": 1}}'), (), malformed=1),
    ),
    (
        "json-arguments-not-an-object",
        call('{"name": "f", "arguments": [1]}'),
        Outcome(call('{"name": "f", "arguments": [1]}'), (), invalid=(0,), malformed=1),
    ),
    (
        "json-broken-then-valid",
        call('{"name": "f", "arguments": {"a": }}') + "\n" + call(WEATHER),
        Outcome(
            call('{"name": "f", "arguments": {"a": }}') + "\n",
            (WEATHER_CALL,),
            invalid=(0,),
            malformed=1,
        ),
    ),
    (
        "empty-envelope",
        "<tool_call></tool_call>",
        Outcome("<tool_call></tool_call>", (), malformed=1),
    ),
    (
        "json-truncated-in-arguments",
        '<tool_call>\n{"name": "f", "arguments": {"a": "par',
        Outcome("", (("f", '{"a": "par'),), truncated=True, incomplete=0),
    ),
    (
        "json-truncated-before-name",
        'Hi <tool_call>\n{"na',
        Outcome('Hi <tool_call>\n{"na', (), truncated=True),
    ),
    (
        "truncated-after-open-tag",
        "Hi <tool_call>\n",
        Outcome("Hi <tool_call>\n", (), truncated=True),
    ),
    ("partial-open-tag-at-end", "Hi <tool_ca", Outcome("Hi <tool_ca", ())),
    (
        "xml-single",
        xml("get_weather", ("city", "Seoul")),
        Outcome("", (WEATHER_CALL,)),
    ),
    (
        "xml-typed-from-schema",
        xml(
            "get_weather",
            ("city", "Seoul"),
            ("days", "3"),
            ("metric", "true"),
            ("lat", "37.5"),
            ("opts", '{"unit": "C"}'),
            ("tags", '["a", "b"]'),
            ("note", "null"),
            ("zip", "01234"),
            ("limit", "10"),
        ),
        Outcome(
            "",
            (
                (
                    "get_weather",
                    '{"city": "Seoul", "days": 3, "metric": true, "lat": 37.5, '
                    '"opts": {"unit": "C"}, "tags": ["a", "b"], "note": null, "zip": "01234", '
                    '"limit": 10}',
                ),
            ),
        ),
    ),
    (
        "xml-types-fall-back-to-string",
        xml("get_weather", ("days", "three"), ("metric", "True"), ("extra", "42")),
        Outcome("", (("get_weather", '{"days": "three", "metric": true, "extra": "42"}'),)),
    ),
    (
        "xml-unknown-tool-values-are-strings",
        xml("other", ("n", "1"), ("flag", "true")),
        Outcome("", (("other", '{"n": "1", "flag": "true"}'),)),
    ),
    (
        "xml-parallel-with-text",
        "Checking both.\n"
        + xml("get_weather", ("city", "Seoul"))
        + "\n"
        + xml("get_weather", ("city", "Busan"), ("days", "2")),
        Outcome(
            "Checking both.\n",
            (WEATHER_CALL, ("get_weather", '{"city": "Busan", "days": 2}')),
        ),
    ),
    (
        "xml-multiline-value",
        xml("write_file", ("path", "a.py"), ("content", "\ndef f():\n    return 1\n\n")),
        Outcome(
            "",
            (("write_file", '{"path": "a.py", "content": "\\ndef f():\\n    return 1\\n\\n"}'),),
        ),
    ),
    (
        "xml-markup-in-value",
        xml("write_file", ("content", "<b>bold</b> & <i>{x}</i> </tool_call")),
        Outcome("", (("write_file", '{"content": "<b>bold</b> & <i>{x}</i> </tool_call"}'),)),
    ),
    ("xml-no-parameters", xml("list_files"), Outcome("", (("list_files", "{}"),))),
    (
        "xml-parameter-close-missing",
        call("<function=get_weather>\n<parameter=city>\nSeoul\n<parameter=days>\n2\n</function>"),
        Outcome("", (("get_weather", '{"city": "Seoul", "days": 2}'),)),
    ),
    (
        "xml-function-close-missing",
        call("<function=get_weather>\n<parameter=city>\nSeoul\n</parameter>"),
        Outcome("", (WEATHER_CALL,)),
    ),
    (
        "xml-unicode",
        xml("get_weather", ("city", "서울 🌧")),
        Outcome("", (("get_weather", '{"city": "서울 🌧"}'),)),
    ),
    (
        "xml-truncated-in-value",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nSeoul\n</parameter>\n"
        "<parameter=days>\n2",
        Outcome("", (("get_weather", '{"city": "Seoul"'),), truncated=True, incomplete=0),
    ),
    (
        "xml-truncated-in-name",
        "<tool_call>\n<function=get_wea",
        Outcome("<tool_call>\n<function=get_wea", (), truncated=True),
    ),
    (
        "xml-stray-text",
        call("<function=get_weather>\nhello\n</function>"),
        Outcome(call("<function=get_weather>\nhello\n</function>"), (), invalid=(0,), malformed=1),
    ),
    (
        "xml-not-a-function",
        call("<foo>bar</foo>") + xml("list_files"),
        Outcome(call("<foo>bar</foo>"), (("list_files", "{}"),), malformed=1),
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_is_the_same_for_every_chunking(text: str, expected: Outcome) -> None:
    for chunks in chunkings(text):
        assert parse(chunks) == expected, chunks
    for _, arguments in expected.calls if expected.incomplete is None else ():
        assert isinstance(json.loads(arguments), dict)


def _joined(deltas: list[ToolCallDelta]) -> str:
    return "".join(d.arguments for d in deltas)


def test_content_is_held_back_only_while_it_may_be_a_tag() -> None:
    parser = HermesToolParser()
    assert parser.feed("Hello <tool").content == "Hello "
    assert parser.feed("box").content == "<toolbox"
    assert parser.feed(" <").content == " "
    assert parser.feed("/tool_call>").content == "</tool_call>"


def test_json_arguments_stream_as_they_arrive() -> None:
    parser = HermesToolParser()
    piece = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seo')
    assert [(d.index, d.name) for d in piece.calls] == [(0, "get_weather")]
    assert _joined(piece.calls) == '{"city": "Seo'
    assert _joined(parser.feed('ul", "days": [1, ').calls) == 'ul", "days": [1, '
    assert _joined(parser.feed("2]}}\n</tool").calls) == "2]}"
    assert parser.call_count == 0  # not closed yet
    piece = parser.feed("_call>")
    assert (piece.content, piece.calls, parser.call_count) == ("", [], 1)


def test_json_arguments_before_name_wait_for_the_name() -> None:
    parser = HermesToolParser()
    assert parser.feed('<tool_call>\n{"arguments": {"a": 1}, ').calls == []
    piece = parser.feed('"name": "f"')
    assert [(d.name, d.arguments) for d in piece.calls] == [("f", '{"a": 1}')]


def test_xml_arguments_stream_per_parameter() -> None:
    parser = HermesToolParser(TOOLS)
    piece = parser.feed("<tool_call>\n<function=get_weather>\n<parameter=city>\nSeo")
    assert [(d.name, d.arguments) for d in piece.calls] == [("get_weather", "")]
    assert _joined(parser.feed("ul\n</parameter>\n<parameter=days>\n").calls) == '{"city": "Seoul"'
    assert _joined(parser.feed("3\n</parameter>\n").calls) == ', "days": 3'
    assert _joined(parser.feed("</function>").calls) == "}"
    assert parser.feed("\n</tool_call>").calls == []
    assert parser.call_count == 1


def test_a_malformed_call_is_flagged_where_its_text_comes_back() -> None:
    parser = HermesToolParser()
    first = parser.feed('<tool_call>\n{"name": "f", "arguments": {"a": 1')
    assert (first.malformed, first.invalidated, _joined(first.calls)) == (False, [], '{"a": 1')
    second = parser.feed("</tool_call>")
    assert second.malformed and second.invalidated == [0]
    assert second.content == '<tool_call>\n{"name": "f", "arguments": {"a": 1</tool_call>'
    assert parser.finish() == ToolParse()
    assert (parser.call_count, parser.invalid_calls, parser.malformed_count) == (0, [0], 1)


@pytest.mark.parametrize(
    ("text", "schema", "value"),
    [
        ("Seoul", None, "Seoul"),
        ("5", {"type": "string"}, "5"),
        ("5", {"type": "integer"}, 5),
        ("5.0", {"type": "integer"}, 5),
        ("5.5", {"type": "integer"}, "5.5"),
        ("-2.5e1", {"type": "number"}, -25.0),
        ("NaN", {"type": "number"}, "NaN"),
        ("False", {"type": "boolean"}, False),
        ("yes", {"type": "boolean"}, "yes"),
        ('{"a": [1]}', {"type": "object"}, {"a": [1]}),
        ("[1, 2]", {"type": "object"}, "[1, 2]"),
        ("[1, 2]", {"type": "array"}, [1, 2]),
        ("null", {"type": ["integer", "null"]}, None),
        ("null", {"type": ["string", "null"]}, None),
        ("none", {"type": ["string", "null"]}, "none"),
        ("7", {"oneOf": [{"type": "integer"}, {"type": "string"}]}, "7"),
        ("7", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 7),
        (" 8 ", {"type": "integer"}, 8),
    ],
    ids=[
        "no-schema",
        "string",
        "integer",
        "integer-from-float",
        "fraction-not-integer",
        "number",
        "nan-is-not-json",
        "python-bool",
        "bad-bool",
        "object",
        "array-is-not-object",
        "array",
        "nullable-null",
        "nullable-string-null",
        "nullable-string",
        "string-option-wins",
        "any-of",
        "padded-integer",
    ],
)
def test_typed_value(text: str, schema: dict[str, Any] | None, value: Any) -> None:
    assert typed_value(text, schema) == value
    assert type(typed_value(text, schema)) is type(value)


# Reasoning first, then the tool parser on the answer text: the chat service's pipeline.
PIPELINE_CASES: list[tuple[str, bool, str, Outcome]] = [
    (
        "reasoning-then-call",
        False,
        f"<think>\nNeed the weather.\n</think>\n\n{call(WEATHER)}",
        Outcome("", (WEATHER_CALL,), reasoning="Need the weather."),
    ),
    (
        "call-after-think-with-text",
        False,
        f"<think>\nx\n</think>\n\nChecking.\n{call(WEATHER)}",
        Outcome("Checking.\n", (WEATHER_CALL,), reasoning="x"),
    ),
    (
        "call-inside-reasoning-stays-reasoning",
        False,
        f"<think>maybe {call(WEATHER)}</think>ok",
        Outcome("ok", (), reasoning=f"maybe {call(WEATHER)}"),
    ),
    (
        "prompt-opened-then-xml-call",
        True,
        "Use the tool.\n</think>\n\n" + xml("get_weather", ("city", "Seoul"), ("days", "1")),
        Outcome("", (("get_weather", '{"city": "Seoul", "days": 1}'),), reasoning="Use the tool."),
    ),
    (
        "ends-inside-reasoning",
        True,
        "I will call <tool_call>",
        Outcome("", (), reasoning="I will call <tool_call>"),
    ),
]


@pytest.mark.parametrize(
    ("start_in_reasoning", "text", "expected"),
    [c[1:] for c in PIPELINE_CASES],
    ids=[c[0] for c in PIPELINE_CASES],
)
def test_pipeline_is_the_same_for_every_chunking(
    start_in_reasoning: bool, text: str, expected: Outcome
) -> None:
    for chunks in chunkings(text):
        splitter = ThinkSplitter(start_in_reasoning)
        splits = [*(splitter.feed(c) for c in chunks), splitter.finish()]
        reasoning = "".join(s.reasoning for s in splits)
        outcome = parse([s.content for s in splits])
        assert Outcome(**{**outcome.__dict__, "reasoning": reasoning}) == expected, chunks


# Pieces of both formats, whole and broken, to compose odd outputs from.
FRAGMENTS = [
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "<tool",
    "call>",
    "\n",
    " ",
    "{",
    "}",
    "[",
    '"',
    "\\",
    ":",
    ",",
    '"name"',
    '"arguments"',
    '"f"',
    "1",
    "null",
    "x",
    "é",
    "<function=f>",
    "</function>",
    "<parameter=a>",
    "</parameter>",
    WEATHER,
]


@pytest.mark.parametrize("seed", range(4))
def test_random_outputs_parse_the_same_for_every_chunking(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12)))
        whole = parse([text])
        for chunks in [list(text), *([text[:i], text[i:]] for i in range(1, len(text)))]:
            assert parse(chunks) == whole, chunks
        if whole.incomplete is None:
            assert all(isinstance(json.loads(a), dict) for _, a in whole.calls), text
        if not whole.calls and not whole.truncated:
            assert whole.content == text, "text that makes no call comes back unchanged"
