"""The real server, the real default model, the real OpenAI SDK, over loopback HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from mlx_lm.utils import load_tokenizer

from mlxd.config import REPO_ROOT
from tests.conftest import RunningServer, run_server

pytestmark = pytest.mark.e2e

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("smollm2-server") / "mlxd.log"
    with run_server(["--config", str(REPO_ROOT / "models.yaml")], log) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> object:
    return load_tokenizer(smollm2_dir)


def test_capital_of_france_greedy(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="smollm2",
        messages=FRANCE,
        temperature=0,
        max_tokens=30,  # type: ignore[arg-type]
    )
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.choices[0].finish_reason == "stop"
    assert r.model == "smollm2"


def test_stream_joined_equals_non_stream(client: openai.OpenAI) -> None:
    kwargs = {"model": "smollm2", "messages": FRANCE, "temperature": 0, "max_tokens": 40}
    plain = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )  # type: ignore[call-overload]
    pieces, finish, usage, roles = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason
    assert roles == ["assistant"]
    assert usage is not None and plain.usage is not None
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens == plain.usage.prompt_tokens


def test_max_tokens_gives_length_with_exact_count(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        temperature=0,
        max_tokens=7,
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 7


def test_stop_string_ends_text_before_it(client: openai.OpenAI) -> None:
    for stream in (False, True):
        kwargs = {"model": "smollm2", "messages": FRANCE, "temperature": 0, "max_tokens": 30,
                  "stop": ["Paris"]}  # fmt: skip
        if stream:
            text = "".join(
                (c.choices[0].delta.content or "") if c.choices else ""
                for c in client.chat.completions.create(**kwargs, stream=True)  # type: ignore[call-overload]
            )
        else:
            r = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
            text = r.choices[0].message.content or ""
            assert r.choices[0].finish_reason == "stop"
        assert "Paris" not in text
        assert text.startswith("The capital of France is")


def test_usage_matches_tokenizer(client: openai.OpenAI, tokenizer: object) -> None:
    r = client.chat.completions.create(
        model="smollm2", messages=FRANCE, temperature=0, max_tokens=30
    )
    prompt = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        FRANCE, add_generation_prompt=True, tokenize=False
    )
    expected_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))  # type: ignore[attr-defined]
    assert r.usage is not None
    assert r.usage.prompt_tokens == expected_prompt
    text = r.choices[0].message.content or ""
    assert r.usage.completion_tokens == len(tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_models_lists_default(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "smollm2" in ids


def test_unknown_model_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=FRANCE)
    assert info.value.status_code == 404
    body = info.value.body
    assert isinstance(body, dict) and body.get("code") == "model_not_found"


def test_malformed_json_400(server: RunningServer) -> None:
    r = httpx.post(
        f"{server.url}/chat/completions", content=b"{not json",
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def _engine_stats(server: RunningServer) -> dict[str, int]:
    stats: dict[str, int] = httpx.get(f"{server.root}/health").json()["engine"]
    return stats


def test_disconnected_stream_stops_generation(server: RunningServer, client: openai.OpenAI) -> None:
    """Drop a long stream after a few tokens: generation stops and the next request is served."""
    body = {"model": "smollm2", "stream": True, "max_tokens": 4000, "temperature": 0.8,
            "messages": [{"role": "user", "content": "Tell me a very long story."}]}  # fmt: skip
    before = _engine_stats(server)["tokens_generated"]
    got = 0
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
            if got >= 4:
                break  # leaving the block closes the connection
    # Once the server notices, the lease is released and the token counter freezes.
    for _ in range(300):
        health = httpx.get(f"{server.root}/health").json()
        if health["active_requests"] == 0:
            break
        time.sleep(0.1)
    assert health["active_requests"] == 0
    # /health does not wait on the MLX thread, so the token in flight may still land: wait
    # (bounded) for the counter to settle, then it must stay put.
    stopped_at = _engine_stats(server)["tokens_generated"]
    for _ in range(20):
        time.sleep(0.5)
        now = _engine_stats(server)["tokens_generated"]
        if now == stopped_at:
            break
        stopped_at = now
    time.sleep(1.0)
    assert _engine_stats(server)["tokens_generated"] == stopped_at
    # A handful of tokens past the disconnect, not thousands.
    assert stopped_at - before < 50, stopped_at - before
    r2 = client.chat.completions.create(
        model="smollm2", messages=FRANCE, temperature=0, max_tokens=5
    )
    assert r2.choices[0].message.content
