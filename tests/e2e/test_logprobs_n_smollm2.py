"""logprobs / top_logprobs and n > 1 on SmolLM2, through real HTTP and the real OpenAI SDK.

The server runs in this process with the real MLX engine, which also records the token ids it
generated, so the test can run the model itself over prompt + completion and compare the
reported logprobs with the model's own log-softmax at every position.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import openai
import pytest

from server.config import parse_models
from server.engine import GenerationChunk, GenerationRequest, MLXEngine
from tests.e2e.inproc import serve_in_thread

pytestmark = pytest.mark.e2e

ASK = [{"role": "user", "content": "Name three colours."}]


class RecordingEngine(MLXEngine):
    """The real engine; remembers each generation's prompt and generated token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[tuple[list[int], list[int]]] = []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        tokens: list[int] = []
        self.runs.append((list(request.prompt), tokens))
        async for chunk in super().generate(request):
            if chunk.token is not None:
                tokens.append(chunk.token)
            yield chunk


@pytest.fixture(scope="module")
def setup(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[openai.OpenAI, RecordingEngine, Path]]:
    models = parse_models(
        {"models": [{"id": "smollm2", "source": {"path": str(smollm2_dir)}}]}, "test"
    )
    engine = RecordingEngine()
    with serve_in_thread(models, tmp_path_factory.mktemp("lp-home"), engine) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=300)
        yield client, engine, smollm2_dir


def model_logprobs(model_dir: Path, prompt: list[int], completion: list[int]) -> mx.array:
    """log-softmax of the model's logits at each completion position, computed here."""
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    tokens = mx.array([prompt + completion[:-1]])
    logits = model(tokens)[0, len(prompt) - 1 :].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_logprobs_equal_the_models_log_softmax(setup: Any) -> None:
    client, engine, model_dir = setup
    r = client.chat.completions.create(
        model="smollm2", messages=ASK, temperature=0, max_tokens=12, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    prompt, completion = engine.runs[-1]
    assert content is not None and len(content) == r.usage.completion_tokens  # type: ignore[union-attr]
    expected = model_logprobs(model_dir, prompt, completion)
    for i, entry in enumerate(content):
        row = expected[i]
        assert entry.logprob == pytest.approx(row[completion[i]].item(), abs=2e-3)
        assert len(entry.top_logprobs) == 3
        best = mx.argsort(-row)[:3].tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            [row[t].item() for t in best], abs=2e-3
        )
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy
        assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token
    text = b"".join(bytes(e.bytes or []) for e in content).decode()
    assert text == r.choices[0].message.content


def test_streamed_logprobs_cover_every_token(setup: Any) -> None:
    client, _, _ = setup
    stream = client.chat.completions.create(
        model="smollm2", messages=ASK, temperature=0, max_tokens=10, logprobs=True, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    entries, usage = [], None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                entries += c.logprobs.content
    assert usage is not None and len(entries) == usage.completion_tokens
    assert all(e.top_logprobs == [] for e in entries)


def test_n_greedy_choices_are_identical(setup: Any) -> None:
    client, _, _ = setup
    r = client.chat.completions.create(
        model="smollm2", messages=ASK, temperature=0, max_tokens=12, n=3
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 1
    assert r.usage is not None
    assert r.usage.completion_tokens == 3 * 12 or r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_n_sampled_choices_differ(setup: Any, stream: bool) -> None:
    client, _, _ = setup
    kwargs: Any = {"model": "smollm2", "messages": ASK, "temperature": 1.2, "max_tokens": 16,
                   "n": 3, "seed": 7}  # fmt: skip
    if stream:
        texts = ["", "", ""]
        finishes: dict[int, str] = {}
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                if c.finish_reason:
                    finishes[c.index] = c.finish_reason
        assert sorted(finishes) == [0, 1, 2]
    else:
        texts = [c.message.content or "" for c in client.chat.completions.create(**kwargs).choices]
    assert len(set(texts)) == 3
