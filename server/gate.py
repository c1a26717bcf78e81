"""Memory admission wired to the running server.

:func:`server.admission.decide` is pure; this module feeds it. It turns a prepared request into
a ``Need`` (weights from the safetensors headers, KV cache and working memory simulated by
:mod:`server.estimate`), reads the machine (:mod:`server.memory`) to build the ``State``, keeps
the reservations of admitted requests, and answers the model manager with GO / WAIT or a
client error. A monitor task re-reads memory every few seconds while the server runs and
reacts to what admission cannot see (other programs, OS pressure, swap growth, MLX beyond the
estimates): stop admitting, then evict the prefix cache, then end the newest request (`respond`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from server.admission import Decision, DecisionKind, Need, Reason, Resident, State, decide
from server.calibrate import Calibrator
from server.config import ModelEntry
from server.engine import LoadedModel
from server.estimate import Estimate, ModelProfile, WorkingMemory, estimate_request
from server.manager import Verdict
from server.memory import (
    MemoryBudget,
    MemorySnapshot,
    PressureLevel,
    PressureReading,
    PressureThresholds,
    assess_pressure,
    format_size,
    mlx_memory_limit,
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
    # The estimate for another ``max_tokens``, with the calibration current when it is called.
    estimate: Callable[[int], Estimate] | None = None
    version: int = 0  # the calibrator's version ``need`` was estimated with


@dataclass(frozen=True)
class _Reservation:
    request: int  # bytes reserved: the request's estimate when it was admitted
    prefix_cache: int  # bytes the prefix cache held then (not this request's)


class MemoryGate:
    def __init__(
        self,
        budget: MemoryBudget,
        *,
        snapshot: Snapshotter = take_snapshot,
        swap_baseline: int | None = None,
        prefix_cache_bytes: Callable[[], int] = lambda: 0,
        evict_prefix_cache: Callable[[], None] = lambda: None,
        calibrator: Calibrator | None = None,
    ) -> None:
        self.budget = budget
        self.calibrator = calibrator
        self._snapshot = snapshot
        first = snapshot()
        self.swap_baseline = first.swap_used if swap_baseline is None else swap_baseline
        self.prefix_cache_bytes = prefix_cache_bytes
        self.evict_prefix_cache = evict_prefix_cache
        self.evictions = 0
        self.profiles: dict[str, ModelProfile] = {}
        self.resident: ModelEntry | None = None
        self.resident_weights = 0
        self._reservations: dict[int, _Reservation] = {}  # by id() of the admitted RequestNeed
        self.loading_weights = 0  # weights of the model being loaded (a swap was decided)
        self.calibrating = False  # calibration's samples allocate on purpose
        self.mlx_limit = mlx_memory_limit(budget, first)
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

        def estimate(tokens: int) -> Estimate:
            return estimate_request(
                profile, prompt_tokens, tokens, context_limit=context_limit,
                kv_bits=entry.kv_bits, max_kv_size=entry.max_kv_size,
                prefill_chunk=entry.prefill_step_size, sampling=sampling,
                working=self.working(entry, model_dir),
            )  # fmt: skip

        version = self.calibrator.version if self.calibrator else 0
        need = Need(
            model=entry.id,
            weights=profile.weights,
            request=estimate(max_tokens).request,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            context_limit=context_limit,
            request_for=lambda tokens: estimate(tokens).request,
        )
        return RequestNeed(need, entry, estimate, version)

    # ---- calibration ---------------------------------------------------------------------------

    def working(self, entry: ModelEntry, model_dir: Path) -> WorkingMemory | None:
        """The calibrated working memory of ``entry`` here (None: not measured yet)."""
        if self.calibrator is None:
            return None
        return self.calibrator.working(entry.id, self._key(entry, model_dir))

    def _key(self, entry: ModelEntry, model_dir: Path) -> Any:
        assert self.calibrator is not None
        return self.calibrator.key(
            model_dir, self.profile(entry, model_dir), entry.kv_bits, entry.max_kv_size,
            entry.prefill_step_size,
        )  # fmt: skip

    async def calibrate(self, entry: ModelEntry, model_dir: Path) -> None:
        """After a load: reuse the stored calibration or measure one (see server.calibrate)."""
        if self.calibrator is None:
            return
        profile = self.profile(entry, model_dir)
        context = entry.context_length or profile.architecture.context_length or 4096
        snapshot = self._current(max_age=0.0)
        cache = snapshot.mlx.cache if snapshot.mlx else 0
        # Samples fit what the machine can give now and what the budget leaves beside the
        # weights: calibration must not push further than serving would. (A small budget
        # measures shallower; deeper contexts follow the fitted slopes.)
        room = min(snapshot.available + cache, self.budget.limit - profile.weights)
        key = self._key(entry, model_dir)
        # On a GPU measuring takes a second or two and admission waits for it; on the CPU a
        # full prefill chunk takes most of a minute, so it measures between requests while
        # the prior, itself measured on the CPU backend, estimates.
        background = self.calibrator.backend == "cpu"
        self.calibrating = True
        try:
            await self.calibrator.ensure(entry.id, key, profile, context, room, background)
        finally:
            self.calibrating = bool(self.calibrator.running)
            self._snapshot_at = float("-inf")

    def _refreshed(self, item: RequestNeed) -> RequestNeed:
        """``item`` re-estimated if the calibration changed since it was estimated (the
        model it waited for has just been loaded and measured)."""
        if self.calibrator is None or item.estimate is None:
            return item
        if item.version == self.calibrator.version:
            return item
        request = item.estimate(item.need.max_tokens).request
        return replace(item, need=replace(item.need, request=request),
                       version=self.calibrator.version)  # fmt: skip

    def observe(self, item: RequestNeed, peak: int, completion_tokens: int) -> None:
        """A finished request's measured peak (weights included) against its estimate for
        the tokens it generated; the calibrator raises the terms when it was exceeded."""
        if self.calibrator is None or item.estimate is None or peak <= 0:
            return
        held = self._reservations.get(id(item))
        # Other chats' cached KV was resident beside this request; it is not its own.
        measured = peak - (held.prefix_cache if held else 0)
        estimate = item.estimate(min(completion_tokens, item.need.max_tokens))
        self.calibrator.observe(item.entry.id, estimate, measured)

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

    def counted(self, snapshot: MemorySnapshot) -> int | None:
        """What admission counted for mlxd now (see `server.memory.assess_pressure`)."""
        weights = self.resident_weights if self.resident is not None else self.loading_weights
        counted = weights + self.reserved + self.prefix_cache_bytes()
        self.calibrating = bool(self.calibrator and self.calibrator.running)
        # Nothing resident (a load in progress) or calibration running: what MLX holds is
        # deliberate, not an overshoot of any estimate.
        if (self.calibrating or self.resident is None) and snapshot.mlx is not None:
            counted = max(counted, snapshot.mlx.active)
        return counted

    def state(self, active: int, snapshot: MemorySnapshot | None = None) -> State:
        snapshot = snapshot or self._current()
        reading = assess_pressure(
            snapshot, self.budget, self.swap_baseline, counted=self.counted(snapshot)
        )
        self.last_reading = reading
        resident = None
        if self.resident is not None:
            resident = Resident(
                self.resident.id, self.resident_weights, active,
                self.reserved + self.prefix_cache_bytes(),
            )  # fmt: skip
        pressure = PressureLevel.RED if self.paused_by_pressure else reading.level
        # The queue's size and wait time are bounded by the model manager, which owns it.
        return State(
            budget=self.budget.limit,
            headroom=self.budget.headroom(snapshot, PressureThresholds().spare_yellow),
            resident=resident,
            pressure=pressure,
        )

    def precheck(self, item: RequestNeed) -> None:
        """Refuse at once what can never fit (context or budget), before it queues."""
        ideal = State(budget=self.budget.limit, headroom=self.budget.limit)
        decision = decide(item.need, ideal)
        if decision.kind is DecisionKind.REJECT:
            raise decision.error()

    def check(self, need: Any, *, resident: ModelEntry | None, active: int) -> Verdict:
        """The manager's question for the oldest waiter: go (admit or swap) or wait."""
        if not isinstance(need, RequestNeed):
            return Verdict.GO  # preload and internal leases carry no request
        current = self._refreshed(need)
        decision = decide(current.need, self.state(active))
        self.last_decision = decision
        if decision.kind is DecisionKind.REJECT:
            raise decision.error()
        if decision.kind is DecisionKind.WAIT:
            log.info("request for %s waits: %s", need.entry.id, decision.message)
            if decision.reason in _MEMORY_WAITS and self.prefix_cache_bytes() > 0:
                # Cached KV of earlier chats is the one memory mlxd can give back at once.
                log.info("evicting the prefix cache to make room")
                self.evictions += 1
                self.evict_prefix_cache()
                self._snapshot_at = float("-inf")
            return Verdict.WAIT
        if decision.kind is DecisionKind.SWAP:
            self.loading_weights = need.need.weights
        if decision.kind is DecisionKind.ADMIT:
            self._reservations[id(need)] = _Reservation(
                current.need.request, self.prefix_cache_bytes()
            )
        return Verdict.GO

    @property
    def reserved(self) -> int:
        """Bytes reserved by the requests admitted and not finished."""
        return sum(r.request for r in self._reservations.values())

    def released(self, need: Any) -> None:
        self._reservations.pop(id(need), None)

    def loaded(self, entry: ModelEntry, info: LoadedModel) -> None:
        self._snapshot_at = float("-inf")  # memory just changed: read it again next time
        self.resident = entry
        self.loading_weights = 0
        profile = self.profiles.get(entry.id)
        self.resident_weights = profile.weights if profile else info.active_bytes

    def unloaded(self, entry: ModelEntry) -> None:
        self._snapshot_at = float("-inf")
        self.resident = None
        self.resident_weights = 0

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
        self.last_reading = assess_pressure(
            snapshot, self.budget, self.swap_baseline, counted=self.counted(snapshot)
        )
        return self.last_reading

    def status(self) -> dict[str, Any]:
        reading = self.last_reading
        snap = self.last_snapshot
        return {
            "budget": self.budget.limit,
            "budget_human": format_size(self.budget.limit),
            "budget_basis": self.budget.basis,
            "in_use": reading.in_use,
            "spare": reading.spare,
            "overshoot": reading.overshoot,
            "mlx_limit": self.mlx_limit,
            "in_use_fraction": round(reading.fraction, 3),
            "pressure": reading.level.value,
            "pressure_reasons": list(reading.reasons),
            "admission_paused": self.paused_by_pressure,
            "swap_growth": reading.swap_growth,
            "available": snap.available,
            "total": snap.total,
            "reserved": self.reserved,
            "prefix_cache": self.prefix_cache_bytes(),
            "prefix_cache_evictions": self.evictions,
            "resident_weights": self.resident_weights,
            "calibration": self.calibrator.status() if self.calibrator else {},
        }


class Action(str, Enum):
    """What the pressure monitor does after a reading, in escalating order."""

    NONE = "none"
    RESUME = "resume"  # green again: admit again
    PAUSE = "pause"  # stop admitting
    EVICT = "evict"  # stop admitting and give back the prefix cache (and MLX's buffer cache)
    END_NEWEST = "end_newest"  # still red after evicting: end the newest running request


def respond(level: PressureLevel, paused: bool, red_streak: int) -> Action:
    """The one policy: admitted work is never ended for memory its estimate counted (the
    readings only see what admission cannot: see `server.memory.assess_pressure`); when the
    machine runs short anyway, mlxd first stops admitting, then evicts the prefix cache, and
    only if the next reading is still red ends the newest request, one per reading."""
    if level is PressureLevel.GREEN:
        return Action.RESUME if paused else Action.NONE
    if level is PressureLevel.YELLOW:
        return Action.PAUSE
    return Action.EVICT if red_streak <= 1 else Action.END_NEWEST


class PressureMonitor:
    """Re-reads memory every ``interval`` seconds and acts as `respond` says.

    ``on_red(reading)`` ends the newest running request (it returns nothing; the app logs
    and tells the client why); ``on_clear`` re-examines the queue when admission resumes.
    """

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
        self.red_streak = 0
        self.actions: dict[str, int] = {}  # how often each action was taken, for /health

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

    def step(self, reading: PressureReading) -> Action:
        red = reading.level is PressureLevel.RED
        self.red_streak = self.red_streak + 1 if red else 0
        action = respond(reading.level, self.gate.paused_by_pressure, self.red_streak)
        why = "; ".join(reading.reasons)
        if action is not Action.NONE:
            self.actions[action.value] = self.actions.get(action.value, 0) + 1
        if action is Action.RESUME:
            log.info("memory pressure back to green: admitting again")
            self.gate.paused_by_pressure = False
            self.red_since = None
            self.on_clear()
        elif action is Action.PAUSE:
            if not self.gate.paused_by_pressure:
                log.warning("memory pressure %s (%s): not admitting", reading.level.value, why)
            self.gate.paused_by_pressure = True
        elif action is Action.EVICT:
            log.warning("memory pressure red (%s): not admitting, evicting the prefix cache", why)
            self.red_since = time.monotonic()
            self.gate.paused_by_pressure = True
            self.gate.evictions += 1
            self.gate.evict_prefix_cache()
        elif action is Action.END_NEWEST:
            self.gate.paused_by_pressure = True
            self.on_red(reading)
        return action
