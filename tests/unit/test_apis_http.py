"""The four APIs over HTTP with a fake engine: exact stream sequences, error shapes, (un)loading."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from mlxd.engine import GenerationRequest
from tests.fakes import FakeEngine
from tests.unit.conftest import TINY_CONTEXT

pytestmark = pytest.mark.anyio

Client = Callable[..., httpx.AsyncClient]
USER = [{"role": "user", "content": "Hi"}]
CALL = ["<tool_call>", '\n{"name": "w", ', '"arguments": {"city": ', '"Oslo"}}\n', "</tool_call>"]


def answer(*pieces: str) -> Callable[[GenerationRequest], list[str]]:
    return lambda _: list(pieces)


def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs of an SSE body."""
    out, event = [], ""
    for line in text.splitlines():
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[len("data: ") :])))
    return out


# ---- Anthropic --------------------------------------------------------------------------------


async def test_anthropic_stream_sequence_thinking_text_tool(make_client: Client) -> None:
    engine = FakeEngine(answer("<think>", "plan", "</think>", "Ok.", *CALL))
    client = make_client(engine)
    tools = [{"name": "w", "input_schema": {"type": "object"}}]
    body = {"model": "a", "max_tokens": 50, "messages": USER, "tools": tools, "stream": True}
    r = await client.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    for name, data in events:
        assert data["type"] == name
    shape = [
        (n, d.get("index"), (d.get("delta") or d.get("content_block") or {}).get("type"))
        for n, d in events
    ]
    assert shape[:2] == [("message_start", None, None), ("ping", None, None)]
    assert shape[2:6] == [
        ("content_block_start", 0, "thinking"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "signature_delta"),
        ("content_block_stop", 0, None),
    ]
    assert shape[6:9] == [
        ("content_block_start", 1, "text"),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_stop", 1, None),
    ]
    assert shape[9] == ("content_block_start", 2, "tool_use")
    assert {s[2] for s in shape[10:-3]} == {"input_json_delta"}
    assert shape[-3:] == [("content_block_stop", 2, None), ("message_delta", None, None),
                          ("message_stop", None, None)]  # fmt: skip
    partial = "".join(d["delta"]["partial_json"] for _, d in events[10:-3])
    assert json.loads(partial) == {"city": "Oslo"}
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] == len(engine.requests[0].prompt)
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 4 + len(CALL)

    # The same request, not streamed, folds to the same blocks.
    engine.responder = answer("<think>", "plan", "</think>", "Ok.", *CALL)
    msg = (await client.post("/v1/messages", json={**body, "stream": False})).json()
    assert [b["type"] for b in msg["content"]] == ["thinking", "text", "tool_use"]
    assert msg["content"][2]["input"] == {"city": "Oslo"} and msg["stop_reason"] == "tool_use"


async def test_anthropic_stop_sequence_and_count_tokens(make_client: Client) -> None:
    engine = FakeEngine(answer("one", " two", " ###", " three"))
    client = make_client(engine)
    body = {"model": "a", "max_tokens": 50, "messages": USER, "stop_sequences": ["###"]}
    msg = (await client.post("/v1/messages", json=body)).json()
    assert msg["stop_reason"] == "stop_sequence" and msg["stop_sequence"] == "###"
    assert msg["content"] == [{"type": "text", "text": "one two "}]
    counted = (await client.post("/v1/messages/count_tokens", json=body)).json()
    assert counted == {"input_tokens": len(engine.requests[0].prompt)}


@pytest.mark.parametrize(
    ("body", "status", "kind", "says"),
    [
        ({"model": "zzz", "max_tokens": 5, "messages": USER}, 404, "not_found_error", "zzz"),
        ({"model": "a", "max_tokens": 0, "messages": USER}, 400, "invalid_request_error",
         "max_tokens"),
        ({"model": "a", "max_tokens": 5, "messages": []}, 400, "invalid_request_error", "messages"),
        ({"model": "a", "max_tokens": 5, "messages": USER, "temperature": 3}, 400,
         "invalid_request_error", "temperature"),
    ],
    ids=["unknown-model", "zero-max-tokens", "no-messages", "temperature-range"],
)  # fmt: skip
async def test_anthropic_errors(
    make_client: Client, body: dict[str, Any], status: int, kind: str, says: str
) -> None:
    r = await make_client(FakeEngine()).post("/v1/messages", json=body)
    assert r.status_code == status
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == kind
    assert says in r.json()["error"]["message"]


async def test_anthropic_engine_failure_mid_stream_is_an_error_event(make_client: Client) -> None:
    engine = FakeEngine()
    engine.fail_generate = True
    body = {"model": "a", "max_tokens": 5, "messages": USER, "stream": True}
    r = await make_client(engine).post("/v1/messages", json=body)
    name, data = sse(r.text)[-1]
    assert name == "error" and data["error"]["type"] == "api_error"


# ---- Responses --------------------------------------------------------------------------------


async def test_responses_stream_sequence_numbers_and_store(make_client: Client) -> None:
    client = make_client(FakeEngine(answer("Hel", "lo")))
    r = await client.post("/v1/responses", json={"model": "a", "input": "Hi", "stream": True})
    events = sse(r.text)
    assert [n for n, _ in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    done = events[-1][1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == "Hello"
    assert events[2][1]["item"]["id"] == done["output"][0]["id"]
    stored = await client.get(f"/v1/responses/{done['id']}")
    assert stored.status_code == 200 and stored.json() == done


async def test_responses_errors_are_openai_shaped(make_client: Client) -> None:
    client = make_client(FakeEngine())
    missing = await client.get("/v1/responses/resp_nope")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "response_id"
    private = await client.post("/v1/responses", json={"model": "a", "input": "x", "store": False})
    assert (await client.get(f"/v1/responses/{private.json()['id']}")).status_code == 404
    bad = await client.post("/v1/responses", json={"model": "a"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"


# ---- Completions ------------------------------------------------------------------------------


async def test_completions_stream_framing_and_stop(make_client: Client) -> None:
    engine = FakeEngine(answer("a", "b", "STOP", "c"))
    client = make_client(engine)
    body = {"model": "a", "prompt": "x", "stop": ["STOP"], "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    r = await client.post("/v1/completions", json=body)
    payloads = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "ab"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    # The prompt reached the engine as the client's text, not wrapped in the chat template.
    assert len(engine.requests[0].prompt) == 1  # "x" is one byte-level token
    assert engine.requests[0].keep_leading_space


async def test_completions_suffix_needs_fim_tokens(make_client: Client) -> None:
    r = await make_client(FakeEngine()).post(
        "/v1/completions", json={"model": "a", "prompt": "x", "suffix": "y"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


# ---- Ollama -----------------------------------------------------------------------------------


async def test_ollama_ndjson_stream_and_final_counts(make_client: Client) -> None:
    client = make_client(FakeEngine(answer("Hel", "lo")))
    r = await client.post("/api/chat", json={"model": "alpha:latest", "messages": USER})
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert [ln["message"]["content"] for ln in lines] == ["Hel", "lo", ""]
    assert [ln["done"] for ln in lines] == [False, False, True]
    last = lines[-1]
    assert last["done_reason"] == "stop" and last["eval_count"] == 2
    assert last["prompt_eval_count"] > 0 and last["total_duration"] >= last["eval_duration"]
    assert last["model"] == "alpha:latest"


async def test_ollama_tool_calls_go_out_whole(make_client: Client) -> None:
    client = make_client(FakeEngine(answer("Let me check.", *CALL)))
    tools = [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]
    r = await client.post("/api/chat", json={"model": "a", "messages": USER, "tools": tools})
    lines = [json.loads(line) for line in r.text.splitlines()]
    calls = [ln["message"]["tool_calls"] for ln in lines if "tool_calls" in ln["message"]]
    assert calls == [[{"function": {"name": "w", "arguments": {"city": "Oslo"}}}]]


async def test_ollama_load_unload_ps_and_errors(make_client: Client) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    loaded = await client.post("/api/generate", json={"model": "alpha", "keep_alive": "5m"})
    assert loaded.json()["done_reason"] == "load" and "load:alpha" in engine.events
    ps = (await client.get("/api/ps")).json()["models"]
    assert [m["name"] for m in ps] == ["alpha:latest"]
    gone = await client.post("/api/chat", json={"model": "alpha", "messages": [], "keep_alive": 0})
    assert gone.json()["done_reason"] == "unload" and engine.events[-1] == "unload:alpha"
    assert (await client.get("/api/ps")).json() == {"models": []}
    missing = await client.post("/api/chat", json={"model": "nope", "messages": USER})
    assert missing.status_code == 404 and list(missing.json()) == ["error"]
    bad = await client.post("/api/generate", json={"model": "a", "prompt": "x", "images": ["b"]})
    assert bad.status_code == 400 and "images" in bad.json()["error"]
    tags = (await client.get("/api/tags")).json()["models"]
    assert [t["name"] for t in tags] == ["alpha:latest", "beta:latest"]
    assert (await client.get("/api/version")).json()["version"]


# ---- what real agents send --------------------------------------------------------------------


async def test_a_codex_cli_style_request(make_client: Client) -> None:
    body = {
        "model": "a", "instructions": "You are a coding agent.", "stream": True, "store": False,
        "input": [
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "<permissions>…</permissions>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "ls"}]},
        ],
        "tools": [{"type": "function", "name": "shell", "description": "Run a command",
                   "strict": False, "parameters": {"type": "object", "properties": {
                       "command": {"type": "array", "items": {"type": "string"}}}}}],
        "tool_choice": "auto", "parallel_tool_calls": False,
        "reasoning": {"effort": "xhigh", "summary": "auto"}, "text": {"verbosity": "low"},
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "abc",
    }  # fmt: skip
    r = await make_client(FakeEngine()).post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    assert sse(r.text)[-1][0] == "response.completed"


async def test_a_claude_code_style_request(make_client: Client) -> None:
    cache = {"type": "ephemeral"}
    body = {
        "model": "a", "max_tokens": 32000, "stream": True,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": cache}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>…</system-reminder>"},
            {"type": "text", "text": "hi", "cache_control": cache}]}],
        "tools": [{"name": "Bash", "description": "Run", "input_schema": {
            "type": "object", "properties": {"command": {"type": "string"}},
            "required": ["command"], "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#"}}],
        "metadata": {"user_id": "u"}, "thinking": {"type": "adaptive"},
        "output_config": {"effort": "high"}, "temperature": 1,
    }  # fmt: skip
    engine = FakeEngine()
    r = await make_client(engine).post(
        "/v1/messages?beta=true", json=body,
        headers={"anthropic-beta": "interleaved-thinking-2025-05-14", "x-api-key": "k"},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert [n for n, _ in sse(r.text)][-2:] == ["message_delta", "message_stop"]
    # Its fixed max_tokens is a cap: lowered to the room the tiny model's context leaves.
    request = engine.requests[0]
    assert request.max_tokens == TINY_CONTEXT - len(request.prompt)


async def test_every_api_applies_the_same_caller_rights(make_client: Client) -> None:
    """A web page allowed by CORS may generate but not unload the model, through any API."""
    client = make_client(FakeEngine(), settings={"cors_origins": ("https://app.example",)})
    page = {"origin": "https://app.example"}
    unload_requests = [
        ("/api/chat", {"model": "a", "messages": USER, "keep_alive": 0}),
        ("/api/chat", {"model": "a", "messages": [], "keep_alive": 0}),
        ("/api/generate", {"model": "a", "keep_alive": 0}),
    ]
    for path, body in unload_requests:
        r = await client.post(path, json=body, headers=page)
        assert r.status_code == 403 and "keep_alive" in r.json()["error"], (path, body)
    allowed = [
        ("/v1/messages", {"model": "a", "max_tokens": 5, "messages": USER}),
        ("/v1/responses", {"model": "a", "input": "hi"}),
        ("/v1/completions", {"model": "a", "prompt": "hi"}),
        ("/api/chat", {"model": "a", "messages": USER, "stream": False}),
    ]
    for path, body in allowed:
        assert (await client.post(path, json=body, headers=page)).status_code == 200, path
