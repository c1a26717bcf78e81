"""The resident model: exactly one at a time, swapped without cutting anyone off.

Lifecycle of each configured model (``ModelState``)::

    UNLOADED ──► LOADING ──► READY ──► UNLOADING ──► UNLOADED
                    │                                   ▲
                    └──► FAILED ──(next request)──► LOADING

Requests ask for a lease on a model (``acquire``): a lease is one sequence in the engine's
running batch. Waiters are served in arrival order (a bounded FIFO queue; full → 503 with
Retry-After), grouped by model: when the oldest waiter may join the resident model's batch, the
waiters behind it for that model join too while they fit; when it wants another model, nothing
new joins the batch, the running sequences finish (a swap never cuts a generation off, and the
drain is bounded by what already runs), the resident model is unloaded, and the wanted one is
loaded once for all its waiters. Alternating clients therefore cost one swap per group, not one
per request, and no model starves.

What happens to a waiter is :func:`server.admission.decide`'s answer (join / wait / swap /
swap after drain / reject), asked through the `MemoryGate` when there is one; the manager
only carries it out. The resident model and the sequences running on it are recorded in one
place, :class:`Residency`, and a sequence's memory reservation exists only while it runs:
nothing in the queue reserves memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlxd.admission import Decision, DecisionKind, Need, Resident, State, decide
from mlxd.config import ModelEntry
from mlxd.engine import Engine, LoadedModel
from mlxd.errors import MlxdError, ModelLoadFailed, Overloaded
from mlxd.memory.sizes import format_size
from mlxd.registry import Registry
from mlxd.settings import DEFAULT_MAX_CONCURRENCY, DEFAULT_QUEUE_SIZE

if TYPE_CHECKING:
    from mlxd.gate import MemoryGate

log = logging.getLogger("mlxd.manager")

UNLIMITED = 1 << 62  # the budget and headroom when no memory gate is configured


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass(frozen=True)
class KeepAlive:
    """How long the model stays loaded after a request; ``seconds=None`` means forever."""

    seconds: float | None


@dataclass
class Lease:
    entry: ModelEntry
    path: Path
    loaded: LoadedModel
    flight: Flight | None = None  # the sequence's place in the batch (None: preload)


@dataclass
class Flight:
    """One sequence admitted into the running batch and not finished."""

    id: int
    model: str
    reserved: int  # bytes admission counted for it (KV cache + working memory)
    prompt_tokens: int
    max_tokens: int
    since: float = field(default_factory=time.monotonic)
    alone: bool = True  # no other sequence ran beside it (so MLX's peak is its own)
    # Ends the sequence early with a reason for its client; set by whoever holds the lease.
    stop: Callable[[str], None] | None = field(default=None, repr=False, compare=False)


@dataclass
class Residency:
    """The one record of the resident model and the sequences running on it."""

    entry: ModelEntry | None = None
    loaded: LoadedModel | None = None
    weights: int = 0
    flights: dict[int, Flight] = field(default_factory=dict)

    @property
    def active(self) -> int:
        return len(self.flights)

    @property
    def reserved(self) -> int:
        return sum(f.reserved for f in self.flights.values())

    @property
    def longest(self) -> int:
        """The most tokens any running sequence may reach (the batch's cache is that long)."""
        return max((f.prompt_tokens + f.max_tokens for f in self.flights.values()), default=0)

    def view(self, max_concurrency: int | None) -> Resident | None:
        """What :func:`server.admission.decide` sees of it."""
        if self.entry is None:
            return None
        return Resident(
            self.entry.id, self.weights, self.active, self.reserved, max_concurrency,
            self.longest,
        )  # fmt: skip


@dataclass(eq=False)
class _Waiter:
    entry: ModelEntry
    need: Any
    future: asyncio.Future[Lease]
    since: float = field(default_factory=time.monotonic)
    flight: Flight | None = None  # set when it joins


class ModelManager:
    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        queue_timeout: float = 300.0,
        default_keep_alive: float | None = None,
        gate: MemoryGate | None = None,
        prewarm: bool = True,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.default_keep_alive = default_keep_alive
        self.gate = gate
        self.prewarm = prewarm
        self.max_concurrency = max_concurrency
        self.states: dict[str, ModelState] = {e.id: ModelState.UNLOADED for e in registry.entries}
        self.errors: dict[str, str] = {}
        self.residency = Residency()
        self.swaps = 0
        self.last_decision: Decision | None = None
        self._ids = itertools.count(1)
        self._waiters: list[_Waiter] = []
        self._switching: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._keep_alive: float | None = default_keep_alive
        self._closed = False

    # ---- queries ----------------------------------------------------------------------------

    @property
    def resident(self) -> ModelEntry | None:
        return self.residency.entry

    @property
    def loaded(self) -> LoadedModel | None:
        return self.residency.loaded

    @property
    def active(self) -> int:
        return self.residency.active

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    def state_of(self, entry: ModelEntry) -> ModelState:
        return self.states[entry.id]

    def concurrency_of(self, entry: ModelEntry) -> int:
        return entry.max_concurrency or self.max_concurrency

    def batch_status(self) -> dict[str, Any]:
        """For /health: the running batch, each sequence's reservation, and the queue."""
        now = time.monotonic()
        entry = self.residency.entry
        return {
            "size": self.residency.active,
            "max_concurrency": self.concurrency_of(entry) if entry else self.max_concurrency,
            "reserved": self.residency.reserved,
            "resident_weights": self.residency.weights,
            "sequences": [
                {**_public(f), "running_s": round(now - f.since, 2)}
                for f in self.residency.flights.values()
            ],
            "queue": [
                {"model": w.entry.id, "waiting_s": round(now - w.since, 2)} for w in self._waiters
            ],
            "last_decision": self.last_decision.kind.value if self.last_decision else None,
        }

    # ---- leases -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def acquire(
        self, entry: ModelEntry, need: Any = None, keep_alive: KeepAlive | None = None
    ) -> AsyncIterator[Lease]:
        """Hold a place in ``entry``'s running batch for the duration of the block.

        ``keep_alive`` (the request's, as Ollama clients send it) overrides the model's and the
        server's idle-unload delay once this request is done.
        """
        if self._closed:
            raise Overloaded("the server is shutting down", retry_after=5)
        if len(self._waiters) >= self.queue_size:
            raise Overloaded(
                f"the request queue is full ({self.queue_size} waiting); retry shortly",
                retry_after=max(1, int(self.queue_timeout / 10)),
            )
        waiter = _Waiter(entry, need, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._cancel_idle_timer()
        self._pump()
        try:
            lease = await asyncio.wait_for(asyncio.shield(waiter.future), self.queue_timeout)
        except asyncio.TimeoutError:
            self._drop(waiter)
            raise Overloaded(
                f"waited {self.queue_timeout:.0f}s for model {entry.id!r} without being admitted",
                retry_after=max(1, int(self.queue_timeout / 10)),
            ) from None
        except BaseException:
            self._drop(waiter)
            raise
        try:
            yield lease
        finally:
            self._land(waiter)
            if keep_alive is not None:
                self._keep_alive = keep_alive.seconds
            else:
                self._keep_alive = _entry_keep_alive(entry, self.default_keep_alive)
            self._pump()
            self._schedule_idle_unload()

    def _land(self, waiter: _Waiter) -> None:
        """The sequence left the batch: its reservation ends."""
        if waiter.flight is not None:
            self.residency.flights.pop(waiter.flight.id, None)
            waiter.flight = None

    def _drop(self, waiter: _Waiter) -> None:
        """Forget a waiter that gave up; if it had just been admitted, end its flight."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        self._land(waiter)
        if not waiter.future.done():
            waiter.future.cancel()
        self._pump()

    def view(self) -> Resident | None:
        """The resident model and its batch as admission sees them."""
        entry = self.residency.entry
        return self.residency.view(self.concurrency_of(entry) if entry else None)

    def end_newest(self, reason: str) -> Flight | None:
        """End the most recently admitted running sequence (memory pressure, after admission
        stopped and the prefix cache was given back); ``reason`` goes to its client and the
        log. ``None`` when nothing running can be ended."""
        flights = [f for f in self.residency.flights.values() if f.stop is not None]
        if not flights:
            return None
        newest = max(flights, key=lambda f: (f.since, f.id))
        log.warning("ending the newest request early (flight %d): %s", newest.id, reason)
        assert newest.stop is not None
        newest.stop(reason)
        newest.stop = None  # once
        return newest

    def _decide(self, waiter: _Waiter) -> Decision:
        """The one decision: the gate's when there is one, else the same rules unbounded."""
        resident = self.view()
        if self.gate is not None:
            decision = self.gate.decide(waiter.entry, waiter.need, resident)
        else:
            need = Need(waiter.entry.id, 0, 0, 1, 0)
            decision = decide(need, State(UNLIMITED, UNLIMITED, resident))
        self.last_decision = decision
        return decision

    def _pump(self) -> None:
        """Carry out the decision for the oldest waiter. Called after every change."""
        while self._switching is None and self._waiters and not self._closed:
            head = self._waiters[0]
            if head.future.done():  # gave up in the meantime
                self._waiters.remove(head)
                continue
            decision = self._decide(head)
            kind = decision.kind
            if kind is DecisionKind.REJECT:
                self._waiters.remove(head)
                _fail(head, decision.error())
            elif kind is DecisionKind.JOIN:
                self._join(head, decision)
                self._join_group(head.entry)
            elif kind is DecisionKind.WAIT:
                if self.gate is not None:
                    self.gate.make_room(decision)  # decided again when the retry comes
                log.info("request for %s waits: %s", head.entry.id, decision.message)
                self._retry_later()  # memory may free up without any event here
                return
            elif kind is DecisionKind.DRAIN:
                return  # nothing new joins; the last sequence leaving pumps again
            else:
                self._switching = asyncio.get_running_loop().create_task(self._switch(head.entry))
                return

    def _join_group(self, entry: ModelEntry) -> None:
        """Let the later waiters for the same model join too, in order, while they may."""
        for waiter in [w for w in self._waiters if w.entry.id == entry.id]:
            if waiter.future.done():
                self._waiters.remove(waiter)
                continue
            decision = self._decide(waiter)
            if decision.kind is DecisionKind.REJECT:
                self._waiters.remove(waiter)
                _fail(waiter, decision.error())
            elif decision.kind is DecisionKind.JOIN:
                self._join(waiter, decision)
            else:
                return

    def _join(self, waiter: _Waiter, decision: Decision) -> None:
        residency = self.residency
        assert residency.entry is not None and residency.loaded is not None
        self._waiters.remove(waiter)
        need = getattr(waiter.need, "need", None)
        waiter.flight = Flight(
            next(self._ids), waiter.entry.id, decision.need,
            need.prompt_tokens if need else 0, need.max_tokens if need else 0,
        )  # fmt: skip
        if residency.flights:
            waiter.flight.alone = False
            for flight in residency.flights.values():
                flight.alone = False
        residency.flights[waiter.flight.id] = waiter.flight
        waiter.future.set_result(
            Lease(residency.entry, residency.loaded.path, residency.loaded, waiter.flight)
        )

    def poke(self) -> None:
        """Something outside changed (e.g. memory pressure cleared): look at the queue again."""
        self._pump()

    def _retry_later(self, delay: float = 0.5) -> None:
        if self._retry_timer is None:

            def retry() -> None:
                self._retry_timer = None
                self._pump()

            self._retry_timer = asyncio.get_running_loop().call_later(delay, retry)

    async def _switch(self, target: ModelEntry) -> None:
        try:
            await self._unload_resident()
            self.states[target.id] = ModelState.LOADING
            self.errors.pop(target.id, None)
            log.info("loading model %s", target.id)
            path = await self.registry.prepare(target)
            info = await self.engine.load(path, prewarm=self.prewarm)
            weights = self.gate.loaded(target, info) if self.gate else info.active_bytes
            self.residency = Residency(target, info, weights)
            if self.gate is not None:  # still switching: nothing joins until it returns
                await self.gate.calibrate(target, path, self.view)
            self.states[target.id] = ModelState.READY
            self.swaps += 1
            log.info(
                "model %s ready in %.1fs (active memory %s)",
                target.id, info.load_seconds, format_size(info.active_bytes),
            )  # fmt: skip
        except Exception as exc:
            error = exc if isinstance(exc, MlxdError) else ModelLoadFailed(
                f"model {target.id!r} failed to load: {type(exc).__name__}: {exc}"
            )  # fmt: skip
            self.states[target.id] = ModelState.FAILED
            self.errors[target.id] = error.message
            log.error("model %s failed to load: %s", target.id, error.message)
            for waiter in [w for w in self._waiters if w.entry.id == target.id]:
                self._waiters.remove(waiter)
                _fail(waiter, error)
        finally:
            self._switching = None
            self._pump()

    async def _unload_resident(self) -> None:
        old = self.residency.entry
        if old is None:
            return
        self.states[old.id] = ModelState.UNLOADING
        log.info("unloading model %s", old.id)
        try:
            await self.engine.unload()
        finally:
            self.residency = Residency()
        self.states[old.id] = ModelState.UNLOADED
        if self.gate is not None:
            self.gate.unloaded(old)

    # ---- idle unload, preload, shutdown ---------------------------------------------------------

    def _schedule_idle_unload(self) -> None:
        self._cancel_idle_timer()
        if self.active or self._waiters or self.resident is None or self._keep_alive is None:
            return
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self._keep_alive, self._idle_expired)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self.active or self._waiters or self._switching is not None:
            return

        async def unload() -> None:
            log.info("keep_alive expired; unloading %s", self.resident.id if self.resident else "")
            await self._unload_resident()

        self._switching = asyncio.get_running_loop().create_task(self._guarded(unload()))

    async def _guarded(self, work: Any) -> None:
        try:
            await work
        finally:
            self._switching = None
            self._pump()

    async def preload(self, entry: ModelEntry) -> None:
        """Load ``entry`` now (``--preload``) so the first request finds it warm.

        The tokenizer and config are read too: otherwise the first request pays for them
        (measured: ~3 s of a 3.5 s cold TTFT on an H100).
        """
        await self.registry.tokenizer(entry)
        await self.registry.config(entry)
        async with self.acquire(entry, keep_alive=KeepAlive(None)):
            pass

    async def unload(self) -> None:
        """Unload the resident model once it is idle."""
        while self._switching is not None:
            await self._switching
        if self.active == 0 and self.resident is not None:
            self._switching = asyncio.get_running_loop().create_task(
                self._guarded(self._unload_resident())
            )
            await self._switching

    async def close(self) -> None:
        self._closed = True
        self._cancel_idle_timer()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        for waiter in self._waiters:
            _fail(waiter, Overloaded("the server is shutting down", retry_after=5))
        self._waiters.clear()
        if self._switching is not None:
            with contextlib.suppress(Exception):
                await self._switching


def _public(flight: Flight) -> dict[str, Any]:
    """A flight's fields for /health (not its start time or its stop hook)."""
    return {k: v for k, v in vars(flight).items() if k not in ("since", "stop")}


def _entry_keep_alive(entry: ModelEntry, default: float | None) -> float | None:
    return entry.keep_alive_seconds if entry.keep_alive is not None else default


def _fail(waiter: _Waiter, exc: BaseException) -> None:
    if not waiter.future.done():
        waiter.future.set_exception(exc)
