"""The KV cache and the recurrent state, as mlx-lm 0.32 allocates them from ``config.json``:

- ``KVCache`` grows in steps of 256 tokens (``KV_STEP``); a prefill chunk of ``n`` tokens
  adds ``ceil(n / 256) · 256`` slots, and a cache whose fill is not a multiple of 256 is
  cut to its fill before it grows.
- A ``RotatingKVCache`` (Gemma-3 sliding layers, or any layer under ``max_kv_size`` where
  the architecture honours it) keeps ``window`` tokens while decoding, but a multi-token
  prefill chunk is appended to the last ``window − 1`` tokens first, so it briefly holds
  ``window − 1 + chunk``.
- Gated-DeltaNet layers (Qwen3-Next, Qwen3.5/3.6) keep a fixed state: a convolution tail
  of ``kernel − 1`` rows of ``2·Hk·Dk + Hv·Dv`` channels in the activation dtype, and a
  float32 ``Hv × Dv × Dk`` recurrent matrix.
- With ``kv_bits`` a full-attention cache is quantized (group size 64, a scale and a bias
  per group) once it holds ``quantized_kv_start`` tokens (5000 in mlx-lm); the moment of
  conversion holds both copies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlxd.estimate.architecture import Architecture, LayerKind

KV_STEP = 256  # mlx-lm KVCache / QuantizedKVCache / RotatingKVCache growth step, in tokens
KV_GROUP_SIZE = 64  # mlx-lm's kv_group_size default
QUANTIZED_KV_START = 5000  # mlx-lm's quantized_kv_start default


def kv_element_bytes(kv_bits: int | None, dtype_bytes: int, head_dim: int) -> float:
    """Bytes per cached element: the dtype, or ``bits/8`` plus a scale and a bias (in the
    activation dtype) per group of 64."""
    if kv_bits is None:
        return float(dtype_bytes)
    if kv_bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"kv_bits must be one of 2, 3, 4, 5, 6, 8, not {kv_bits}")
    if head_dim % KV_GROUP_SIZE:
        raise ValueError(f"head_dim {head_dim} is not a multiple of the KV group size 64")
    return kv_bits / 8 + 2 * dtype_bytes / KV_GROUP_SIZE


def kv_bytes_per_token(
    config: Mapping[str, Any], kv_bits: int | None = None, dtype_bytes: int = 2
) -> int:
    """What each further token adds once the window of every sliding layer is full:
    layers × 2 (K and V) × KV heads × head_dim × bytes, over full-attention layers only.

    Sliding-window and linear-attention layers stop growing (see `kv_bytes`).
    """
    return kv_per_token(Architecture.from_config(config), dtype_bytes, kv_bits)


def kv_bytes(
    config: Mapping[str, Any] | Architecture,
    tokens: int,
    kv_bits: int | None = None,
    dtype_bytes: int = 2,
    max_kv_size: int | None = None,
    quantized_kv_start: int = QUANTIZED_KV_START,
) -> int:
    """The cache mlx-lm has allocated once ``tokens`` tokens went through it one by one:
    full layers rounded up to 256-token steps (capped by ``max_kv_size`` where the
    architecture honours it), sliding layers capped at their window, linear layers' fixed
    state. ``kv_bits`` applies from ``quantized_kv_start`` tokens on, as in mlx-lm."""
    arch = config if isinstance(config, Architecture) else Architecture.from_config(config)
    caches = make_caches(arch, dtype_bytes, kv_bits, max_kv_size)
    for cache in caches:
        cache.decode_to(tokens)
        cache.maybe_quantize(quantized_kv_start)
    return sum(cache.nbytes for cache in caches)


@dataclass
class CacheGroup:
    """The layers that share one cache type; all of them grow identically.

    ``capacity`` counts token slots per layer, ``offset`` tokens seen. ``max_size`` is set
    for rotating caches. ``slot_bytes`` is K+V per token slot per layer.
    """

    layers: int
    slot_bytes: float
    quantized_slot_bytes: float | None = None  # set when kv_bits applies to this group
    max_size: int | None = None
    fixed_bytes: int = 0  # per layer, for linear-attention state
    offset: int = 0
    capacity: int = 0
    quantized: bool = False
    transient: float = 0.0  # bytes briefly held by the last growth (the old buffer, one layer)

    @property
    def nbytes(self) -> int:
        slot = self.quantized_slot_bytes if self.quantized else self.slot_bytes
        assert slot is not None
        state = self.fixed_bytes if self.offset else 0
        return math.ceil(self.layers * (self.capacity * slot + state))

    def _per_layer(self) -> float:
        slot = self.quantized_slot_bytes if self.quantized else self.slot_bytes
        assert slot is not None
        return self.capacity * slot

    def update(self, n: int) -> int:
        """Add ``n`` tokens as mlx-lm does; return how many keys attention then reads."""
        self.transient = 0.0
        if self.slot_bytes == 0:  # linear attention: fixed state, no keys
            self.offset += n
            return 0
        if self.max_size is None:
            if self.offset + n > self.capacity:
                self.transient = self._per_layer()
                base = self.capacity if self.offset % KV_STEP == 0 else self.offset
                self.capacity = base + math.ceil(n / KV_STEP) * KV_STEP
            self.offset += n
            return self.offset
        if n > 1:  # RotatingKVCache._update_concat
            self.transient = self._per_layer()
            kept = min(self.capacity, self.offset)
            self.capacity = (min(kept, self.max_size - 1) if self.capacity else 0) + n
            self.offset += n
            return self.capacity
        # RotatingKVCache._update_in_place: grow by a step until the window, then trim to it.
        if self.capacity == 0 or (self.offset >= self.capacity and self.capacity < self.max_size):
            self.transient = self._per_layer()
            self.capacity += max(0, min(KV_STEP, self.max_size - self.offset))
        if self.capacity > self.max_size:
            self.transient = self._per_layer()
            self.capacity = self.max_size
        self.offset += 1
        return min(self.offset, self.capacity)

    def decode_to(self, tokens: int) -> None:
        """One token at a time up to ``tokens``, jumping over steps that allocate nothing."""
        while self.offset < tokens:
            if self.slot_bytes == 0:
                self.offset = tokens  # fixed state
            elif self.max_size is not None and self.capacity == self.max_size:
                self.offset = tokens  # a full rotating cache only overwrites
            elif self.offset < self.capacity and (
                self.max_size is None or self.capacity < self.max_size
            ):
                self.offset = min(tokens, self.capacity)  # fits: no allocation
            else:
                self.update(1)

    def maybe_quantize(self, start: int) -> float:
        """Convert at ``start`` tokens as mlx-lm does; return the bytes briefly held twice."""
        if self.quantized_slot_bytes is None or self.quantized or self.offset < start:
            return 0.0
        before = self.nbytes
        self.quantized = True
        return float(before)


def make_caches(
    arch: Architecture, dtype_bytes: int, kv_bits: int | None, max_kv_size: int | None
) -> list[CacheGroup]:
    slot = 2 * arch.num_kv_heads * arch.head_dim
    fp_slot = float(slot * dtype_bytes)
    groups: list[CacheGroup] = []
    full = arch.count(LayerKind.FULL)
    if full:
        rotating = max_kv_size if arch.honours_max_kv_size else None
        quantized = None
        if kv_bits is not None:
            if rotating is not None:
                raise ValueError(
                    "mlx-lm cannot quantize a rotating cache: drop kv_bits or max_kv_size"
                )
            quantized = slot * kv_element_bytes(kv_bits, dtype_bytes, arch.head_dim)
        groups.append(CacheGroup(full, fp_slot, quantized, max_size=rotating))
    sliding = arch.count(LayerKind.SLIDING)
    if sliding:
        groups.append(CacheGroup(sliding, fp_slot, None, max_size=arch.sliding_window))
    if arch.linear is not None:
        groups.append(
            CacheGroup(
                arch.count(LayerKind.LINEAR),
                0.0,
                None,
                fixed_bytes=arch.linear.state_bytes(dtype_bytes),
            )
        )
    return groups


def kv_per_token(arch: Architecture, dtype_bytes: int, kv_bits: int | None) -> int:
    slot = 2 * arch.num_kv_heads * arch.head_dim
    return math.ceil(
        arch.count(LayerKind.FULL) * slot * kv_element_bytes(kv_bits, dtype_bytes, arch.head_dim)
    )
