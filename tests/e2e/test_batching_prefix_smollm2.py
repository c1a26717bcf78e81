"""A request joining a running batch from a cached prefix gives the same output as without it.

Real SmolLM2, greedy, on the engine directly (the HTTP path is covered elsewhere): the same
follow-up turn joins a batch of two running streams twice — once after its conversation's KV
cache was kept, once after the prefix cache was emptied.

What is asserted where batched arithmetic may differ: the generated token ids must be
identical, and each token's logprob equal within 2e-2. Reusing cached KV instead of
recomputing it changes how prefill chunks split the prompt, and batch composition changes the
shapes of the matrix products, so logits may differ in their last bits; a greedy choice only
flips where two candidates are that close, which these prompts avoid (the test is
deterministic on a given machine).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mlxd.engine import GenerationChunk, GenerationRequest, MLXEngine, SamplingParams

pytestmark = pytest.mark.e2e

HISTORY = [  # long enough that the kept history passes the 64-token minimum reuse
    {
        "role": "system",
        "content": (
            "You are a concise assistant who answers in plain English. Keep every answer short, "
            "name places precisely, prefer well-known facts over guesses, and never use lists "
            "longer than five items. When a question is ambiguous, answer the most likely reading."
        ),
    },
    {"role": "user", "content": "Name three rivers in Europe and say where each one flows."},
]


def request(tok: Any, messages: list[dict[str, str]], max_tokens: int) -> GenerationRequest:
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    return GenerationRequest(
        prompt=list(prompt), max_tokens=max_tokens, sampling=SamplingParams(), tokenizer=tok,
        logprobs=0,
    )  # fmt: skip


async def collect(engine: MLXEngine, req: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(req)]


async def follow_up_in_batch(engine: MLXEngine, tok: Any, keep_history: bool) -> list[Any]:
    first = await collect(engine, request(tok, HISTORY, 24))
    answer = tok.decode([c.token for c in first if c.token is not None])
    if not keep_history:
        await engine.evict_prefix_cache(0)
    turn = [*HISTORY, {"role": "assistant", "content": answer},
            {"role": "user", "content": "Which of them is the longest?"}]  # fmt: skip
    others = [
        asyncio.ensure_future(collect(engine, request(tok, [{"role": "user", "content": q}], 40)))
        for q in ("Count from one to twenty in words.", "Write a short poem about the sea.")
    ]
    while engine.stats()["batch_size"] < 2:  # both streams are decoding
        await asyncio.sleep(0.01)
    joined = await collect(engine, request(tok, turn, 16))
    await asyncio.gather(*others)
    return joined


def test_join_mid_batch_with_cached_prefix_matches_without(smollm2_dir: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(smollm2_dir)

    async def run() -> tuple[list[Any], list[Any]]:
        engine = MLXEngine()
        try:
            await engine.load(smollm2_dir)
            cached = await follow_up_in_batch(engine, tok, keep_history=True)
            fresh = await follow_up_in_batch(engine, tok, keep_history=False)
            return cached, fresh
        finally:
            engine.close()

    cached, fresh = asyncio.run(run())
    assert cached[-1].cached_tokens > 64 and fresh[-1].cached_tokens == 0
    assert [c.token for c in cached] == [c.token for c in fresh]
    for a, b in zip(cached, fresh, strict=True):
        if a.token is not None:
            assert a.logprob is not None and b.logprob is not None
            assert abs(a.logprob - b.logprob) < 2e-2
    assert cached[-1].peak_bytes > 0
