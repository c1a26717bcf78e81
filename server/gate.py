"""Memory admission wired to the running server.

:func:`server.admission.decide` is pure; this module feeds it. It turns a prepared request into
a ``Need`` (weights from the safetensors headers, KV cache and working memory simulated by
:mod:`server.estimate`), reads the machine (:mod:`server.memory`) to build the ``State``, keeps
the reservations of admitted requests, and answers the model manager with GO / WAIT or a
client error. A monitor task re-reads memory every few seconds while the server runs: if
pressure turns red or swap grows past the threshold, admission pauses and running requests are
finished early with ``finish_reason: "length"`` rather than letting the machine thrash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from server.admission import Decision, DecisionKind, Need, Reason, Resident, State, decide
from server.config import ModelEntry
from server.engine import LoadedModel
from server.estimate import ModelProfile, estimate_request
from server.memory import (
    MemoryBudget,
    MemorySnapshot,
    PressureLevel,
    PressureReading,
    assess_pressure,
    format_size,
    take_snapshot,
)

log = logging.getLogger("mlxd.gate")

SNAPSHOT_MAX_AGE = 1.0  # seconds a memory reading is reused for admission decisions

_MEMORY_WAITS = frozenset({Reason.MEMORY_BUSY, Reason.MACHINE_BUSY, Reason.PRESSURE})

Snapshotter = Callable[[], MemorySnapshot]


@dataclass(frozen=True)
class RequestNeed:
    """A request's memory need plus what the gate needs to release it later."""

    need: Need
    entry: ModelEntry


class MemoryGate:
    def __init__(
        self,
        budget: MemoryBudget,
        *,
        snapshot: Snapshotter = take_snapshot,
        swap_baseline: int | None = None,
        prefix_cache_bytes: Callable[[], int] = lambda: 0,
        evict_prefix_cache: Callable[[], None] = lambda: None,
    ) -> None:
        self.budget = budget
        self._snapshot = snapshot
        first = snapshot()
        self.swap_baseline = first.swap_used if swap_baseline is None else swap_baseline
        self.prefix_cache_bytes = prefix_cache_bytes
        self.evict_prefix_cache = evict_prefix_cache
        self.evictions = 0
        self.profiles: dict[str, ModelProfile] = {}
        self.last_reading: PressureReading = assess_pressure(first, budget, self.swap_baseline)
        self.last_snapshot = first
        self._snapshot_at = time.monotonic()
        self.last_decision: Decision | None = None
        self.paused_by_pressure = False

    # ---- estimates -----------------------------------------------------------------------------

    def profile(self, entry: ModelEntry, model_dir: Path) -> ModelProfile:
        profile = self.profiles.get(entry.id)
        if profile is None:
            profile = ModelProfile.from_dir(model_dir)
            self.profiles[entry.id] = profile
        return profile

    def need_for(
        self,
        entry: ModelEntry,
        model_dir: Path,
        prompt_tokens: int,
        max_tokens: int,
        context_limit: int,
        sampling: bool,
    ) -> RequestNeed:
        profile = self.profile(entry, model_dir)

        def request_for(tokens: int) -> int:
            return estimate_request(
                profile, prompt_tokens, tokens, context_limit=context_limit,
                kv_bits=entry.kv_bits, max_kv_size=entry.max_kv_size,
                prefill_chunk=entry.prefill_step_size, sampling=sampling,
            ).request  # fmt: skip

        need = Need(
            model=entry.id,
            weights=profile.weights,
            request=request_for(max_tokens),
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            context_limit=context_limit,
            request_for=request_for,
        )
        return RequestNeed(need, entry)

    def weights_estimate(self, entry: ModelEntry, model_dir: Path | None) -> int | None:
        if entry.id in self.profiles:
            return self.profiles[entry.id].weights
        if model_dir is None or not (model_dir / "config.json").is_file():
            return None
        try:
            return self.profile(entry, model_dir).weights
        except Exception:  # unreadable files surface when the model is used, not here
            return None

    # ---- decisions -------------------------------------------------------------------------------

    def state(self, resident: Resident | None, snapshot: MemorySnapshot | None = None) -> State:
        """How things stand; ``resident`` is the manager's record of the model and its batch,
        to which the prefix cache's bytes are added (cached KV is memory in use)."""
        snapshot = snapshot or self._current()
        reading = assess_pressure(snapshot, self.budget, self.swap_baseline)
        self.last_reading = reading
        if resident is not None:
            resident = replace(resident, reserved=resident.reserved + self.prefix_cache_bytes())
        pressure = PressureLevel.RED if self.paused_by_pressure else reading.level
        # The queue's size and wait time are bounded by the model manager, which owns it.
        return State(
            budget=self.budget.limit,
            headroom=self.budget.headroom(snapshot),
            resident=resident,
            pressure=pressure,
        )

    def precheck(self, item: RequestNeed) -> None:
        """Refuse at once what can never fit (context or budget), before it queues."""
        ideal = State(budget=self.budget.limit, headroom=self.budget.limit)
        decision = decide(item.need, ideal)
        if decision.kind is DecisionKind.REJECT:
            raise decision.error()

    def decide(self, entry: ModelEntry, need: Any, resident: Resident | None) -> Decision:
        """The manager's question for a waiter. Preload and internal leases carry no
        ``RequestNeed``: they count as needing no memory of their own."""
        if isinstance(need, RequestNeed):
            wanted = need.need
        else:
            wanted = Need(entry.id, self.weights_estimate(entry, None) or 0, 0, 1, 0)
        decision = decide(wanted, self.state(resident))
        self.last_decision = decision
        if (
            decision.kind is DecisionKind.WAIT
            and decision.reason in _MEMORY_WAITS
            and self.prefix_cache_bytes() > 0
        ):
            # Cached KV of earlier chats is the one memory mlxd can give back at once.
            log.info("evicting the prefix cache to make room")
            self.evictions += 1
            self.evict_prefix_cache()
            self._snapshot_at = float("-inf")
        return decision

    def loaded(self, entry: ModelEntry, info: LoadedModel) -> int:
        self._snapshot_at = float("-inf")  # memory just changed: read it again next time
        profile = self.profiles.get(entry.id)
        return profile.weights if profile else info.active_bytes

    def unloaded(self, entry: ModelEntry) -> None:
        self._snapshot_at = float("-inf")

    # ---- monitoring ----------------------------------------------------------------------------

    def _current(self, max_age: float = SNAPSHOT_MAX_AGE) -> MemorySnapshot:
        """A reading at most ``max_age`` old: on macOS a reading runs sysctl and vm_stat
        (~10 ms), too slow to repeat for every request's admission."""
        if time.monotonic() - self._snapshot_at > max_age:
            self.last_snapshot = self._snapshot()
            self._snapshot_at = time.monotonic()
        return self.last_snapshot

    def poll(self) -> PressureReading:
        snapshot = self._current(max_age=0.0)
        self.last_reading = assess_pressure(snapshot, self.budget, self.swap_baseline)
        return self.last_reading

    def status(self) -> dict[str, Any]:
        reading = self.last_reading
        snap = self.last_snapshot
        return {
            "budget": self.budget.limit,
            "budget_human": format_size(self.budget.limit),
            "budget_basis": self.budget.basis,
            "in_use": reading.in_use,
            "in_use_fraction": round(reading.fraction, 3),
            "pressure": reading.level.value,
            "pressure_reasons": list(reading.reasons),
            "admission_paused": self.paused_by_pressure,
            "swap_growth": reading.swap_growth,
            "available": snap.available,
            "total": snap.total,
            "prefix_cache": self.prefix_cache_bytes(),
            "prefix_cache_evictions": self.evictions,
        }


class PressureMonitor:
    """Re-reads memory every ``interval`` seconds; pauses admission and ends runs when red."""

    def __init__(
        self,
        gate: MemoryGate,
        on_red: Callable[[PressureReading], None],
        on_clear: Callable[[], None],
        interval: float = 2.0,
    ) -> None:
        self.gate = gate
        self.on_red = on_red
        self.on_clear = on_clear
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self.red_since: float | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                reading = await asyncio.to_thread(self.gate.poll)
            except Exception as exc:  # a failed probe must not stop monitoring
                log.warning("memory probe failed: %s", exc)
                continue
            self.step(reading)

    def step(self, reading: PressureReading) -> None:
        if reading.level is PressureLevel.RED:
            if not self.gate.paused_by_pressure:
                log.warning(
                    "memory pressure red (%s): pausing admission, ending running requests",
                    "; ".join(reading.reasons),
                )
                self.red_since = time.monotonic()
            self.gate.paused_by_pressure = True
            self.on_red(reading)
        elif self.gate.paused_by_pressure and reading.level is PressureLevel.GREEN:
            log.info("memory pressure back to green: admitting again")
            self.gate.paused_by_pressure = False
            self.red_since = None
            self.on_clear()
