"""Seeing what the server does, with the real default model over real HTTP: /metrics parsed
by prometheus_client after real requests, ``--log-format json`` request lines, a cancelled
stream, and the status page in a real headless Chromium (screenshot kept as an artifact)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mlxd.config import REPO_ROOT
from tests.conftest import RunningServer, run_server
from tests.e2e.chromium import chromium_path, open_page
from tests.promtext import Samples, parse, value

pytestmark = pytest.mark.e2e

# Long enough (> 64 tokens) for the prefix cache to keep and reuse it.
SYSTEM = "You are a terse assistant. " + " ".join(
    f"Rule {i}: answer in as few words as possible and never apologise." for i in range(12)
)


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("observe-server") / "mlxd.log"
    args = ["--config", str(REPO_ROOT / "models.yaml"), "--preload", "--log-format", "json"]
    with run_server(args, log) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def scrape(server: RunningServer) -> Samples:
    r = httpx.get(f"{server.root}/metrics", timeout=10)
    assert r.status_code == 200
    return parse(r.text)


def request_lines(server: RunningServer) -> dict[str, dict[str, Any]]:
    """The JSON request log lines so far, by request id."""
    out = {}
    for line in server.log_text().splitlines():
        if line.startswith("{"):
            obj = json.loads(line)  # every log line is one JSON object
            if obj.get("event") == "request":
                out[obj["id"]] = obj
    return out


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Name a colour."}]  # fmt: skip
    return client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=6, **kwargs
    )  # type: ignore[call-overload]


def test_metrics_move_with_real_requests(server: RunningServer, client: openai.OpenAI) -> None:
    before = scrape(server)
    first = chat(client)
    second = chat(client)  # same history: served from the prefix cache
    streamed = list(chat(client, stream=True, stream_options={"include_usage": True}))
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"api": "openai", "endpoint": "/v1/chat/completions", "status": "200"}
    assert delta("mlxd_http_requests_total", **ok) == 3
    model = {"api": "openai", "model": "smollm2"}
    usages = [first.usage, second.usage, streamed[-1].usage]
    assert delta("mlxd_completion_tokens_total", **model) == sum(
        u.completion_tokens for u in usages
    )
    assert delta("mlxd_prompt_tokens_total", **model) == sum(u.prompt_tokens for u in usages)
    assert delta("mlxd_time_to_first_token_seconds_count", **model) == 3
    assert delta("mlxd_time_to_first_token_seconds_sum", **model) > 0
    assert delta("mlxd_inter_token_latency_seconds_count", **model) == 3
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0
    assert delta("mlxd_prefix_cache_hits_total", model="smollm2") >= 1
    assert delta("mlxd_prefix_cache_reused_tokens_total", model="smollm2") >= cached

    # State read at scrape time: the resident model, its memory, its load.
    assert value(after, "mlxd_model_state", model="smollm2", state="ready") == 1
    assert value(after, "mlxd_memory_weights_bytes") > 100 * 2**20
    assert value(after, "mlxd_memory_budget_bytes") > value(after, "mlxd_memory_weights_bytes")
    assert value(after, "mlxd_model_load_seconds", model="smollm2") > 0
    assert value(after, "mlxd_model_swaps_total") == 1
    error = value(after, "mlxd_weights_estimate_error_ratio", model="smollm2")
    assert ("mlxd_weights_estimate_error_ratio", frozenset({("model", "smollm2")})) in after
    assert abs(error) < 0.25


def test_json_log_has_one_object_per_request(server: RunningServer, client: openai.OpenAI) -> None:
    r = chat(client)
    deadline = time.monotonic() + 10
    while r.id not in request_lines(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    line = request_lines(server)[r.id]
    assert line["api"] == "openai" and line["model"] == "smollm2"
    assert line["prompt_tokens"] == r.usage.prompt_tokens
    assert line["completion_tokens"] == r.usage.completion_tokens
    assert line["cached_tokens"] == r.usage.prompt_tokens_details.cached_tokens
    assert line["finish"] == r.choices[0].finish_reason
    assert line["ttft_ms"] > 0 and line["tok_s"] > 0
    assert line["level"] == "info" and line["time"].endswith("Z")


def test_a_client_that_goes_away_is_logged_and_counted_as_cancelled(
    server: RunningServer,
) -> None:
    before = value(scrape(server), "mlxd_generations_total", api="openai", model="smollm2",
                   finish="cancelled")  # fmt: skip
    body = {
        "model": "smollm2",
        "stream": True,
        "max_tokens": 400,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
    }
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                request_id = json.loads(line[6:])["id"]
                break
    deadline = time.monotonic() + 30
    while request_id not in request_lines(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert request_lines(server)[request_id]["finish"] == "cancelled"
    after = value(scrape(server), "mlxd_generations_total", api="openai", model="smollm2",
                  finish="cancelled")  # fmt: skip
    assert after == before + 1


@pytest.mark.skipif(chromium_path() is None, reason="needs chromium (make test installs it)")
def test_status_page_in_headless_chromium(
    server: RunningServer, client: openai.OpenAI, tmp_path: Path
) -> None:
    done = chat(client)
    health = httpx.get(f"{server.root}/health", timeout=10).json()
    with open_page(f"{server.root}/", tmp_path / "profile") as page:
        page.wait_for("document.getElementById('connection').dataset.state === 'live'")
        assert page.evaluate("document.getElementById('resident-model').textContent") == "smollm2"
        assert page.evaluate("document.getElementById('resident-state').textContent") == "ready"
        budget = page.evaluate("document.getElementById('mem-budget').textContent")
        assert budget == f"{health['memory']['budget'] / 2**30:.2f} GiB"
        weights = page.evaluate("document.getElementById('mem-weights').textContent")
        assert weights.endswith(("MiB", "GiB")) and float(weights.split()[0]) > 0
        bar = page.evaluate("document.getElementById('bar-weights').style.width")
        assert bar.endswith("%") and float(bar[:-1]) > 0
        page.wait_for(f"document.querySelector('[data-request=\"{done.id}\"]') !== null")
        models = page.evaluate(
            "[...document.querySelectorAll('#models tr')].map(r => [r.dataset.model, "
            "r.dataset.availability])"
        )
        assert ["smollm2", "present"] in models
        assert ["qwen3.6-27b", "download"] in models  # not downloaded in the test home
        artifacts = REPO_ROOT / ".pytest_cache" / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        shot = page.screenshot(artifacts / "status-page.png")
        print(f"status page screenshot: {shot}")
        assert shot.stat().st_size > 10_000
        assert page.problems() == []
        # The check above can fail: a console error on this page is seen.
        page.evaluate("console.error('probe')")
        assert page.problems() == ["console.error: probe"]
