"""Memory admission wired to the running server.

:func:`server.admission.decide` is pure; this module feeds it. It turns a prepared request into
a ``Need`` (weights from the safetensors headers, KV cache simulated by :mod:`mlxd.estimate`,
working memory as :mod:`server.calibrate` measured it on this backend), reads the machine
(:mod:`mlxd.memory`) and the manager's record of the resident model and its batch to build
the ``State``, and returns the decision to the model manager, which carries it out. A monitor
task re-reads memory every few seconds while the server runs and reacts to what admission
cannot see (other programs, OS pressure, swap growth, MLX beyond the estimates): stop
admitting, then evict the prefix cache, then end the newest request through the manager
(`respond`).
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

from mlxd.admission import Decision, DecisionKind, Need, Reason, Resident, State, decide
from mlxd.calibrate import PRIOR_LINE, Calibrator
from mlxd.config import ModelEntry
from mlxd.engine import LoadedModel
from mlxd.estimate.request import Estimate, ModelProfile, estimate_request
from mlxd.estimate.working import WorkingMemory
from mlxd.memory.budget import MemoryBudget, mlx_memory_limit
from mlxd.memory.pressure import PressureLevel, PressureReading, PressureThresholds, assess_pressure
from mlxd.memory.probe import take_snapshot
from mlxd.memory.sizes import format_size
from mlxd.memory.snapshot import MemorySnapshot

log = logging.getLogger("mlxd.gate")

SNAPSHOT_MAX_AGE = 1.0  # seconds a memory reading is reused for admission decisions

_MEMORY_WAITS = frozenset({Reason.MEMORY_BUSY, Reason.MACHINE_BUSY, Reason.PRESSURE})

Snapshotter = Callable[[], MemorySnapshot]


@dataclass(frozen=True)
class RequestNeed:
    """A request's memory need, and how to estimate it again (another ``max_tokens``, or a
    calibration that changed while it waited)."""

    need: Need
    entry: ModelEntry
    # The estimate for another ``max_tokens``, with the calibration current when it is called.
    estimate: Callable[[int], Estimate] | None = None
    version: int = 0  # the calibrator's version ``need`` was estimated with


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
        self.mlx_limit = mlx_memory_limit(budget, first)
        self.calibrating = False  # calibration's samples allocate on purpose
        self.last_reading: PressureReading = assess_pressure(first, budget, self.swap_baseline)
        self.last_snapshot = first
        self._snapshot_at = time.monotonic()
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
        first = estimate(max_tokens)
        need = Need(
            model=entry.id,
            weights=profile.weights,
            request=first.request,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            context_limit=context_limit,
            request_for=lambda tokens: estimate(tokens).request,
            kv_per_token=first.kv_per_token,
        )
        return RequestNeed(need, entry, estimate, version)

    # ---- calibration ---------------------------------------------------------------------------

    def working(self, entry: ModelEntry, model_dir: Path) -> WorkingMemory | None:
        """The calibrated working memory of ``entry`` here (None: not measured yet)."""
        if self.calibrator is None:
            return None
        return self.calibrator.working(entry.id, self._key(entry, model_dir))

    def calibration_line(self, entry: ModelEntry, model_dir: Path) -> str:
        """For the banner: the stored calibration this start will reuse, or the prior."""
        if self.calibrator is None:
            return "off (this engine cannot measure): using prior"
        if self.working(entry, model_dir) is None:
            return f"{PRIOR_LINE} until measured after the load"
        return self.calibrator.current[entry.id].describe()

    def _key(self, entry: ModelEntry, model_dir: Path) -> Any:
        assert self.calibrator is not None
        return self.calibrator.key(
            model_dir, self.profile(entry, model_dir), entry.kv_bits, entry.max_kv_size,
            entry.prefill_step_size,
        )  # fmt: skip

    async def calibrate(
        self, entry: ModelEntry, model_dir: Path, resident: Callable[[], Resident | None]
    ) -> None:
        """After a load: reuse the stored calibration or measure one (see server.calibrate).
        ``resident`` is the manager's view of the model and its running batch: each sample
        must fit what the budget and the machine leave beside them at that moment."""
        if self.calibrator is None:
            return
        profile = self.profile(entry, model_dir)
        context = entry.context_length or profile.architecture.context_length or 4096

        def room() -> int:
            state = self.state(resident(), self._current(max_age=0.0))
            held = state.resident.weights + state.resident.reserved if state.resident else 0
            return max(0, min(state.budget - held, state.headroom))

        key = self._key(entry, model_dir)
        # On a GPU measuring takes a second or two and admission waits for it; on the CPU a
        # full prefill chunk takes most of a minute, so it measures between requests while
        # the prior, itself measured on the CPU backend, estimates.
        background = self.calibrator.backend == "cpu"
        self.calibrating = True
        task = None
        try:
            await self.calibrator.ensure(entry.id, key, profile, context, room, background)
            task = self.calibrator.running.get(entry.id)
        finally:
            self._snapshot_at = float("-inf")
            if task is None:
                self.calibrating = False
            else:
                task.add_done_callback(lambda _: setattr(self, "calibrating", False))

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

    def observe(self, item: RequestNeed, measured: int, completion_tokens: int) -> None:
        """A finished sequence's measured peak (weights included, other chats' cached KV left
        out) against its estimate for the tokens it generated; the calibrator raises the terms
        when it was exceeded. Only a sequence that ran alone is observed: in a batch, MLX's
        peak is the whole batch's."""
        if self.calibrator is None or item.estimate is None or measured <= 0:
            return
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

    def counted(self, snapshot: MemorySnapshot, resident: Resident | None) -> int:
        """What admission counted for mlxd now (see `mlxd.memory.pressure.assess_pressure`):
        the resident weights, the running sequences' reservations and the prefix cache."""
        counted = self.prefix_cache_bytes()
        if resident is not None:
            counted += resident.weights + resident.reserved
        # Nothing resident (a load in progress) or calibration running: what MLX holds is
        # deliberate, not an overshoot of any estimate.
        if (self.calibrating or resident is None) and snapshot.mlx is not None:
            counted = max(counted, snapshot.mlx.active)
        return counted

    def state(self, resident: Resident | None, snapshot: MemorySnapshot | None = None) -> State:
        """How things stand; ``resident`` is the manager's record of the model and its batch,
        to which the prefix cache's bytes are added (cached KV is memory in use)."""
        snapshot = snapshot or self._current()
        reading = assess_pressure(
            snapshot, self.budget, self.swap_baseline, counted=self.counted(snapshot, resident)
        )
        self.last_reading = reading
        if resident is not None:
            resident = replace(resident, reserved=resident.reserved + self.prefix_cache_bytes())
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

    def decide(self, entry: ModelEntry, need: Any, resident: Resident | None) -> Decision:
        """The manager's question for a waiter. Preload and internal leases carry no
        ``RequestNeed``: they count as needing no memory of their own."""
        if isinstance(need, RequestNeed):
            wanted = self._refreshed(need).need
        else:
            wanted = Need(entry.id, self.weights_estimate(entry, None) or 0, 0, 1, 0)
        return decide(wanted, self.state(resident))

    def make_room(self, decision: Decision) -> None:
        """Carry out the one thing a memory wait can do at once: give back the prefix cache
        (cached KV of earlier chats)."""
        if not (
            decision.kind is DecisionKind.WAIT
            and decision.reason in _MEMORY_WAITS
            and self.prefix_cache_bytes() > 0
        ):
            return
        log.info("evicting the prefix cache to make room")
        self.evictions += 1
        self.evict_prefix_cache()
        self._snapshot_at = float("-inf")

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

    def poll(self, resident: Resident | None) -> PressureReading:
        snapshot = self._current(max_age=0.0)
        self.last_reading = assess_pressure(
            snapshot, self.budget, self.swap_baseline, counted=self.counted(snapshot, resident)
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
            "prefix_cache": self.prefix_cache_bytes(),
            "prefix_cache_evictions": self.evictions,
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
    readings only see what admission cannot: see `mlxd.memory.pressure.assess_pressure`);
    when the machine runs short anyway, mlxd first stops admitting, then evicts the prefix
    cache, and only if the next reading is still red ends the newest request, one per reading."""
    if level is PressureLevel.GREEN:
        return Action.RESUME if paused else Action.NONE
    if level is PressureLevel.YELLOW:
        return Action.PAUSE
    return Action.EVICT if red_streak <= 1 else Action.END_NEWEST


class PressureMonitor:
    """Re-reads memory every ``interval`` seconds and acts as `respond` says.

    ``resident`` is the manager's view of the resident model and its batch (what admission
    counted); ``on_red(reading)`` ends the newest running sequence through the manager (which
    tells its client why); ``on_clear`` re-examines the queue when admission resumes.
    """

    def __init__(
        self,
        gate: MemoryGate,
        resident: Callable[[], Resident | None],
        on_red: Callable[[PressureReading], None],
        on_clear: Callable[[], None],
        interval: float = 2.0,
    ) -> None:
        self.gate = gate
        self.resident = resident
        self.on_red = on_red
        self.on_clear = on_clear
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
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
                reading = await asyncio.to_thread(self.gate.poll, self.resident())
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
            self.on_clear()
        elif action is Action.PAUSE:
            if not self.gate.paused_by_pressure:
                log.warning("memory pressure %s (%s): not admitting", reading.level.value, why)
            self.gate.paused_by_pressure = True
        elif action is Action.EVICT:
            log.warning("memory pressure red (%s): not admitting, evicting the prefix cache", why)
            self.gate.paused_by_pressure = True
            self.gate.evictions += 1
            self.gate.evict_prefix_cache()
        elif action is Action.END_NEWEST:
            self.gate.paused_by_pressure = True
            self.on_red(reading)
        return action
