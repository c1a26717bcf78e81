"""Continuous batching through real HTTP: concurrent requests decode together in one batch.

A random-weight Qwen3 (real tokenizer) follows a per-request forced token script, so every
request's exact output is known in advance: any mixed, lost or duplicated token between
sequences of the batch shows up as a wrong answer.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from mlxd.config import parse_models
from mlxd.engine import GenerationChunk, GenerationRequest, MLXEngine
from tests.e2e.inproc import Script, serve_in_thread
from tools.random_model import build_random_qwen3

pytestmark = pytest.mark.e2e

N = 16


def script_text(n: int) -> str:
    """A distinct answer per request (words the tokenizer splits differently per n)."""
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    return f"answer {n}: " + " ".join(words[(n + i) % len(words)] for i in range(3 + n % 5))


class PerRequestScripts(MLXEngine):
    """The real engine; a request whose prompt says ``req-N`` is forced to ``script_text(N)``
    (and ``long`` ones to a script of 200 steps, long enough to cancel mid-way)."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        prompt = request.tokenizer.decode(request.prompt)
        found = re.search(r"req-(\d+)", prompt)
        if found:
            n = int(found.group(1))
            text = script_text(n) * (12 if "long" in prompt else 1)
            request.extra_processors.append(Script([text], request.tokenizer))
        async for chunk in super().generate(request):
            yield chunk


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, openai.OpenAI]]:
    base = tmp_path_factory.mktemp("batching")
    model = build_random_qwen3(base / "q3", "tiny", cache_dir=base / "token-cache")
    models = parse_models({"models": [{"id": "q3", "source": {"path": str(model)}}]}, "test")
    with serve_in_thread(models, base / "home", PerRequestScripts()) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=300)
        yield url, client


def ask(client: openai.OpenAI, n: int, stream: bool, long: bool = False) -> tuple[str, str]:
    content = f"req-{n} long" if long else f"req-{n}"
    kw: Any = {"model": "q3", "temperature": 0, "max_tokens": 400,
               "messages": [{"role": "user", "content": content}]}  # fmt: skip
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content or "", r.choices[0].finish_reason
    text, finish = "", ""
    for chunk in client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def test_concurrent_requests_each_get_their_own_script(server: tuple[str, openai.OpenAI]) -> None:
    url, client = server
    ask(client, 99, stream=False)  # load the model first, so all 16 overlap in the batch
    jobs = [(n, n % 2 == 1) for n in range(N)]  # half streaming, half not
    with ThreadPoolExecutor(max_workers=N) as pool:
        results = list(pool.map(lambda job: ask(client, *job), jobs))
    for (n, stream), (text, finish) in zip(jobs, results, strict=True):
        assert (text, finish) == (script_text(n), "stop"), (n, stream)
    stats = httpx.get(url.removesuffix("/v1") + "/health").json()["engine"]
    # They really ran together: far fewer batch steps than tokens generated.
    assert stats["batch_steps"] < stats["tokens_generated"] / 2


def test_cancelling_one_stream_leaves_the_others_unchanged(
    server: tuple[str, openai.OpenAI],
) -> None:
    _, client = server

    def cancel_early() -> str:
        text = ""
        stream = client.chat.completions.create(
            model="q3", temperature=0, max_tokens=400, stream=True,
            messages=[{"role": "user", "content": "req-3 long"}],
        )  # fmt: skip
        for chunk in stream:
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            if len(text) > 20:
                stream.close()  # the client goes away mid-batch
                break
        return text

    with ThreadPoolExecutor(max_workers=4) as pool:
        others = [pool.submit(ask, client, n, True, True) for n in (4, 5, 6)]
        cancelled = pool.submit(cancel_early)
        results = [f.result() for f in others]
    assert (script_text(3) * 12).startswith(cancelled.result())
    for n, (text, finish) in zip((4, 5, 6), results, strict=True):
        assert (text, finish) == (script_text(n) * 12, "stop"), n


def test_health_shows_the_batch(server: tuple[str, openai.OpenAI]) -> None:
    url, client = server
    root = url.removesuffix("/v1")
    seen: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=3) as pool:
        running = [pool.submit(ask, client, n, True, True) for n in (7, 8)]
        while not all(f.done() for f in running):
            seen.append(httpx.get(f"{root}/health", timeout=5).json()["batch"])
    busiest = max(seen, key=lambda b: b["size"])
    assert busiest["size"] == 2 and busiest["max_concurrency"] >= 2
    assert [s["model"] for s in busiest["sequences"]] == ["q3", "q3"]
    assert all(s["reserved"] > 0 for s in busiest["sequences"])  # each sequence's reservation
    assert busiest["reserved"] == sum(s["reserved"] for s in busiest["sequences"])
