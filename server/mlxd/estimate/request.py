"""One request's peak memory on a loaded model, simulated phase by phase.

The simulation runs the way ``mlx_lm.generate_step`` runs a request: each prefill chunk (KV
then allocated + that chunk's working memory), then decoding (the final KV + logits).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxd.estimate.architecture import Architecture
from mlxd.estimate.files import (
    activation_dtype_bytes,
    config_dtype_bytes,
    model_tensors,
    read_config,
)
from mlxd.estimate.kv import QUANTIZED_KV_START, CacheGroup, kv_per_token, make_caches
from mlxd.estimate.working import (
    DEFAULT_PREFILL_CHUNK,
    Backend,
    WorkingMemory,
    prior_working_memory,
)

# Allocator rounding and small buffers nobody models: the modelled parts came within
# 0.5 % of the measured peaks; 1 % of the lasting allocations is kept on top.
OVERHEAD_FRACTION = 0.01


@dataclass(frozen=True)
class ModelProfile:
    """A model's architecture, weight bytes and activation dtype: read once, reused."""

    architecture: Architecture
    weights: int
    dtype_bytes: int

    @classmethod
    def from_dir(cls, model_dir: Path | str) -> ModelProfile:
        path = Path(model_dir)
        config = read_config(path)
        tensors = model_tensors(path, config)
        return cls(
            architecture=Architecture.from_config(config),
            weights=sum(t.nbytes for t in tensors.values()),
            dtype_bytes=activation_dtype_bytes(tensors, config),
        )

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], weights: int = 0, dtype_bytes: int | None = None
    ) -> ModelProfile:
        return cls(
            architecture=Architecture.from_config(config),
            weights=weights,
            dtype_bytes=dtype_bytes if dtype_bytes is not None else config_dtype_bytes(config),
        )


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one request on a loaded model (bytes).

    ``total`` is the simulated peak: ``weights + overhead`` plus the largest of
    (KV allocated then + working memory then) over the prefill chunks and decoding, so it
    is not the sum of the other fields. ``request`` is what the request adds to resident
    weights — what admission compares with the free budget.
    """

    weights: int
    kv: int  # cache allocated at the end of the request
    prefill: int  # largest working memory of a prefill chunk
    decode: int  # working memory of a decode step
    overhead: int
    total: int
    prompt_tokens: int
    max_tokens: int  # generated tokens counted (clipped to the context limit)
    peak_phase: str  # "prefill", "decode" or "kv-quantize"
    kv_per_token: int  # what one more token of context adds, once windows are full
    # The peak of each phase, and "prefill-kv": the most cache a prefill chunk left
    # allocated (sliding layers hold window − 1 + chunk then).
    details: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def request(self) -> int:
        return self.total - self.weights


def estimate_request(
    model: ModelProfile | Path | str | Mapping[str, Any],
    prompt_tokens: int,
    max_tokens: int,
    context_limit: int | None = None,
    kv_bits: int | None = None,
    max_kv_size: int | None = None,
    *,
    backend: Backend | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    quantized_kv_start: int = QUANTIZED_KV_START,
    sampling: bool = True,
    working: WorkingMemory | None = None,
) -> Estimate:
    """Estimate the peak memory of generating ``max_tokens`` after ``prompt_tokens``.

    ``model`` is a model directory, a `ModelProfile`, or a config dict (then the weights
    count as 0 unless given through `ModelProfile.from_config`). Generation is clipped at
    ``context_limit``. ``backend`` decides whether prompt attention materializes its
    scores; ``None`` asks the running MLX (see :mod:`server.backend`). ``sampling=False``
    leaves out what top-p/top-k sampling sorts (greedy decoding). ``working`` is the
    calibrated working memory of this model on this backend; ``None`` uses the prior
    (`prior_working_memory`).
    """
    profile = _profile(model)
    if prompt_tokens < 1:
        raise ValueError("a request has at least one prompt token")
    if max_tokens < 0 or prefill_chunk < 1:
        raise ValueError("max_tokens must be >= 0 and prefill_chunk >= 1")
    if context_limit is not None:
        max_tokens = max(0, min(max_tokens, context_limit - prompt_tokens))
    if backend is None:
        backend = running_backend()
    arch = profile.architecture
    b = profile.dtype_bytes
    working = working or prior_working_memory(arch, b, backend)
    caches = make_caches(arch, b, kv_bits, max_kv_size)

    prefill_peak = prefill_kv = kv_plus_prefill = quantize_peak = 0.0
    # mlx-lm prefills all but the last prompt token in chunks, then the last one with the
    # first decode step.
    for chunk in _chunks(prompt_tokens - 1, prefill_chunk):
        keys = {id(c): c.update(chunk) for c in caches}
        work = _prefill_work(working, chunk, caches, keys)
        transient = max(c.transient for c in caches)
        kv_now = sum(c.nbytes for c in caches)
        prefill_kv = max(prefill_kv, kv_now)
        held = kv_now + transient
        # Conversion happens before the chunk is evaluated: both copies meet its work.
        doubled = sum(c.maybe_quantize(quantized_kv_start) for c in caches)
        if doubled:
            after = sum(c.nbytes for c in caches)
            quantize_peak = max(quantize_peak, after + doubled + transient + work)
        prefill_peak = max(prefill_peak, work)
        kv_plus_prefill = max(kv_plus_prefill, held + work)

    decode_work = working.decode(prompt_tokens + max_tokens, sampling)
    final_tokens = prompt_tokens + max_tokens
    transient = 0.0
    for cache in caches:
        while cache.offset < final_tokens:
            stop = min(final_tokens, _next_growth(cache, final_tokens))
            if cache.quantized_slot_bytes is not None and not cache.quantized:
                stop = min(stop, max(quantized_kv_start, cache.offset + 1))
            cache.decode_to(stop)
            transient = max(transient, cache.transient)
            doubled = cache.maybe_quantize(quantized_kv_start)
            if doubled:
                others = sum(c.nbytes for c in caches if c is not cache)
                quantize_peak = max(quantize_peak, others + cache.nbytes + doubled + decode_work)
    kv_final = sum(c.nbytes for c in caches)
    decode_peak = kv_final + transient + decode_work

    phases = {"prefill": kv_plus_prefill, "decode": decode_peak, "kv-quantize": quantize_peak}
    phase = max(phases, key=lambda k: phases[k])
    overhead = math.ceil(OVERHEAD_FRACTION * (profile.weights + kv_final))
    total = profile.weights + overhead + math.ceil(phases[phase])
    return Estimate(
        weights=profile.weights,
        kv=kv_final,
        prefill=math.ceil(prefill_peak),
        decode=math.ceil(decode_work),
        overhead=overhead,
        total=total,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        peak_phase=phase,
        kv_per_token=kv_per_token(arch, b, kv_bits),
        details={**{k: math.ceil(v) for k, v in phases.items()}, "prefill-kv": int(prefill_kv)},
    )


def running_backend() -> Backend:
    """The backend of the running MLX (imports mlx)."""
    from mlxd.backend import backend_info

    name = backend_info().name
    if name == "metal":
        return "metal"
    return "cuda" if name == "cuda" else "cpu"


def _profile(model: ModelProfile | Path | str | Mapping[str, Any]) -> ModelProfile:
    if isinstance(model, ModelProfile):
        return model
    if isinstance(model, (str, Path)):
        return ModelProfile.from_dir(model)
    return ModelProfile.from_config(model)


def _chunks(tokens: int, size: int) -> Iterator[int]:
    while tokens > 0:
        step = min(size, tokens)
        yield step
        tokens -= step


def _next_growth(cache: CacheGroup, target: int) -> int:
    """The next offset at which decoding allocates (or ``target``)."""
    if cache.slot_bytes == 0:
        return target
    if cache.max_size is not None and cache.capacity >= cache.max_size:
        return target
    return cache.capacity + 1


def _prefill_work(
    working: WorkingMemory, chunk: int, caches: list[CacheGroup], keys: Mapping[int, int]
) -> float:
    """Working memory of one prefill chunk: attention reads the most keys of any cache."""
    attending = [c for c in caches if c.slot_bytes]
    most = max((keys[id(c)] for c in attending), default=0)
    quantized = any(c.quantized for c in attending)
    return working.prefill(chunk, most, quantized)
