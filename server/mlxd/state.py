"""Everything a running server holds, built once from Settings and shared by the routes."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from mlxd import __version__
from mlxd.backend import backend_info
from mlxd.chat import ChatService
from mlxd.config import ModelEntry
from mlxd.engine import Engine
from mlxd.gate import MemoryGate, PressureMonitor
from mlxd.limits import InflightLimit
from mlxd.manager import ModelManager
from mlxd.registry import Registry
from mlxd.router import Router
from mlxd.settings import Settings

log = logging.getLogger("mlxd.state")


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
    inflight: InflightLimit
    monitor: PressureMonitor | None = None
    draining: bool = False

    def drain_started(self) -> None:
        """SIGTERM: the listener stopped accepting; running requests may still finish."""
        self.draining = True

    def drain_expired(self) -> None:
        """The drain timeout passed: end what still runs (final chunk, [DONE]) and the queue."""
        ended = self.chat.end_running("length", cause="shutdown")
        log.warning("drain timeout: ended %d running request(s)", ended)
        asyncio.get_running_loop().create_task(self.manager.close())

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
        }
        available = self.router.availability(entry)
        item["present"] = available.status in ("present", "too_big")
        item["availability"] = available.status  # present | too_big | download | import | missing
        item["availability_detail"] = available.detail
        if entry.id in self.manager.errors:
            item["error"] = self.manager.errors[entry.id]
        if available.weights is not None and available.memory is not None:
            item["weights_bytes"] = available.weights
            item["estimated_memory_bytes"] = available.memory
        return item

    async def health(self) -> dict[str, Any]:
        """Liveness and status from counters only: nothing here waits on the MLX thread."""
        resident = self.manager.resident
        memory: dict[str, Any] = {}
        memory.update(await self.engine.memory())  # the worker's snapshot
        memory.update(self.gate.status())
        batch = self.manager.batch_status()
        # The memory bar reads these beside the budget (the residency record owns them).
        memory["resident_weights"] = batch.get("resident_weights", 0)
        memory["reserved"] = batch.get("reserved", 0)
        return {
            "status": "draining" if self.draining else "ok",
            "version": __version__,
            "backend": backend_info().describe(),
            "uptime_s": round(time.time() - self.started, 1),
            "resident_model": resident.id if resident else None,
            "resident_state": self.manager.state_of(resident).value if resident else None,
            "active_requests": self.manager.active,
            "queue_depth": self.manager.queue_depth,
            "in_flight": self.inflight.count,
            "batch": batch,
            "swaps": self.manager.swaps,
            "memory": memory,
            "engine": self.engine.stats(),
        }
