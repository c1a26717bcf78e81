"""Which configured model answers a request.

A request names a configured id or alias. ``auto`` (any model) and ``auto:<tag>`` (models with
that tag) pick, among the candidates present on this machine, the largest model whose weights
plus a working KV reserve fit the memory budget — the hardware-aware choice, so the same client
configuration gets a 27B model on a 64 GB Mac and a 9B one on a 16 GB Mac.
"""

from __future__ import annotations

from server.config import ModelEntry
from server.errors import InsufficientMemory, ModelNotFound
from server.estimate import estimate_request
from server.gate import MemoryGate
from server.protocol import ChatRequest
from server.registry import Registry

# The request a routed model must be able to serve: a long-ish prompt and answer.
RESERVE_PROMPT_TOKENS = 4096
RESERVE_COMPLETION_TOKENS = 1024


class Router:
    def __init__(self, registry: Registry, gate: MemoryGate) -> None:
        self.registry = registry
        self.gate = gate

    def pick(self, request: ChatRequest) -> ModelEntry:
        return self.pick_name(request.model)

    def pick_name(self, name: str) -> ModelEntry:
        known = {n for e in self.registry.entries for n in e.names}
        if name not in known:
            name = self.registry.models.match_pattern(name) or name
        if name != "auto" and not name.startswith("auto:"):
            return self.registry.get(name)
        tag = name.partition(":")[2]
        candidates = [e for e in self.registry.entries if not tag or tag in e.tags]
        if not candidates:
            raise ModelNotFound(name, [e.id for e in self.registry.entries])
        budget = self.gate.budget.limit
        sized: list[tuple[int, int, ModelEntry]] = []
        for entry in candidates:
            weights = self.weights_estimate(entry)
            if weights is not None:
                sized.append((weights, self.reserve_estimate(entry, weights), entry))
        fitting = [(weights, entry) for weights, need, entry in sized if need <= budget]
        if not fitting:
            what = f"tagged {tag!r} " if tag else ""
            smallest = min((need for _, need, _ in sized), default=None)
            detail = f"; the smallest needs {smallest / 1e9:.1f} GB" if smallest else ""
            raise InsufficientMemory(
                f"no local model {what}fits the memory budget of {budget / 1e9:.1f} GB{detail}",
                param="model",
            )
        return max(fitting, key=lambda pair: pair[0])[1]

    def weights_estimate(self, entry: ModelEntry) -> int | None:
        """Weight bytes from the safetensors headers; None while the model is not local."""
        if not self.registry.is_present(entry):
            return None
        return self.gate.weights_estimate(entry, self.registry.model_dir(entry))

    def reserve_estimate(self, entry: ModelEntry, weights: int) -> int:
        """Weights plus the memory of a typical long request (what routing must leave room for)."""
        profile = self.gate.profiles.get(entry.id)
        if profile is None:
            return weights
        context = entry.context_length or profile.architecture.context_length or 8192
        prompt = min(RESERVE_PROMPT_TOKENS, context // 2)
        completion = min(RESERVE_COMPLETION_TOKENS, context - prompt)
        estimate = estimate_request(
            profile, prompt, completion, context_limit=context, kv_bits=entry.kv_bits,
            max_kv_size=entry.max_kv_size, prefill_chunk=entry.prefill_step_size,
        )  # fmt: skip
        return weights + estimate.request
