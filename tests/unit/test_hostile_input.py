"""Hostile request bodies and limits, through the ASGI app with a fake engine (fast).

The same findings against the real model are in tests/e2e/test_hostile_smollm2.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from mlxd.errors import Overloaded
from mlxd.limits import (
    InflightLimit,
    RateLimitFilter,
    RequestLimits,
    connection_cap,
    listen_backlog,
)
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

Client = Callable[..., httpx.AsyncClient]
USER = [{"role": "user", "content": "Hi"}]
VOCAB = 263  # tests.fakes.tiny_model_dir: its config.json vocab_size


async def post_raw(client: httpx.AsyncClient, body: bytes) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": {str(VOCAB): 5}}, "logit_bias"),
        ({"logit_bias": {"100000000": 5}}, "logit_bias"),
        ({"logit_bias": {str(2**70): 1}}, "logit_bias"),
        ({"logit_bias": {"-3": 1}}, "logit_bias"),
        ({"logit_bias": {"²": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -2}, "seed"),
        ({"stop": ["x" * 5000]}, "stop"),
        ({"keep_alive": 10**12}, "keep_alive"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
            "tools[0].function.parameters",
        ),
    ],
)
async def test_bad_fields_are_400_naming_the_field(
    make_client: Client, extra: dict[str, Any], param: str
) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    for stream in (False, True):  # streaming too: refused before the SSE headers go out
        body = {"model": "a", "messages": USER, "stream": stream, **extra}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["param"] == param
        assert "Value error" not in r.json()["error"]["message"]
    assert not engine.requests


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model":"a","messages":[{"role":"user","content":"Hi"}],"logit_bias":{"5":NaN}}',
         "logit_bias"),
        (b'{"model":"a","messages":[{"role":"user","content":"Hi"}],"temperature":NaN}',
         "temperature"),
        (b'{"model":"a","messages":[{"role":"user","content":"Hi"}],"repetition_penalty":Infinity}',
         "repetition_penalty"),
        (b'{"model":"a","messages":[{"role":"user","content":"\\ud800"}]}', "messages[0].content"),
        (b'{"model":"a","messages":[{"role":"user","content":"Hi","name":"\\udfff"}]}',
         "messages[0].name"),
        # A lone surrogate in a key: the error names the key escaped (it must be encodable).
        (b'{"model":"a","messages":[{"role":"user","content":"Hi"}],"\\ud800":null}',
         "\\ud800"),
    ],
)  # fmt: skip
async def test_non_finite_numbers_and_lone_surrogates(
    make_client: Client, raw: bytes, param: str
) -> None:
    client = make_client(FakeEngine())
    r = await post_raw(client, raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_deep_nesting_is_400(make_client: Client) -> None:
    client = make_client(FakeEngine())
    r = await post_raw(client, b"[" * 10000 + b"]" * 10000)
    assert r.status_code == 400
    deep = {"model": "a", "messages": USER, "metadata": {}}
    node = deep["metadata"]
    for _ in range(100):
        node["x"] = {}
        node = node["x"]
    r = await post_raw(client, json.dumps(deep).encode())
    assert r.status_code == 400
    assert "nested deeper" in r.json()["error"]["message"]


async def test_seed_minus_one_means_random_and_top_k_past_vocab_means_off(
    make_client: Client,
) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    body = {"model": "a", "messages": USER, "seed": -1, "top_k": 1_000_000, "temperature": 0.7}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    sampling = engine.requests[0].sampling
    assert sampling.seed is None
    assert sampling.top_k == 0
    big = {**body, "seed": 2**64 - 1, "top_k": 5, "logit_bias": {str(VOCAB - 1): -100}}
    assert (await client.post("/v1/chat/completions", json=big)).status_code == 200
    assert engine.requests[1].sampling.seed == 2**64 - 1
    assert engine.requests[1].sampling.top_k == 5


async def test_declared_body_over_the_limit_is_413_unread(make_client: Client) -> None:
    engine = FakeEngine()
    client = make_client(engine, settings={"max_body_bytes": 4096})
    big = {"model": "a", "messages": USER, "x": "y" * 5000}
    r = await post_raw(client, json.dumps(big).encode())
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    assert not engine.requests


async def test_chunked_body_is_counted_while_it_streams(make_client: Client) -> None:
    client = make_client(FakeEngine(), settings={"max_body_bytes": 4096})
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1000):  # 1 MB offered; the server stops reading past 4 KiB
            sent += 1
            yield b" " * 1024

    r = await client.post(
        "/v1/chat/completions", content=body(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert sent < 1000


async def test_body_limit_refuses_both_lengths_and_a_stalled_body() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def never() -> dict[str, Any]:
        await asyncio.sleep(3600)
        raise AssertionError

    both = {"type": "http", "headers": [(b"content-length", b"5"),
                                        (b"transfer-encoding", b"chunked")]}  # fmt: skip
    await RequestLimits(app, 1024, 0.05)(both, never, send)
    assert sent[0]["status"] == 400
    stalled = {"type": "http", "headers": [(b"content-length", b"5")]}
    from mlxd.errors import RequestTimeout

    with pytest.raises(RequestTimeout):
        await RequestLimits(app, 1024, 0.05)(stalled, never, send)


@pytest.mark.parametrize("batch", [1, 3])
async def test_queue_limit_refuses_with_retry_after(make_client: Client, batch: int) -> None:
    engine = FakeEngine(delay=0.5)  # each request holds its place for 1.5 s
    client = make_client(engine, settings={"queue_size": 2, "max_concurrency": batch})
    body = {"model": "a", "messages": USER}
    # Loaded first: while it loads, the manager's own queue (waiters only) refuses earlier.
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    results = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=body) for _ in range(8))
    )
    codes = sorted(r.status_code for r in results)
    assert set(codes) == {200, 503}
    assert codes.count(200) == batch + 2  # a full batch running + two waiting
    busy = next(r for r in results if r.status_code == 503)
    assert int(busy.headers["retry-after"]) >= 1
    assert busy.json()["error"]["code"] == "overloaded"
    health = (await client.get("/health")).json()
    assert health["in_flight"] == 0
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200


async def test_head_health(make_client: Client) -> None:
    client = make_client(FakeEngine())
    r = await client.head("/health")
    assert r.status_code == 200


def test_inflight_slot_releases_once() -> None:
    limit = InflightLimit(1)
    slot = limit.enter()
    with pytest.raises(Overloaded):
        limit.enter()
    slot.release()
    slot.release()
    assert limit.count == 0


def test_rate_limit_filter_one_line_per_distinct_error() -> None:
    f = RateLimitFilter(interval=60)

    def record(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("asyncio", level, __file__, 1, msg, None, None)

    passed = [f.filter(record("socket.accept() out of system resource")) for _ in range(1000)]
    assert passed.count(True) == 1
    assert f.filter(record("another error"))
    assert all(f.filter(record("chat id=x", logging.INFO)) for _ in range(10))
    f.interval = 0  # the interval is over: the next line says how many were dropped
    later = record("socket.accept() out of system resource")
    assert f.filter(later)
    assert "999 more like this" in later.getMessage()


def test_connection_cap_stays_below_the_open_file_limit() -> None:
    assert connection_cap(256, None) == 128
    assert connection_cap(2048, None) == 1920
    assert connection_cap(1 << 20, None) == 4096
    assert connection_cap(2048, 5000) == 1920
    assert connection_cap(2048, 100) == 100


async def test_lone_surrogate_in_a_key_is_reported_printably(make_client: Client) -> None:
    client = make_client(FakeEngine())
    raw = b'{"model":"a","messages":[{"role":"user","content":"Hi"}],"chat_template_kwargs":'
    r = await post_raw(client, raw + b'{"\\ud800":1}}')
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "chat_template_kwargs.\\ud800"


def test_listen_backlog_fits_beside_the_connections() -> None:
    assert listen_backlog(256, 128) == 64
    assert listen_backlog(1 << 16, 4096) == 2048
    assert listen_backlog(100, 92) == 16
