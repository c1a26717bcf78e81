"""logprobs / top_logprobs and n > 1 on SmolLM2, through real HTTP and the real OpenAI SDK.

The server runs in this process with the real MLX engine, which also records the token ids it
generated, so the test can run the model itself over prompt + completion and compare the
reported logprobs with the model's own log-softmax at every position.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import openai
import pytest

from mlxd.config import parse_models
from mlxd.engine import GenerationChunk, GenerationRequest, MLXEngine
from tests.e2e.inproc import serve_in_thread

pytestmark = pytest.mark.e2e

ASK = [{"role": "user", "content": "Name three colours."}]


class RecordingEngine(MLXEngine):
    """The real engine; remembers each generation's prompt and generated token ids, and the
    largest batch it stepped."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[tuple[list[int], list[int]]] = []
        self.largest_batch = 0

    def _step(self) -> None:
        super()._step()
        if self._batch is not None:
            self.largest_batch = max(self.largest_batch, len(self._batch))

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


def test_completions_legacy_logprobs_equal_the_models_log_softmax(setup: Any) -> None:
    client, engine, model_dir = setup
    prompt = "The capital of France is"
    r = client.completions.create(
        model="smollm2", prompt=prompt, temperature=0, max_tokens=8, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None
    ids, completion = engine.runs[-1]
    expected = model_logprobs(model_dir, ids, completion)
    assert len(lp.tokens) == len(completion) == r.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for i, (logprob, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs, strict=True)):
        row = expected[i]
        assert logprob == pytest.approx(row[completion[i]].item(), abs=2e-3)
        assert len(top) <= 2 and max(top.values()) == pytest.approx(logprob, abs=1e-6)
    chunks = list(
        client.completions.create(
            model="smollm2", prompt=prompt, temperature=0, max_tokens=8, logprobs=2, stream=True
        )
    )
    streamed = [
        t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens or []
    ]
    assert streamed == lp.tokens


def test_n_choices_share_the_batch_with_other_requests(setup: Any) -> None:
    """n=3 runs as three sequences of the running batch, next to another client's request:
    greedy choices are identical (and their logprobs are the model's), sampled ones differ."""
    client, engine, model_dir = setup
    engine.largest_batch = 0
    other: dict[str, Any] = {"text": ""}
    decoding = threading.Event()

    def neighbour() -> None:
        # Streamed, so the n=3 requests are sent only once the neighbour is in the batch
        # (a plain request could finish, or not yet start, before they arrive).
        for chunk in client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Count to a hundred."}],
            temperature=0, max_tokens=80, stream=True,
        ):  # fmt: skip
            for c in chunk.choices:
                other["text"] += c.delta.content or ""
            if other["text"]:
                decoding.set()
        decoding.set()

    thread = threading.Thread(target=neighbour)
    thread.start()
    assert decoding.wait(timeout=120)
    greedy = client.chat.completions.create(
        model="smollm2", messages=ASK, temperature=0, max_tokens=12, n=3, logprobs=True
    )
    sampled = client.chat.completions.create(
        model="smollm2", messages=ASK, temperature=1.2, max_tokens=12, n=3
    )
    thread.join()
    assert other["text"]
    assert engine.largest_batch >= 4  # three choices and the neighbour, stepped together
    assert len({c.message.content for c in greedy.choices}) == 1
    assert len({c.message.content for c in sampled.choices}) == 3
    runs = [run for run in engine.runs if run[0] == engine.runs[-1][0]]
    prompt, completion = runs[-6]  # the first greedy choice (then two more, then 3 sampled)
    expected = model_logprobs(model_dir, prompt, completion)
    content = greedy.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    for i, entry in enumerate(content):
        assert entry.logprob == pytest.approx(expected[i][completion[i]].item(), abs=2e-2)
