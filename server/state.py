"""Everything a running server holds, built once from Settings and shared by the routes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from server import __version__
from server.backend import backend_info
from server.chat import ChatService
from server.config import ModelEntry, Settings
from server.engine import Engine
from server.gate import MemoryGate, PressureMonitor
from server.manager import ModelManager
from server.registry import Registry
from server.router import Router


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    engine: Engine
    manager: ModelManager
    chat: ChatService
    router: Router
    gate: MemoryGate
    started: float
    monitor: PressureMonitor | None = None

    def describe_model(self, entry: ModelEntry) -> dict[str, Any]:
        state = self.manager.state_of(entry)
        item: dict[str, Any] = {
            "id": entry.id,
            "object": "model",
            "created": int(self.started),
            "owned_by": "mlxd",
            "status": state.value,
            "aliases": entry.aliases,
            "tags": entry.tags,
            "present": self.registry.is_present(entry),
        }
        if entry.id in self.manager.errors:
            item["error"] = self.manager.errors[entry.id]
        weights = self.router.weights_estimate(entry)
        if weights is not None:
            item["weights_bytes"] = weights
            item["estimated_memory_bytes"] = self.router.reserve_estimate(entry, weights)
        return item

    async def health(self) -> dict[str, Any]:
        resident = self.manager.resident
        memory: dict[str, Any] = {}
        memory.update(await self.engine.memory())
        memory.update(self.gate.status())
        return {
            "status": "ok",
            "version": __version__,
            "backend": backend_info().describe(),
            "uptime_s": round(time.time() - self.started, 1),
            "resident_model": resident.id if resident else None,
            "resident_state": self.manager.state_of(resident).value if resident else None,
            "active_requests": self.manager.active,
            "queue_depth": self.manager.queue_depth,
            "batch": self.manager.batch_status(),
            "swaps": self.manager.swaps,
            "memory": memory,
            "engine": self.engine.stats(),
        }
