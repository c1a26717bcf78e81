"""Which configured model answers a request.

A request names a configured id or alias. ``auto`` (any model) and ``auto:<tag>`` (models with
that tag) pick, among the candidates, the largest model whose estimated need fits the memory budget.
"""

from __future__ import annotations

from typing import Any

from server.config import ModelEntry
from server.errors import InsufficientMemory, ModelNotFound
from server.protocol import ChatRequest
from server.registry import Registry


class Router:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def pick(self, request: ChatRequest) -> ModelEntry:
        name = request.model
        if name != "auto" and not name.startswith("auto:"):
            return self.registry.get(name)
        tag = name.partition(":")[2]
        candidates = [e for e in self.registry.entries if not tag or tag in e.tags]
        if not candidates:
            raise ModelNotFound(name, [e.id for e in self.registry.entries])
        sized = [(self.weights_estimate(e), e) for e in candidates]
        fitting = [(size or 0, e) for size, e in sized if self.fits(e, size)]
        if not fitting:
            raise InsufficientMemory(
                f"no model tagged {tag!r} fits the memory budget" if tag
                else "no configured model fits the memory budget",
                param="model",
            )  # fmt: skip
        return max(fitting, key=lambda pair: pair[0])[1]

    def fits(self, entry: ModelEntry, weights: int | None) -> bool:
        return True

    def weights_estimate(self, entry: ModelEntry) -> int | None:
        return None

    def memory_status(self) -> dict[str, Any]:
        return {}
