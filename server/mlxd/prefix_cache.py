"""Reuse of KV caches across requests that share a token prefix.

Chats, agent loops and IDE plugins resend a growing history every turn. Keeping the KV cache of
recent requests and starting a new one from the longest common token prefix skips recomputing
that history: prefill then covers only the new tokens.

Entries are taken out while a request uses them (its generation extends the cache in place) and
put back afterwards keyed by the tokens the cache now holds, so no copy is ever made. Matching is
on tokens, not on messages, so templates that rewrite history (Qwen3.5/3.6 drop earlier turns'
reasoning) simply match less. Caches that cannot be trimmed (rotating windows that wrapped,
linear-attention state) are reused only when their whole content is a prefix of the new prompt.

The store is bounded by bytes, evicts least recently used entries first, and is owned by the
engine's MLX thread; it is emptied whenever the resident model changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    tokens: list[int]
    cache: list[Any]
    nbytes: int
    layout: tuple[int | None, int | None]  # (max_kv_size, kv_bits) the cache was built with


@dataclass(frozen=True)
class CacheHit:
    cache: list[Any] | None  # None: start from an empty cache
    reused: int  # prompt tokens already in ``cache``


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def cache_nbytes(cache: list[Any]) -> int:
    return sum(int(getattr(c, "nbytes", 0)) for c in cache)


def _trimmable(cache: list[Any]) -> bool:
    return all(c.is_trimmable() for c in cache)


def _trim(cache: list[Any], n: int) -> None:
    for c in cache:
        c.trim(n)


# A shorter match is not worth taking: it is usually just the chat template's header, and
# taking an entry trims it, destroying another conversation's history for a few tokens (and on
# CUDA, prefilling on top of a trimmed cache measured slower than starting fresh).
MIN_REUSE_TOKENS = 64


class PrefixCache:
    def __init__(
        self, max_bytes: int, max_entries: int = 8, min_reuse: int = MIN_REUSE_TOKENS
    ) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.min_reuse = min_reuse
        self._entries: list[_Entry] = []  # least recently used first
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def take(
        self, prompt: Sequence[int], max_kv_size: int | None = None, kv_bits: int | None = None
    ) -> CacheHit:
        """Remove and return the entry sharing the longest prefix with ``prompt``.

        Only caches built the same way (KV cap, KV quantization) are candidates. At least one
        prompt token is always left to compute: generation needs the logits of the last prompt
        position.
        """
        best: tuple[int, int] | None = None  # (usable prefix, index)
        for index, entry in enumerate(self._entries):
            if entry.layout != (max_kv_size, kv_bits):
                continue
            shared = min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
            if shared < len(entry.tokens) and not _trimmable(entry.cache):
                continue
            if shared >= self.min_reuse and (best is None or shared > best[0]):
                best = (shared, index)
        if best is None:
            self.misses += 1
            return CacheHit(None, 0)
        shared, index = best
        entry = self._entries.pop(index)
        excess = len(entry.tokens) - shared
        if excess:
            _trim(entry.cache, excess)
        self.hits += 1
        self.reused_tokens += shared
        return CacheHit(entry.cache, shared)

    def put(
        self,
        tokens: list[int],
        cache: list[Any],
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
    ) -> None:
        """Keep ``cache`` (holding exactly ``tokens``) for later requests."""
        size = cache_nbytes(cache)
        if size > self.max_bytes or not tokens:
            return
        self._entries.append(_Entry(list(tokens), cache, size, (max_kv_size, kv_bits)))
        self.evict_to(self.max_bytes)

    def evict_to(self, max_bytes: int) -> int:
        """Drop least recently used entries until at most ``max_bytes`` are held; bytes freed."""
        freed = 0
        while self._entries and (self.nbytes > max_bytes or len(self._entries) > self.max_entries):
            freed += self._entries.pop(0).nbytes
        return freed

    def clear(self) -> None:
        self._entries.clear()
