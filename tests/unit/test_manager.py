"""Resident-model lifecycle with a recording fake engine: single-flight, grouping, failures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.config import parse_models
from server.errors import ModelLoadFailed, Overloaded
from server.manager import KeepAlive, ModelManager, ModelState
from server.registry import Registry
from server.sources import ModelSources
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
              hold: float = 0.01) -> None:  # fmt: skip
    async with manager.acquire(registry.get(name)) as lease:
        log.append(f"start:{lease.entry.id}")
        await asyncio.sleep(hold)
        log.append(f"end:{lease.entry.id}")


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
    await asyncio.sleep(0.02)
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
