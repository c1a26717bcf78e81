"""Resident-model lifecycle with a recording fake engine: single-flight, grouping, failures."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mlxd.admission import Decision, Need, Resident, State, decide
from mlxd.config import ModelEntry, parse_models
from mlxd.engine import LoadedModel
from mlxd.errors import ModelLoadFailed, Overloaded
from mlxd.manager import KeepAlive, ModelManager, ModelState
from mlxd.memory.sizes import GIB
from mlxd.registry import Registry
from mlxd.sources import ModelSources
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio


def make(
    tiny_dirs: dict[str, Path], tmp_path: Path, engine: FakeEngine, **kwargs: object
) -> tuple[ModelManager, Registry]:
    models = parse_models(
        {"models": [{"id": n, "source": {"path": str(p)}} for n, p in tiny_dirs.items()]}, "t"
    )
    registry = Registry(models, ModelSources(tmp_path, tmp_path))
    return ModelManager(engine, registry, **kwargs), registry  # type: ignore[arg-type]


async def use(manager: ModelManager, registry: Registry, name: str, log: list[str],
              hold: float = 0.01, need: Any = None, label: str | None = None) -> None:  # fmt: skip
    async with manager.acquire(registry.get(name), need=need) as lease:
        log.append(f"start:{label or lease.entry.id}")
        await asyncio.sleep(hold)
        log.append(f"end:{label or lease.entry.id}")


async def test_concurrent_requests_share_one_load(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    engine = FakeEngine()
    manager, registry = make(tiny_dirs, tmp_path, engine)
    log: list[str] = []
    await asyncio.gather(*(use(manager, registry, "alpha", log) for _ in range(5)))
    assert engine.events == ["load:alpha"]
    assert log.count("start:alpha") == 5
    assert manager.state_of(registry.get("alpha")) is ModelState.READY


async def test_swap_waits_for_in_flight_and_groups_by_model(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    engine = FakeEngine()
    manager, registry = make(tiny_dirs, tmp_path, engine)
    log: list[str] = []
    first = asyncio.create_task(use(manager, registry, "alpha", log, hold=0.1))
    while "start:alpha" not in log:  # alpha is loaded and running before the others arrive
        await asyncio.sleep(0.005)
    order = ["beta", "alpha", "beta", "alpha", "beta"]
    rest = [asyncio.create_task(use(manager, registry, n, log)) for n in order]
    await asyncio.gather(first, *rest)
    # The in-flight alpha request finished before beta was loaded: no generation is cut off.
    assert log.index("end:alpha") < engine.events.index("load:beta")
    # Grouped: alpha, then all betas, then the remaining alphas — not a swap per request.
    assert engine.events == ["load:alpha", "unload:alpha", "load:beta", "unload:beta", "load:alpha"]
    assert log.count("start:beta") == 3 and log.count("start:alpha") == 3
    assert manager.swaps == 3


async def test_failed_load_reports_and_server_keeps_serving(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    engine = FakeEngine(fail_load={"beta"})
    manager, registry = make(tiny_dirs, tmp_path, engine)
    with pytest.raises(ModelLoadFailed, match="corrupt"):
        await use(manager, registry, "beta", [])
    assert manager.state_of(registry.get("beta")) is ModelState.FAILED
    assert "corrupt" in manager.errors["beta"]
    log: list[str] = []
    await use(manager, registry, "alpha", log)
    assert log == ["start:alpha", "end:alpha"]


async def test_queue_full_is_overloaded(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    engine = FakeEngine()
    manager, registry = make(tiny_dirs, tmp_path, engine, queue_size=1)
    holder = asyncio.create_task(use(manager, registry, "alpha", [], hold=0.2))
    await asyncio.sleep(0.02)
    waiting = asyncio.create_task(use(manager, registry, "beta", []))
    await asyncio.sleep(0.02)
    with pytest.raises(Overloaded) as info:
        await use(manager, registry, "beta", [])
    assert info.value.status_code == 503 and "Retry-After" in info.value.headers
    await asyncio.gather(holder, waiting)


async def test_queue_timeout_is_overloaded(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    engine = FakeEngine()
    manager, registry = make(tiny_dirs, tmp_path, engine, queue_timeout=0.05)
    holder = asyncio.create_task(use(manager, registry, "alpha", [], hold=0.3))
    await asyncio.sleep(0.02)
    with pytest.raises(Overloaded, match="waited"):
        await use(manager, registry, "beta", [])
    await holder
    assert manager.queue_depth == 0 and manager.active == 0


async def test_keep_alive_zero_unloads_after_request(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    engine = FakeEngine()
    manager, registry = make(tiny_dirs, tmp_path, engine)
    async with manager.acquire(registry.get("alpha"), keep_alive=KeepAlive(0.0)):
        pass
    for _ in range(50):
        await asyncio.sleep(0.01)
        if manager.resident is None:
            break
    assert engine.events == ["load:alpha", "unload:alpha"]
    assert manager.state_of(registry.get("alpha")) is ModelState.UNLOADED


async def test_cancelled_waiter_releases_nothing(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    engine = FakeEngine()
    manager, registry = make(tiny_dirs, tmp_path, engine)
    holder = asyncio.create_task(use(manager, registry, "alpha", [], hold=0.1))
    await asyncio.sleep(0.02)
    waiter = asyncio.create_task(use(manager, registry, "beta", []))
    await asyncio.sleep(0.02)
    waiter.cancel()
    await holder
    await asyncio.sleep(0.02)
    assert manager.active == 0 and manager.queue_depth == 0
    assert "load:beta" not in engine.events


class BudgetGate:
    """The real admission rules over a fixed budget (no machine readings); each request needs
    ``need`` bytes beside the 1 GiB of weights."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.seen_reserved: list[int] = []

    def decide(self, entry: ModelEntry, need: Any, resident: Resident | None) -> Decision:
        self.seen_reserved.append(resident.reserved if resident else 0)
        wanted = Need(entry.id, GIB, int(need or 0), 10, 10)
        return decide(wanted, State(self.budget, self.budget, resident))

    def make_room(self, decision: Decision) -> None:
        pass  # no prefix cache to give back

    def loaded(self, entry: ModelEntry, info: LoadedModel) -> int:
        return GIB

    async def calibrate(
        self, entry: ModelEntry, path: Path, resident: Callable[[], Resident | None]
    ) -> None:
        pass

    def unloaded(self, entry: ModelEntry) -> None:
        pass


async def test_sequence_that_does_not_fit_beside_the_batch_waits_then_runs(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    gate = BudgetGate(budget=GIB + 6 * GIB)
    manager, registry = make(tiny_dirs, tmp_path, FakeEngine(), gate=gate)
    log: list[str] = []
    first = asyncio.create_task(use(manager, registry, "alpha", log, 0.15, 4 * GIB, "first"))
    while "start:first" not in log:
        await asyncio.sleep(0.005)
    small = asyncio.create_task(use(manager, registry, "alpha", log, 0.01, GIB, "small"))
    await asyncio.sleep(0.03)
    assert log == ["start:first", "start:small", "end:small"]  # 4 + 1 fits in 6: it joined
    big = asyncio.create_task(use(manager, registry, "alpha", log, 0.01, 4 * GIB, "big"))
    await asyncio.sleep(0.05)
    assert "start:big" not in log and manager.queue_depth == 1
    # Waiting reserves nothing: only the running sequence's 4 GiB is counted.
    assert manager.batch_status()["reserved"] == 4 * GIB
    assert manager.batch_status()["queue"][0]["model"] == "alpha"
    await asyncio.gather(first, small, big)
    assert log.index("start:big") > log.index("end:first")
    assert manager.active == 0 and manager.batch_status()["reserved"] == 0


async def test_max_concurrency_bounds_the_batch(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    manager, registry = make(tiny_dirs, tmp_path, FakeEngine(), max_concurrency=2)
    alpha = registry.get("alpha")
    running: list[int] = []

    async def one() -> None:
        async with manager.acquire(alpha):
            running.append(manager.active)
            await asyncio.sleep(0.02)

    await asyncio.gather(*(one() for _ in range(6)))
    assert max(running) == 2 and len(running) == 6
    per_model = manager.concurrency_of(alpha.model_copy(update={"max_concurrency": 5}))
    assert per_model == 5  # models.yaml's max_concurrency overrides the server's


async def test_nothing_joins_a_batch_that_drains_for_a_swap(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A request for another model waits for the drain; a later request for the resident model
    does not join meanwhile (it would make the swap wait longer, without bound)."""
    engine = FakeEngine()
    manager, registry = make(tiny_dirs, tmp_path, engine)
    log: list[str] = []
    first = asyncio.create_task(use(manager, registry, "alpha", log, 0.1, label="a1"))
    while "start:a1" not in log:
        await asyncio.sleep(0.005)
    beta = asyncio.create_task(use(manager, registry, "beta", log, label="b"))
    await asyncio.sleep(0.02)
    late = asyncio.create_task(use(manager, registry, "alpha", log, label="a2"))
    await asyncio.gather(first, beta, late)
    assert log.index("end:a1") < log.index("start:b") < log.index("start:a2")
    assert engine.events == ["load:alpha", "unload:alpha", "load:beta", "unload:beta", "load:alpha"]


async def test_pressure_ends_the_newest_flight_once_and_tracks_who_ran_alone(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    manager, registry = make(tiny_dirs, tmp_path, FakeEngine())
    entry = registry.get("alpha")
    stopped: list[tuple[str, str]] = []
    async with manager.acquire(entry) as first:
        assert first.flight is not None and first.flight.alone
        first.flight.stop = lambda why: stopped.append(("first", why))
        async with manager.acquire(entry) as second:
            assert second.flight is not None
            second.flight.stop = lambda why: stopped.append(("second", why))
            assert not first.flight.alone and not second.flight.alone  # a batch of two
            assert manager.end_newest("memory pressure: swap grew") is second.flight
            assert stopped == [("second", "memory pressure: swap grew")]
            assert manager.end_newest("again") is first.flight  # the next reading: the next
            assert manager.end_newest("again") is None  # nothing left to end
    assert manager.end_newest("idle") is None
