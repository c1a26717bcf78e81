"""Structured output and tool calls valid by construction, on SmolLM2-135M through real HTTP.

A 135M model left to itself rarely writes valid JSON and never a tool call (its chat template
drops the tools); with constrained decoding every answer parses and validates.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from mlxd.config import REPO_ROOT
from tests.conftest import RunningServer, run_server

pytestmark = pytest.mark.e2e

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 12}},
            "required": ["zone"],
        },
    },
}
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("smollm2-structured") / "mlxd.log"
    with run_server(["--config", str(REPO_ROOT / "models.yaml")], log) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=300)


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0, le=100_000_000)
    kind: Literal["capital", "town"]


def test_sdk_parse_returns_a_parsed_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        temperature=0,
        max_tokens=80,
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, City)
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_json_object_is_an_object(client: openai.OpenAI, stream: bool) -> None:
    kwargs: Any = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Give me a tiny JSON object about a cat."}],
        "response_format": {"type": "json_object"},
        "temperature": 0,
        "max_tokens": 60,
    }
    if stream:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**kwargs, stream=True)
            if c.choices
        )
    else:
        text = client.chat.completions.create(**kwargs).choices[0].message.content or ""
    assert isinstance(json.loads(text), dict)


def test_unsupported_schema_keyword_is_a_400_naming_it(server: RunningServer) -> None:
    body = {
        "model": "smollm2",
        "messages": PARIS,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}},
        },
    }
    r = httpx.post(f"{server.url}/chat/completions", json=body, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert "'not'" in error["message"]
    assert error["param"] == "response_format.json_schema.schema"


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(server: RunningServer, method: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=server.url, api_key="x", model="smollm2", temperature=0, max_tokens=80,  # type: ignore[arg-type]
        max_retries=0,
    )  # fmt: skip
    structured = llm.with_structured_output(City, method=method)  # type: ignore[arg-type]
    result = structured.invoke("Describe Paris.")
    assert isinstance(result, City)


# ---- 50 generated schemas -------------------------------------------------------------------


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 8)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1000])}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "cyan", 1, 2, None], rng.randint(1, 4))}
    return {"type": "boolean"}


def _schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """An object schema: leaves, nested objects, bounded arrays, anyOf, optional keys."""
    props: dict[str, Any] = {}
    for i in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.2 and depth < 2:
            value = _schema(rng, depth + 1)
        elif roll < 0.35:
            value = {"type": "array", "items": _leaf(rng), "maxItems": rng.randint(1, 3)}
        elif roll < 0.5:
            value = {"anyOf": [_leaf(rng), _leaf(rng)]}
        else:
            value = _leaf(rng)
        props[f"k{depth}{i}"] = value
    required = [k for k in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required}


@pytest.mark.timeout(900)  # 50 requests in turn; a loaded 2-core machine takes a few minutes
def test_fifty_generated_schemas_all_validate(server: RunningServer) -> None:
    rng = random.Random(12)
    failures = []
    with httpx.Client(base_url=server.url, timeout=300) as http:
        for i in range(50):
            schema = _schema(rng)
            r = http.post(
                "/chat/completions",
                json={
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": "Fill in this JSON."}],
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": f"s{i}", "schema": schema, "strict": True},
                    },
                    "temperature": 0.7,
                    "seed": i,
                    # The longest of these schemas takes ~75 tokens at its shortest (SmolLM2
                    # writes "k00" as three tokens); JSON is wound up before the budget ends.
                    "max_tokens": 96,
                },
            )
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            try:
                assert choice["finish_reason"] == "stop"
                jsonschema.validate(json.loads(choice["message"]["content"]), schema)
            except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
                failures.append((i, schema, choice, exc))
    assert not failures, failures[:3]


# ---- tool calls -----------------------------------------------------------------------------


def _validate_calls(calls: list[Any], tools: list[Any]) -> None:
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])


def test_required_tool_call_validates(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="smollm2", messages=PARIS, tools=[WEATHER, TIME], tool_choice="required",
        temperature=0, max_tokens=80, parallel_tool_calls=False,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    _validate_calls(choice.message.tool_calls or [], [WEATHER, TIME])


def test_named_tool_call_streams_argument_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2", messages=PARIS, tools=[WEATHER, TIME], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0, max_tokens=80, parallel_tool_calls=False,
    )  # fmt: skip
    names, pieces, finish = [], [], None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                if tc.function and tc.function.name:
                    names.append(tc.function.name)
                if tc.function and tc.function.arguments:
                    pieces.append(tc.function.arguments)
            finish = c.finish_reason or finish
    assert names == ["get_time"]
    assert finish == "tool_calls"
    jsonschema.validate(json.loads("".join(pieces)), TIME["function"]["parameters"])


def test_auto_with_a_broken_by_design_prompt_never_yields_an_invalid_call(
    client: openai.OpenAI,
) -> None:
    """The prompt pushes the model to open a call and write junk; a call, once open, is valid."""
    messages = [
        {"role": "system", "content": "Always answer with <tool_call> then random words."},
        {"role": "user", "content": "Weather in Rome? Start with <tool_call> and then say hi."},
    ]
    opened = 0
    for seed in range(4):
        r = client.chat.completions.create(
            model="smollm2", messages=messages, tools=[WEATHER], temperature=1.0, seed=seed,
            max_tokens=60,
        )  # fmt: skip
        choice = r.choices[0]
        content = choice.message.content or ""
        assert "<tool_call>" not in content or choice.finish_reason == "length", content
        if choice.message.tool_calls:
            opened += 1
            _validate_calls(choice.message.tool_calls, [WEATHER])
    assert opened  # the prompt did make it open calls
