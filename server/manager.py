"""The resident model: exactly one at a time, swapped without cutting anyone off.

Lifecycle of each configured model (``ModelState``)::

    UNLOADED ──► LOADING ──► READY ──► UNLOADING ──► UNLOADED
                    │                                   ▲
                    └──► FAILED ──(next request)──► LOADING

Requests ask for a lease on a model (``acquire``). Waiters are served in arrival order, grouped by
model: when the oldest waiter wants the resident model, every waiter for that model is admitted
together; when it wants another one, admissions stop, in-flight requests finish (a swap never
cuts a generation off), the resident model is unloaded, and the wanted one is loaded once for all
its waiters. Alternating clients therefore cost one swap per group, not one per request, and no
model starves.

Memory admission plugs in through ``Gate``: before a lease is granted or a swap starts, the gate
may say wait (memory is busy right now) or reject (it can never fit); the manager performs what it
decides, so the decision itself stays a pure function that is tested on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from server.config import ModelEntry
from server.engine import Engine, LoadedModel
from server.errors import MlxdError, ModelLoadFailed, Overloaded
from server.registry import Registry

log = logging.getLogger("mlxd.manager")


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


class Verdict(Enum):
    GO = "go"
    WAIT = "wait"


class Gate(Protocol):
    """Memory admission as seen by the manager (see ``server.admission``)."""

    def check(self, need: Any, *, resident: ModelEntry | None, active: int) -> Verdict:
        """GO, WAIT, or raise an MlxdError (never fits)."""
        ...

    def released(self, need: Any) -> None:
        """A request that was let in has finished."""
        ...

    def loaded(self, entry: ModelEntry, info: LoadedModel) -> None: ...

    async def calibrate(self, entry: ModelEntry, path: Path) -> None:
        """After a load, before admitting: measure (or reuse) the model's working memory."""
        ...

    def unloaded(self, entry: ModelEntry) -> None: ...


@dataclass(eq=False)
class _Waiter:
    entry: ModelEntry
    need: Any
    future: asyncio.Future[Lease]
    since: float = field(default_factory=time.monotonic)


class ModelManager:
    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        *,
        queue_size: int = 32,
        queue_timeout: float = 300.0,
        default_keep_alive: float | None = None,
        gate: Gate | None = None,
        prewarm: bool = True,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.default_keep_alive = default_keep_alive
        self.gate = gate
        self.prewarm = prewarm
        self.states: dict[str, ModelState] = {e.id: ModelState.UNLOADED for e in registry.entries}
        self.errors: dict[str, str] = {}
        self.resident: ModelEntry | None = None
        self.loaded: LoadedModel | None = None
        self.active = 0
        self.swaps = 0
        self._waiters: list[_Waiter] = []
        self._switching: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._keep_alive: float | None = default_keep_alive
        self._closed = False

    # ---- queries ----------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    def state_of(self, entry: ModelEntry) -> ModelState:
        return self.states[entry.id]

    # ---- leases -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def acquire(
        self, entry: ModelEntry, need: Any = None, keep_alive: KeepAlive | None = None
    ) -> AsyncIterator[Lease]:
        """Hold ``entry`` resident for the duration of the block.

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
            self.active -= 1
            if self.gate is not None:
                self.gate.released(need)
            if keep_alive is not None:
                self._keep_alive = keep_alive.seconds
            else:
                self._keep_alive = _entry_keep_alive(entry, self.default_keep_alive)
            self._pump()
            self._schedule_idle_unload()

    def _drop(self, waiter: _Waiter) -> None:
        """Forget a waiter that gave up; if it had just been admitted, release its slot."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        elif (
            waiter.future.done()
            and not waiter.future.cancelled()
            and waiter.future.exception() is None
        ):
            self.active -= 1
        if not waiter.future.done():
            waiter.future.cancel()
        self._pump()

    def _pump(self) -> None:
        """Admit, or start a swap for, the oldest waiter's model. Called after every change."""
        while self._switching is None and self._waiters and not self._closed:
            head = self._waiters[0]
            target = head.entry
            if self.resident is not None and self.resident.id == target.id:
                for waiter in [w for w in self._waiters if w.entry.id == target.id]:
                    if not self._admit(waiter):
                        self._retry_later()
                        break
                return
            if self.active > 0:
                return  # let in-flight requests on the resident model finish first
            verdict = self._ask_gate(head)
            if verdict is None:
                continue  # the head was refused; look at the next one
            if verdict is Verdict.WAIT:
                self._retry_later()
                return
            self._switching = asyncio.get_running_loop().create_task(self._switch(target))

    def _ask_gate(self, waiter: _Waiter) -> Verdict | None:
        """The gate's verdict on ``waiter``; None when it refused it (the waiter is failed)."""
        if self.gate is None:
            return Verdict.GO
        try:
            return self.gate.check(waiter.need, resident=self.resident, active=self.active)
        except MlxdError as exc:
            self._waiters.remove(waiter)
            _fail(waiter, exc)
            return None

    def poke(self) -> None:
        """Something outside changed (e.g. memory pressure cleared): look at the queue again."""
        self._pump()

    def _retry_later(self, delay: float = 0.5) -> None:
        """Memory may free up without any event here (other programs); look again soon."""
        if self._retry_timer is None:

            def retry() -> None:
                self._retry_timer = None
                self._pump()

            self._retry_timer = asyncio.get_running_loop().call_later(delay, retry)

    def _admit(self, waiter: _Waiter) -> bool:
        """Grant a lease if the gate lets this request in now; False to keep it waiting."""
        if waiter.future.done():  # gave up in the meantime
            self._waiters.remove(waiter)
            return True
        verdict = self._ask_gate(waiter)
        if verdict is None:
            return True
        if verdict is Verdict.WAIT:
            return False
        assert self.loaded is not None and self.resident is not None
        self._waiters.remove(waiter)
        self.active += 1
        waiter.future.set_result(Lease(self.resident, self.loaded.path, self.loaded))
        return True

    async def _switch(self, target: ModelEntry) -> None:
        try:
            await self._unload_resident()
            self.states[target.id] = ModelState.LOADING
            self.errors.pop(target.id, None)
            log.info("loading model %s", target.id)
            path = await self.registry.prepare(target)
            info = await self.engine.load(path, prewarm=self.prewarm)
            if self.gate is not None:
                await self.gate.calibrate(target, path)
            self.resident, self.loaded = target, info
            self.states[target.id] = ModelState.READY
            self.swaps += 1
            if self.gate is not None:
                self.gate.loaded(target, info)
            log.info(
                "model %s ready in %.1fs (active memory %.2f GB)",
                target.id, info.load_seconds, info.active_bytes / 1e9,
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
        if self.resident is None:
            return
        old = self.resident
        self.states[old.id] = ModelState.UNLOADING
        log.info("unloading model %s", old.id)
        self.resident, self.loaded = None, None
        await self.engine.unload()
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


def _entry_keep_alive(entry: ModelEntry, default: float | None) -> float | None:
    return entry.keep_alive_seconds if entry.keep_alive is not None else default


def _fail(waiter: _Waiter, exc: BaseException) -> None:
    if not waiter.future.done():
        waiter.future.set_exception(exc)
