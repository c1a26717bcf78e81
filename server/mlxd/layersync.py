"""Prefill evaluated one decoder layer at a time, so its working memory is one layer's.

MLX evaluates lazily and asynchronously: a prefill chunk's graph (every layer's attention
scores, softmax copies and MLP activations) is handed to the GPU at once, and a buffer goes
back to the allocator only when the kernels reading it have finished. How many layers' buffers
are alive at the peak then depends on how far the CPU runs ahead of the GPU, which changes from
run to run. Measured on an H200 (random-weight Qwen3-8B 4-bit, mlx 0.32.4, 2,048-token chunks):
the same 2,048-token prompt peaked at 9.67 GB in one run and 12.28 GB in the next, and the
working memory of one chunk went up and down with its depth (3.2, 3.5, 7.8, 5.4, 3.6 GB at
depths 0 to 8K), so no estimate could be both safe and close.

Evaluating each layer's output before the next layer is built bounds the chunk's working memory
to one layer's buffers (plus the hidden state and the KV cache), the same every run, so the
calibration measures it once and the estimate holds. It costs one synchronisation per layer and
chunk: a few milliseconds against a chunk that computes for hundreds (``make bench`` shows prefill
speed side by side). Decode steps (one token per sequence) are left alone, their buffers are small
and their pipelining is what makes decode fast, except the step at which a layer's KV cache grows
(every 256 tokens: mlx-lm concatenates the old buffer with a new block): evaluated layer by layer
too, only one layer's old buffer is held beside the new ones. Left lazy, the same H200 run held
two to three layers' old buffers at once at 8K-32K tokens, above the estimate's one.
"""

from __future__ import annotations

from typing import Any

# Inputs with at least this many tokens per sequence are prefill chunks (a decode step has 1).
MIN_PREFILL_TOKENS = 2

_SYNCED: dict[type, type] = {}  # layer class -> its synced subclass


def sync_prefill_layers(model: Any) -> int:
    """Make every decoder layer of an mlx-lm ``model`` evaluate its output during prefill;
    the number of layers changed (0 when the model exposes no ``layers``). Idempotent."""
    layers = getattr(model, "layers", None)
    if not layers:
        return 0
    for layer in layers:
        cls = type(layer)
        if not getattr(cls, "_mlxd_synced", False):
            if cls not in _SYNCED:
                _SYNCED[cls] = _synced(cls)
            layer.__class__ = _SYNCED[cls]
    return len(layers)


def _synced(cls: type) -> type:
    """A subclass of the layer class ``cls`` whose call evaluates its result during prefill
    and when its KV cache grows. Made on the MLX thread at load, so the imports happen once,
    not in every layer's call of every decode step."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, KVCache

    def grows(cache: Any, tokens: int) -> bool:
        """Whether adding ``tokens`` makes mlx-lm's (batch) KV ``cache`` allocate a bigger
        buffer beside its old one (the rule of ``KVCache`` / ``BatchKVCache.update_and_fetch``)."""
        if type(cache) is KVCache:
            position = cache.offset
        elif type(cache) is BatchKVCache:
            position = cache._idx
        else:
            return False
        keys = cache.keys
        return keys is not None and position + tokens > keys.shape[2]

    def __call__(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        shape: tuple[int, ...] = tuple(getattr(x, "shape", ()))
        tokens = shape[1] if len(shape) >= 2 else 0
        # Decided before the call: the call itself grows the cache.
        sync = tokens >= MIN_PREFILL_TOKENS or any(
            grows(a, tokens) for a in (*args, *kwargs.values())
        )
        out = cls.__call__(self, x, *args, **kwargs)
        if sync:
            mx.eval(out)
        return out

    return type(cls.__name__, (cls,), {"__call__": __call__, "_mlxd_synced": True})
