"""Prefill evaluated layer by layer gives the same logits and holds no more memory."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from mlxd.layersync import sync_prefill_layers
from tools.random_model import build_random_qwen3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_qwen3(tmp_path_factory.mktemp("layersync") / "m", dtype="float32")


def _prefill_then_decode(model: Any, tokens: int) -> tuple[mx.array, mx.array, int]:
    cache = make_prompt_cache(model)
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    prompt = mx.array([[(i * 31 + 7) % 1000 for i in range(tokens)]])
    first = model(prompt, cache=cache)
    mx.eval(first)
    peak = mx.get_peak_memory() - base
    step = model(mx.array([[5]]), cache=cache)
    mx.eval(step)
    return first, step, peak


def test_same_logits_and_no_more_memory(model_dir: Path) -> None:
    model, _ = load_model(model_dir)
    plain_first, plain_step, plain_peak = _prefill_then_decode(model, 96)
    assert sync_prefill_layers(model) == len(model.layers) > 0
    assert sync_prefill_layers(model) == len(model.layers)  # idempotent
    first, step, peak = _prefill_then_decode(model, 96)
    assert mx.array_equal(first, plain_first)
    assert mx.array_equal(step, plain_step)  # decode steps are unchanged
    assert peak <= plain_peak


def test_a_model_without_layers_is_left_alone() -> None:
    class Bare:
        pass

    assert sync_prefill_layers(Bare()) == 0
