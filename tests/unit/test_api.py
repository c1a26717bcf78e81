"""The HTTP surface with a fake engine: shapes, SSE framing, errors, stops, tool calls."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.fakes import FakeEngine
from tests.unit.conftest import TINY_CONTEXT

pytestmark = pytest.mark.anyio

Client = Callable[..., httpx.AsyncClient]
USER = [{"role": "user", "content": "Hi"}]


def sse_payloads(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def chunks(text: str) -> list[dict[str, Any]]:
    payloads = sse_payloads(text)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


async def test_models_lists_configured_models(make_client: Client) -> None:
    client = make_client(FakeEngine())
    r = await client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["alpha", "beta"]
    assert all(m["object"] == "model" and m["status"] == "unloaded" for m in body["data"])


async def test_chat_completion_shape_and_usage(make_client: Client) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    r = await client.post("/v1/chat/completions", json={"model": "a", "messages": USER})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "alpha"  # aliases resolve to the id
    assert r.headers["x-mlxd-model"] == "alpha"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello there!"}
    assert choice["finish_reason"] == "stop"
    prompt = engine.requests[0].prompt
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["total_tokens"] == len(prompt) + 3


async def test_stream_framing(make_client: Client) -> None:
    client = make_client(FakeEngine())
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "alpha", "messages": USER, "stream": True,
              "stream_options": {"include_usage": True}},
    )  # fmt: skip
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    items = chunks(r.text)
    assert items[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in items)
    assert len({c["id"] for c in items}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in items if c["choices"])
    assert text == "Hello there!"
    assert items[-2]["choices"][0]["finish_reason"] == "stop"
    assert items[-2]["choices"][0]["delta"] == {}
    assert items[-1]["choices"] == [] and items[-1]["usage"]["completion_tokens"] == 3


async def test_stream_without_usage_has_no_usage_chunk(make_client: Client) -> None:
    client = make_client(FakeEngine())
    r = await client.post(
        "/v1/chat/completions", json={"model": "alpha", "messages": USER, "stream": True}
    )
    assert all("usage" not in c for c in chunks(r.text))


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("there", "Hello "),
        (["!"], "Hello there"),
        ("lo th", "Hel"),  # split across tokens
        ("nowhere", "Hello there!"),
    ],
    ids=["word", "list", "split-across-tokens", "absent"],
)
async def test_stop_strings_never_leak(make_client: Client, stop: Any, expected: str) -> None:
    client = make_client(FakeEngine())
    for stream in (False, True):
        r = await client.post(
            "/v1/chat/completions",
            json={"model": "alpha", "messages": USER, "stop": stop, "stream": stream},
        )
        if stream:
            items = chunks(r.text)
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in items)
            reason = items[-1]["choices"][0]["finish_reason"]
        else:
            text = r.json()["choices"][0]["message"]["content"]
            reason = r.json()["choices"][0]["finish_reason"]
        assert text == expected
        assert reason == "stop"


async def test_max_tokens_gives_length(make_client: Client) -> None:
    client = make_client(FakeEngine())
    r = await client.post(
        "/v1/chat/completions", json={"model": "alpha", "messages": USER, "max_tokens": 2}
    )
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "Hello there"
    assert body["usage"]["completion_tokens"] == 2


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return dict(err)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "alpha"}, "messages"),
        ({"model": "alpha", "messages": "hi"}, "messages"),
        ({"model": "alpha", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "alpha", "messages": USER, "temperature": "hot"}, "temperature"),
        ({"model": "alpha", "messages": USER, "temperature": 3}, "temperature"),
        ({"model": "alpha", "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": "alpha", "messages": USER, "n": 0}, "n"),
        ({"model": "alpha", "messages": USER, "top_logprobs": 2}, "top_logprobs"),
        ({"model": "alpha", "messages": USER, "response_format": {"type": "json_schema"}},
         "response_format.json_schema"),
        ({"model": "alpha", "messages": USER, "stop": ""}, "stop"),
        ({"model": "alpha", "messages": USER, "tool_choice": "required"}, "tool_choice"),
        ({"messages": USER}, "model"),
    ],
    ids=["no-messages", "messages-not-list", "bad-role", "temp-type", "temp-range", "max-tokens-0",
         "n", "logprobs", "response-format", "empty-stop", "tool-choice-without-tools", "no-model"],
)  # fmt: skip
async def test_bad_requests_name_the_field(make_client: Client, body: Any, param: str) -> None:
    client = make_client(FakeEngine())
    err = _error(await client.post("/v1/chat/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert param.split("[")[0] in err["message"]


async def test_malformed_json_is_400(make_client: Client) -> None:
    client = make_client(FakeEngine())
    r = await client.post(
        "/v1/chat/completions", content=b'{"model": "alpha", "messages": [',
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert "not valid JSON" in _error(r, 400)["message"]


async def test_unknown_fields_are_accepted(make_client: Client) -> None:
    client = make_client(FakeEngine())
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "alpha", "messages": USER, "user": "u1", "metadata": {"a": 1},
              "store": False, "service_tier": "auto", "parallel_tool_calls": True},
    )  # fmt: skip
    assert r.status_code == 200


async def test_unknown_model_is_404(make_client: Client) -> None:
    client = make_client(FakeEngine())
    r = await client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": USER})
    err = _error(r, 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "alpha" in err["message"]


async def test_paths_are_never_loaded_from_requests(make_client: Client) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    r = await client.post("/v1/chat/completions", json={"model": "/etc", "messages": USER})
    assert r.status_code == 404
    assert engine.events == []


async def test_context_length_exceeded(make_client: Client) -> None:
    client = make_client(FakeEngine())
    long = [{"role": "user", "content": "x" * (TINY_CONTEXT + 100)}]  # one token per byte
    err = _error(
        await client.post("/v1/chat/completions", json={"model": "alpha", "messages": long}), 400
    )
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    err = _error(
        await client.post(
            "/v1/chat/completions",
            json={"model": "alpha", "messages": USER, "max_tokens": TINY_CONTEXT + 1},
        ),
        400,
    )
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert "at most" in err["message"]


async def test_engine_failure_is_500_and_server_keeps_serving(make_client: Client) -> None:
    engine = FakeEngine(fail_generate=True)
    client = make_client(engine)
    err = _error(
        await client.post("/v1/chat/completions", json={"model": "alpha", "messages": USER}), 500
    )
    assert err["code"] == "engine_error"
    engine.fail_generate = False
    r = await client.post("/v1/chat/completions", json={"model": "alpha", "messages": USER})
    assert r.status_code == 200


async def test_engine_failure_mid_stream_is_reported_in_band(make_client: Client) -> None:
    engine = FakeEngine(fail_generate=True)
    client = make_client(engine)
    r = await client.post(
        "/v1/chat/completions", json={"model": "alpha", "messages": USER, "stream": True}
    )
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["error"]["code"] == "engine_error"


async def test_unknown_route_is_openai_shaped_404(make_client: Client) -> None:
    client = make_client(FakeEngine())
    _error(await client.get("/v1/nothing"), 404)


async def test_health(make_client: Client) -> None:
    client = make_client(FakeEngine())
    await client.post("/v1/chat/completions", json={"model": "alpha", "messages": USER})
    body = (await client.get("/health")).json()
    assert body["status"] == "ok"
    assert body["resident_model"] == "alpha" and body["resident_state"] == "ready"
    assert body["queue_depth"] == 0 and body["active_requests"] == 0


async def test_sampling_defaults_layering(make_client: Client) -> None:
    engine = FakeEngine()
    client = make_client(engine, defaults={"temperature": 0.3, "top_k": 7})
    await client.post(
        "/v1/chat/completions", json={"model": "alpha", "messages": USER, "top_k": 3, "seed": 5}
    )
    s = engine.requests[-1].sampling
    assert (s.temperature, s.top_k, s.top_p, s.seed) == (0.3, 3, 1.0, 5)


TOOL_OUT = ['Let me check.', '<tool_call>', '\n{"name": "get_weather", ',
            '"arguments": {"city": "Seoul"}}\n', '</tool_call>']  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip


async def test_tool_calls_non_stream_and_stream_agree(make_client: Client) -> None:
    client = make_client(FakeEngine(responder=lambda req: TOOL_OUT))
    body = {"model": "alpha", "messages": USER, "tools": TOOLS}
    r = (await client.post("/v1/chat/completions", json=body)).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Seoul"}

    items = chunks((await client.post("/v1/chat/completions",
                                       json={**body, "stream": True})).text)  # fmt: skip
    deltas = [c["choices"][0]["delta"] for c in items]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert calls[0]["type"] == "function" and calls[0]["index"] == 0
    joined = "".join(c["function"]["arguments"] for c in calls)
    assert json.loads(joined) == {"city": "Seoul"}
    assert items[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_reasoning_is_split(make_client: Client) -> None:
    out = ["<think>", "\nweighing", " it\n", "</think>", "\n\nAnswer."]
    client = make_client(FakeEngine(responder=lambda req: out))
    r = (await client.post("/v1/chat/completions", json={"model": "alpha",
                                                         "messages": USER})).json()  # fmt: skip
    message = r["choices"][0]["message"]
    assert message["content"].strip() == "Answer."
    assert message["reasoning_content"].strip() == "weighing it"


async def test_keep_alive_comments_while_the_prompt_is_processed(make_client: Client) -> None:
    """A slow first token (long prefill) still gets SSE comments, so proxies keep the line."""
    engine = FakeEngine(responder=lambda req: ["late"], delay=0.5)
    client = make_client(engine, settings={"sse_ping_seconds": 0.1})
    r = await client.post(
        "/v1/chat/completions", json={"model": "alpha", "messages": USER, "stream": True}
    )
    lines = r.text.splitlines()
    first_content = next(i for i, line in enumerate(lines) if '"content":"late"' in line)
    assert any(line.startswith(":") for line in lines[:first_content])
    assert sse_payloads(r.text)[-1] == "[DONE]"


async def test_parallel_tool_calls_false_returns_one_call(make_client: Client) -> None:
    two = [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    ]
    client = make_client(FakeEngine(responder=lambda req: two))
    body = {"model": "alpha", "messages": USER, "tools": TOOLS}
    both = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
    assert len(both["message"]["tool_calls"]) == 2
    one = (
        await client.post("/v1/chat/completions", json={**body, "parallel_tool_calls": False})
    ).json()["choices"][0]
    assert [json.loads(c["function"]["arguments"]) for c in one["message"]["tool_calls"]] == [
        {"city": "Seoul"}
    ]
    assert one["finish_reason"] == "tool_calls"
