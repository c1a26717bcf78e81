"""Prefix cache with the real default model: identical greedy output, measured reuse."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from mlx_lm.utils import load_tokenizer

from mlxd.engine import GenerationRequest, MLXEngine, SamplingParams

pytestmark = pytest.mark.e2e


async def converse(engine: MLXEngine, tokenizer: Any, turns: list[str]) -> list[tuple[str, int]]:
    """A multi-turn chat; returns each reply with the prompt tokens served from the cache."""
    # A system prompt long enough that each turn shares more than the cache's minimum reuse.
    history: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    out = []
    for user in turns:
        history.append({"role": "user", "content": user})
        text = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer.encode(text, add_special_tokens=False)
        req = GenerationRequest(prompt, 24, SamplingParams(temperature=0.0), tokenizer)
        pieces, cached = [], 0
        async for chunk in engine.generate(req):
            pieces.append(chunk.text)
            cached = chunk.cached_tokens
        reply = "".join(pieces)
        history.append({"role": "assistant", "content": reply})
        out.append((reply, cached))
    return out


SYSTEM = (
    "You are a concise assistant in a grocery store. Answer in one short sentence, use plain "
    "words, avoid lists unless asked, and keep a friendly tone. The store sells fruit, "
    "vegetables, bread, cheese and fish; prices are not known to you."
)
TURNS = [
    "Name three fruits.",
    "Which of them is the sweetest?",
    "Write one sentence about it.",
    "Thanks! Now name a vegetable.",
]


def test_greedy_output_identical_with_and_without_cache(smollm2_dir: Path) -> None:
    tokenizer = load_tokenizer(smollm2_dir)

    async def run(cache_bytes: int) -> tuple[list[tuple[str, int]], dict[str, int]]:
        engine = MLXEngine(prefix_cache_bytes=cache_bytes)
        try:
            await engine.load(smollm2_dir)
            return await converse(engine, tokenizer, TURNS), engine.stats()
        finally:
            engine.close()

    with_cache, stats = asyncio.run(run(1 << 30))
    without, stats_off = asyncio.run(run(0))
    assert [r for r, _ in with_cache] == [r for r, _ in without]
    # Every turn after the first reuses the previous turn's history.
    assert all(cached == 0 for _, cached in without)
    assert with_cache[0][1] == 0
    assert all(cached > 20 for _, cached in with_cache[1:])
    assert stats["prefix_cache_hits"] == len(TURNS) - 1
    assert stats_off["prefix_cache_hits"] == 0


def test_cache_stays_bounded(smollm2_dir: Path) -> None:
    tokenizer = load_tokenizer(smollm2_dir)

    async def run() -> int:
        # Room for about two short conversations' caches.
        engine = MLXEngine(prefix_cache_bytes=16 << 20)
        try:
            await engine.load(smollm2_dir)
            for i in range(6):
                await converse(engine, tokenizer, [f"Conversation {i}: say a number."])
            return (await engine.memory())["prefix_cache"]
        finally:
            engine.close()

    assert asyncio.run(run()) <= 16 << 20
