"""Prefix cache bookkeeping with real mlx-lm KV caches (tiny arrays, no model)."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from mlxd.prefix_cache import PrefixCache, common_prefix


def kv(tokens: int, layers: int = 2) -> list[KVCache]:
    caches = []
    for _ in range(layers):
        c = KVCache()
        c.update_and_fetch(mx.zeros((1, 2, tokens, 4)), mx.zeros((1, 2, tokens, 4)))
        caches.append(c)
    return caches


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2]) == 2


def test_reuses_longest_prefix_and_trims() -> None:
    pc = PrefixCache(max_bytes=1 << 30, min_reuse=1)
    pc.put([1, 2, 3, 4, 5], kv(5))
    pc.put([1, 2, 9], kv(3))
    hit = pc.take([1, 2, 3, 4, 7, 8])
    assert hit.reused == 4
    assert hit.cache is not None and hit.cache[0].offset == 4  # trimmed from 5
    assert len(pc) == 1  # taken out while in use


def test_always_leaves_one_token_to_compute() -> None:
    pc = PrefixCache(max_bytes=1 << 30, min_reuse=1)
    pc.put([1, 2, 3], kv(3))
    hit = pc.take([1, 2, 3])
    assert hit.reused == 2 and hit.cache is not None and hit.cache[0].offset == 2


def test_miss_without_shared_prefix() -> None:
    pc = PrefixCache(max_bytes=1 << 30, min_reuse=1)
    pc.put([5, 6], kv(2))
    hit = pc.take([1, 2, 3])
    assert hit.cache is None and hit.reused == 0
    assert (pc.hits, pc.misses) == (0, 1)


def test_evicts_least_recently_used_under_byte_limit() -> None:
    one = sum(c.nbytes for c in kv(4))
    pc = PrefixCache(max_bytes=2 * one, min_reuse=1)
    pc.put([1, 1, 1, 1], kv(4))
    pc.put([2, 2, 2, 2], kv(4))
    pc.put([3, 3, 3, 3], kv(4))
    assert len(pc) == 2 and pc.nbytes <= 2 * one
    assert pc.take([1, 1, 1, 1, 0]).cache is None  # the oldest went first
    assert pc.take([3, 3, 3, 3, 0]).reused == 4


def test_no_growth_over_many_requests() -> None:
    one = sum(c.nbytes for c in kv(8))
    pc = PrefixCache(max_bytes=3 * one, max_entries=3, min_reuse=1)
    for i in range(100):
        pc.put([i] * 8, kv(8))
    assert len(pc) <= 3 and pc.nbytes <= 3 * one


def test_too_large_entry_is_not_kept() -> None:
    pc = PrefixCache(max_bytes=10)
    pc.put([1, 2, 3], kv(3))
    assert len(pc) == 0


def test_only_caches_of_the_same_layout_are_reused() -> None:
    pc = PrefixCache(max_bytes=1 << 30, min_reuse=1)
    pc.put([1, 2, 3, 4], kv(4), max_kv_size=None, kv_bits=8)
    assert pc.take([1, 2, 3, 4, 5]).cache is None  # plain request, quantized cache: no
    hit = pc.take([1, 2, 3, 4, 5], kv_bits=8)
    assert hit.reused == 4


def test_a_short_shared_header_does_not_take_another_conversations_cache() -> None:
    pc = PrefixCache(max_bytes=1 << 30, min_reuse=4)
    pc.put([9, 9, 9, 1, 2, 3, 4, 5], kv(8))  # a conversation that starts with a 3-token header
    assert pc.take([9, 9, 9, 7, 7, 7]).cache is None  # shares only the header: left alone
    assert len(pc) == 1
    assert pc.take([9, 9, 9, 1, 2, 3, 4, 5, 6]).reused == 8  # its own continuation still hits
