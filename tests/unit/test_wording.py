"""Each wording fix of issue 14, asserted through HTTP with a fake engine.

Field names as the client wrote them, one unit (GiB and friends, binary) in errors and /health,
the ``auto:<tag>`` error naming the real cause, and the legacy ``functions`` fields mapped onto
tools.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlxd.app import create_app
from mlxd.config import parse_models
from mlxd.settings import Settings
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

Client = Callable[..., httpx.AsyncClient]
USER = [{"role": "user", "content": "Hi"}]
CHAT = "/v1/chat/completions"
DECIMAL_GB = re.compile(r"\d GB\b|\d MB\b")
TOOL_OUT = ['Let me check.', '<tool_call>', '\n{"name": "get_weather", ',
            '"arguments": {"city": "Seoul"}}\n', '</tool_call>']  # fmt: skip
WEATHER = {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}  # fmt: skip


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return dict(r.json()["error"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": [{"role": "user", "content": 5}]},
         "messages[0].content: must be a string or an array"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages[0].content[0].text: Field required"),
        ({"messages": USER, "tool_choice": "sometimes"},
         "tool_choice: must be one of 'auto', 'none', 'required' or an object"),
        ({"messages": USER, "stop": 7}, "stop: must be a string or an array"),
    ],
    ids=["content-type", "part-without-text", "tool-choice", "stop-type"],
)  # fmt: skip
async def test_validation_names_fields_as_the_client_wrote_them(
    make_client: Client, body: dict[str, Any], message: str
) -> None:
    client = make_client(FakeEngine())
    err = _error(await client.post(CHAT, json={"model": "alpha", **body}), 400)
    assert err["message"] == message
    assert err["param"] == message.split(":")[0]
    for internal in (".str", "list[", "TextPart", "literal[", "NamedToolChoice"):
        assert internal not in err["message"]


async def test_legacy_functions_are_mapped_onto_tools(make_client: Client) -> None:
    client = make_client(FakeEngine(responder=lambda req: TOOL_OUT))
    body = {"model": "alpha", "messages": USER, "functions": [WEATHER],
            "function_call": {"name": "get_weather"}}  # fmt: skip
    choice = (await client.post(CHAT, json=body)).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"

    # function_call "none" becomes tool_choice "none": the call text stays plain content.
    plain = (await client.post(CHAT, json={**body, "function_call": "none"})).json()
    assert "tool_calls" not in plain["choices"][0]["message"]

    # A legacy history (assistant function_call, then a role "function" result) is accepted.
    history = [*USER, {"role": "assistant", "content": None,
                       "function_call": {"name": "get_weather", "arguments": "{}"}},
               {"role": "function", "name": "get_weather", "content": "sunny"}]  # fmt: skip
    r = await client.post(CHAT, json={"model": "alpha", "messages": history,
                                      "functions": [WEATHER]})  # fmt: skip
    assert r.status_code == 200, r.text


async def test_legacy_functions_errors_name_the_legacy_fields(make_client: Client) -> None:
    client = make_client(FakeEngine())
    tools = [{"type": "function", "function": WEATHER}]
    both = {"model": "alpha", "messages": USER, "functions": [WEATHER], "tools": tools}
    err = _error(await client.post(CHAT, json=both), 400)
    assert err["param"] == "functions" and "not both" in err["message"]
    nameless = {"model": "alpha", "messages": USER, "functions": [{"description": "x"}]}
    err = _error(await client.post(CHAT, json=nameless), 400)
    assert err["message"] == "functions[0].name: Field required"


@pytest.fixture
async def routed(tmp_path: Path, tiny_dirs: dict[str, Path]) -> AsyncIterator[Client]:
    """An app whose ``coding`` models are a hub model (not downloaded) and, optionally, a
    local one; ``budget`` caps the memory budget."""
    clients: list[httpx.AsyncClient] = []

    def factory(*, local: bool, budget: str | None = None) -> httpx.AsyncClient:
        models = [{"id": "hub-coder", "source": {"hf": "example/coder-4bit"}, "tags": ["coding"]}]
        if local:
            models.append({"id": "tiny-coder", "source": {"path": str(tiny_dirs["alpha"])},
                           "tags": ["coding"]})  # fmt: skip
        config = Settings(home=tmp_path / "home", config_path=tmp_path / "m.yaml",
                          memory_budget=budget)  # fmt: skip
        app = create_app(config, engine_factory=lambda _: FakeEngine(),
                         models=parse_models({"models": models}, "test"))  # fmt: skip
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080"
        )
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aclose()


async def test_auto_tag_error_says_nothing_is_downloaded(routed: Client) -> None:
    client = routed(local=False)
    err = _error(await client.post(CHAT, json={"model": "auto:coding", "messages": USER}), 400)
    assert err["code"] == "model_not_downloaded" and err["param"] == "model"
    assert "no model tagged 'coding' is downloaded" in err["message"]
    assert "hub-coder (not downloaded; would download example/coder-4bit" in err["message"]
    assert "mlxd pull hub-coder" in err["message"]
    assert "memory budget" not in err["message"]


async def test_auto_tag_error_for_a_model_over_the_budget_gives_sizes_in_binary_units(
    routed: Client,
) -> None:
    client = routed(local=True, budget="64KB")
    err = _error(await client.post(CHAT, json={"model": "auto:coding", "messages": USER}), 400)
    assert err["code"] == "insufficient_memory"
    assert "fits the memory budget of 64.00 KiB" in err["message"]
    assert re.search(r"tiny-coder \(needs [\d.]+ (KiB|MiB)", err["message"])
    assert "hub-coder (not downloaded" in err["message"]
    assert not DECIMAL_GB.search(err["message"])


async def test_auto_tag_picks_the_downloaded_model(routed: Client) -> None:
    client = routed(local=True)
    r = await client.post(CHAT, json={"model": "auto:coding", "messages": USER})
    assert r.status_code == 200 and r.json()["model"] == "tiny-coder"


async def test_models_say_present_or_would_download(routed: Client) -> None:
    models = (await routed(local=True).get("/v1/models")).json()["data"]
    by_id = {m["id"]: m for m in models}
    assert by_id["tiny-coder"]["availability"] == "present" and by_id["tiny-coder"]["present"]
    assert by_id["hub-coder"]["availability"] == "download"
    assert not by_id["hub-coder"]["present"]
    assert "Hugging Face" in by_id["hub-coder"]["availability_detail"]


async def test_health_human_fields_use_binary_units(make_client: Client) -> None:
    client = make_client(FakeEngine(), settings={"memory_budget": "6GB"})
    memory = (await client.get("/health")).json()["memory"]
    assert memory["budget_human"] == "6.00 GiB"
    assert memory["budget_basis"] == "--memory-budget 6.00 GiB"
    big = {"model": "alpha", "messages": USER, "max_tokens": 480}
    small = make_client(FakeEngine(), settings={"memory_budget": "12KB"})
    err = _error(await small.post(CHAT, json=big), 400)
    assert err["code"] == "insufficient_memory"
    assert "KiB" in err["message"] and not DECIMAL_GB.search(err["message"])
