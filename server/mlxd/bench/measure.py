"""Ground truth for the memory estimate: MLX's peak while a loaded model serves one request.

For calibration checks, the README table and the benchmark; never on the serving path.
"""

from __future__ import annotations

import gc
from typing import Any

from mlxd.estimate.working import DEFAULT_PREFILL_CHUNK


def measure_loaded(
    model: Any,
    vocab: int,
    prompt_tokens: int,
    max_tokens: int,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    kv_bits: int | None = None,
    max_kv_size: int | None = None,
) -> int:
    """MLX's peak while a loaded mlx-lm ``model`` serves one greedy request as the engine
    runs it (``generate_step``; weights included, as they are active). Load the model with
    `mlxd.layersync.sync_prefill_layers` applied, as the engine does."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    # Spread ids over the vocabulary; which tokens they are does not change memory.
    prompt = mx.array([(i * 7919 + 100) % vocab for i in range(prompt_tokens)])
    steps = generate_step(
        prompt,
        model,
        max_tokens=max_tokens,
        prefill_step_size=prefill_chunk,
        kv_bits=kv_bits,
        max_kv_size=max_kv_size,
    )
    for _ in steps:
        pass
    peak = int(mx.get_peak_memory())
    del steps, prompt
    gc.collect()
    mx.clear_cache()
    return peak
