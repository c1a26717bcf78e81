"""Ground truth for the memory estimate: load a model and read MLX's peak.

For calibration checks, the README table and the benchmark; never on the serving path.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from mlxd.estimate.architecture import Architecture
from mlxd.estimate.files import read_config
from mlxd.estimate.working import DEFAULT_PREFILL_CHUNK
from mlxd.layersync import sync_prefill_layers


def measure_request(
    model_dir: Path | str,
    prompt_tokens: int,
    max_tokens: int,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    kv_bits: int | None = None,
    max_kv_size: int | None = None,
) -> int:
    """Peak MLX memory (``mx.get_peak_memory()``) of loading ``model_dir`` and generating
    exactly ``max_tokens`` greedy tokens after a synthetic ``prompt_tokens``-token prompt.

    This is the ground truth `estimate_request` is checked against; it loads the model,
    so it is for calibration and the README table, not for serving.
    """
    import mlx.core as mx
    from mlx_lm import load

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    model = load(str(model_dir))[0]
    sync_prefill_layers(model)  # as the engine runs it
    vocab = Architecture.from_config(read_config(Path(model_dir))).vocab_size
    peak = measure_loaded(
        model, vocab, prompt_tokens, max_tokens, prefill_chunk=prefill_chunk,
        kv_bits=kv_bits, max_kv_size=max_kv_size, reset=False,
    )  # fmt: skip
    del model
    gc.collect()
    mx.clear_cache()
    return peak


def measure_loaded(
    model: Any,
    vocab: int,
    prompt_tokens: int,
    max_tokens: int,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    kv_bits: int | None = None,
    max_kv_size: int | None = None,
    reset: bool = True,
) -> int:
    """MLX's peak while a loaded mlx-lm ``model`` serves one greedy request as the engine
    runs it (``generate_step``; weights included, as they are active). ``reset=False``
    keeps the peak of what came before (the load, in `measure_request`)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    if reset:
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
