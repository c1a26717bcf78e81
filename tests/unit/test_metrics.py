"""/metrics through HTTP with a fake engine: parsed with prometheus_client's own parser."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.fakes import FakeEngine
from tests.promtext import Samples, parse, value

pytestmark = pytest.mark.anyio

Client = Callable[..., httpx.AsyncClient]
USER = [{"role": "user", "content": "Hi"}]


async def scrape(client: httpx.AsyncClient) -> Samples:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


async def test_counters_move_and_histograms_fill(make_client: Client) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    before = await scrape(client)
    chat = "/v1/chat/completions"
    ok = {"api": "openai", "endpoint": chat, "status": "200"}
    assert value(before, "mlxd_http_requests_total", **ok) == 0

    plain = await client.post(chat, json={"model": "alpha", "messages": USER})
    streamed = await client.post(chat, json={"model": "a", "messages": USER, "stream": True})
    assert plain.status_code == streamed.status_code == 200
    bad = await client.post(chat, json={"model": "alpha", "messages": []})
    assert bad.status_code == 400
    await client.get("/v1/no-such-route")

    after = await scrape(client)
    assert value(after, "mlxd_http_requests_total", **ok) == 2
    assert value(after, "mlxd_http_requests_total", **{**ok, "status": "400"}) == 1
    # Unknown paths share one label value instead of one series per path.
    assert value(after, "mlxd_http_requests_total", api="openai", endpoint="other",
                 status="404") == 1  # fmt: skip
    model = {"api": "openai", "model": "alpha"}
    assert value(after, "mlxd_generations_total", **model, finish="stop") == 2
    prompt = sum(len(r.prompt) for r in engine.requests)
    assert value(after, "mlxd_prompt_tokens_total", **model) == prompt
    assert value(after, "mlxd_completion_tokens_total", **model) == 6  # 3 pieces each
    assert value(after, "mlxd_time_to_first_token_seconds_count", **model) == 2
    assert value(after, "mlxd_time_to_first_token_seconds_bucket", **model, le="+Inf") == 2
    assert value(after, "mlxd_inter_token_latency_seconds_count", **model) == 2
    assert value(after, "mlxd_http_request_duration_seconds_count", api="openai",
                 endpoint=chat) == 3  # fmt: skip

    # Gauges read the live state at scrape time: they agree with /health.
    health = (await client.get("/health")).json()
    assert value(after, "mlxd_memory_budget_bytes") == health["memory"]["budget"]
    assert value(after, "mlxd_model_state", model="alpha", state="ready") == 1
    assert value(after, "mlxd_model_state", model="beta", state="unloaded") == 1
    assert value(after, "mlxd_model_swaps_total") == health["swaps"] == 1
    assert value(after, "mlxd_queue_depth") == 0
    assert value(after, "mlxd_requests_running") == 0
    assert value(after, "mlxd_memory_pressure_level") in (0, 1, 2)
    assert ("mlxd_model_load_seconds", frozenset({("model", "alpha")})) in after


async def test_each_app_counts_alone(make_client: Client) -> None:
    first, second = make_client(FakeEngine()), make_client(FakeEngine())
    await first.post("/v1/chat/completions", json={"model": "alpha", "messages": USER})
    samples = await scrape(second)
    assert value(samples, "mlxd_generations_total", api="openai", model="alpha",
                 finish="stop") == 0  # fmt: skip


async def test_status_json_lists_recent_requests_and_models(make_client: Client) -> None:
    client = make_client(FakeEngine())
    r = await client.post("/v1/chat/completions", json={"model": "alpha", "messages": USER})
    body = (await client.get("/status")).json()
    assert body["health"]["resident_model"] == "alpha"
    [recent] = body["recent_requests"]
    assert recent["id"] == r.json()["id"]
    assert recent["api"] == "openai" and recent["model"] == "alpha"
    assert recent["completion_tokens"] == 3 and recent["finish"] == "stop"
    assert recent["ttft_ms"] >= 0 and recent["tok_s"] >= 0
    assert [m["id"] for m in body["models"]] == ["alpha", "beta"]
    assert {m["availability"] for m in body["models"]} == {"present"}


async def test_status_page_and_assets_are_served(make_client: Client) -> None:
    client = make_client(FakeEngine())
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for src in ("/ui/status.js", "/ui/status.css"):
        assert f'"{src}"' in page.text
        asset = await client.get(src)
        assert asset.status_code == 200 and asset.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    missing = await client.get("/ui/../config.py")
    assert missing.status_code == 404
    assert (await client.get("/ui/secret.txt")).json()["error"]["message"]
