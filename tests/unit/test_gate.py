"""The memory gate and pressure monitor in a running app (fake engine, recorded pressure)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from mlxd.admission import DecisionKind, Need, Resident
from mlxd.config import ModelEntry, PathSource
from mlxd.engine import LoadedModel
from mlxd.errors import InsufficientMemory
from mlxd.gate import Action, MemoryGate, PressureMonitor, RequestNeed, respond
from mlxd.memory.budget import MemoryBudget
from mlxd.memory.pressure import PressureLevel, PressureReading
from mlxd.memory.snapshot import MemorySnapshot, MlxMemory
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

Client = Callable[..., httpx.AsyncClient]
USER = [{"role": "user", "content": "Hi"}]
RED = PressureReading(PressureLevel.RED, 10, 0.95, 3 << 30, ("swap grew by 3.00 GiB",))
GREEN = PressureReading(PressureLevel.GREEN, 1, 0.1, 0, ())


def app_state(client: httpx.AsyncClient):  # type: ignore[no-untyped-def]
    return client._transport.app.state.mlxd  # type: ignore[attr-defined]


async def test_red_pressure_ends_running_request_with_length(make_client: Client) -> None:
    engine = FakeEngine(responder=lambda req: ["word "] * 200)
    client = make_client(engine)
    state = app_state(client)
    assert state.monitor is not None
    # One word in, the machine runs short of memory: admission stops and the prefix cache
    # goes; two words later it is still red, so the (newest) running request is ended.
    engine.on_piece = lambda i: state.monitor.step(RED) if i in (1, 3) else None
    for stream in (True, False):
        r = await client.post(
            "/v1/chat/completions", json={"model": "alpha", "messages": USER, "stream": stream}
        )
        if stream:
            payloads = [json.loads(line[6:]) for line in r.text.splitlines()
                        if line.startswith("data: {")]  # fmt: skip
            last = payloads[-1]["choices"][0]
            text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads)
        else:
            last = r.json()["choices"][0]
            text = last["message"]["content"]
        assert last["finish_reason"] == "length"
        assert last["finish_detail"] == "memory pressure: swap grew by 3.00 GiB"
        assert text.split() == ["word"] * 3  # ended early, not run to the end
        state.monitor.step(GREEN)


async def test_red_pressure_pauses_admission_until_green(make_client: Client) -> None:
    client = make_client(FakeEngine())
    state = app_state(client)
    assert state.monitor is not None
    state.monitor.step(RED)
    health = (await client.get("/health")).json()
    assert health["memory"]["admission_paused"] is True
    pending = asyncio.create_task(
        client.post("/v1/chat/completions", json={"model": "alpha", "messages": USER})
    )
    await asyncio.sleep(0.3)
    assert not pending.done()  # waiting while red
    state.monitor.step(GREEN)
    r = await asyncio.wait_for(pending, 10)
    assert r.status_code == 200
    assert (await client.get("/health")).json()["memory"]["admission_paused"] is False


async def test_health_reports_memory(make_client: Client) -> None:
    client = make_client(FakeEngine())
    memory = (await client.get("/health")).json()["memory"]
    for key in ("budget", "in_use", "pressure", "swap_growth", "available"):
        assert key in memory
    assert memory["pressure"] in ("green", "yellow", "red")
    batch = (await client.get("/health")).json()["batch"]
    assert batch["size"] == 0 and batch["reserved"] == 0 and batch["sequences"] == []


async def test_models_show_estimated_memory(make_client: Client) -> None:
    client = make_client(FakeEngine())
    data = (await client.get("/v1/models")).json()["data"]
    alpha = next(m for m in data if m["id"] == "alpha")
    assert alpha["weights_bytes"] > 0
    assert alpha["estimated_memory_bytes"] > alpha["weights_bytes"]


async def test_auto_routes_to_a_tagged_model(make_client: Client) -> None:
    client = make_client(FakeEngine())
    r = await client.post("/v1/chat/completions", json={"model": "auto:small", "messages": USER})
    assert r.status_code == 200
    assert r.json()["model"] in ("alpha", "beta") and r.headers["x-mlxd-model"] == r.json()["model"]
    r = await client.post("/v1/chat/completions", json={"model": "auto:huge", "messages": USER})
    assert r.status_code == 404


def _snapshot(available: int, mlx_active: int = 0) -> MemorySnapshot:
    return MemorySnapshot(
        platform="linux", source="test", total=16 << 30, available=available,
        physical_total=16 << 30, swap_total=0, swap_used=0,
        mlx=MlxMemory(active=mlx_active, cache=0),
    )  # fmt: skip


def _entry(name: str) -> ModelEntry:
    return ModelEntry(id=name, source=PathSource(path="/x"))


def test_gate_evicts_prefix_cache_when_memory_is_short() -> None:
    """A request that does not fit beside the cached KV of earlier chats frees that cache."""
    budget = MemoryBudget(limit=10 << 30, total=16 << 30, reserve=0.22, basis="test")
    evicted: list[int] = []
    prefix = {"bytes": 3 << 30}
    gate = MemoryGate(
        budget,
        snapshot=lambda: _snapshot(available=12 << 30, mlx_active=(6 << 30) + prefix["bytes"]),
        prefix_cache_bytes=lambda: prefix["bytes"],
        evict_prefix_cache=lambda: evicted.append(1),
    )
    entry = _entry("m")
    weights = gate.loaded(entry, LoadedModel(Path("/x"), {}, 0.0, 0, 6 << 30))
    resident = Resident("m", weights)
    need = RequestNeed(Need("m", weights=6 << 30, request=2 << 30, prompt_tokens=10,
                            max_tokens=10), entry)  # fmt: skip
    waiting = gate.decide(entry, need, resident)
    assert waiting.kind is DecisionKind.WAIT
    assert evicted == []  # deciding changes nothing; the manager carries the wait out
    gate.make_room(waiting)
    assert evicted == [1]
    prefix["bytes"] = 0  # the engine dropped it
    joined = gate.decide(entry, need, resident)
    assert joined.kind is DecisionKind.JOIN and joined.need == 2 << 30


def test_gate_refuses_what_never_fits_before_queueing() -> None:
    budget = MemoryBudget(limit=1 << 30, total=16 << 30, reserve=0.22, basis="test")
    gate = MemoryGate(budget, snapshot=lambda: _snapshot(available=12 << 30))
    entry = _entry("big")
    need = RequestNeed(
        Need("big", weights=2 << 30, request=1 << 20, prompt_tokens=10, max_tokens=10), entry
    )
    with pytest.raises(InsufficientMemory) as info:
        gate.precheck(need)
    assert "2.00 GiB of weights" in info.value.message
    assert "memory budget of 1.00 GiB" in info.value.message


# --------------------------------------------------------------------------- the one policy


@pytest.mark.parametrize(
    ("level", "paused", "streak", "action"),
    [
        pytest.param(PressureLevel.GREEN, False, 0, Action.NONE, id="green"),
        pytest.param(PressureLevel.GREEN, True, 0, Action.RESUME, id="green-again-resumes"),
        pytest.param(PressureLevel.YELLOW, False, 0, Action.PAUSE, id="yellow-stops-admitting"),
        pytest.param(PressureLevel.YELLOW, True, 0, Action.PAUSE, id="yellow-stays-paused"),
        pytest.param(PressureLevel.RED, False, 1, Action.EVICT, id="red-first-evicts"),
        pytest.param(PressureLevel.RED, True, 2, Action.END_NEWEST, id="still-red-ends-newest"),
        pytest.param(PressureLevel.RED, True, 5, Action.END_NEWEST, id="one-more-per-reading"),
    ],
)
def test_pressure_policy(level: PressureLevel, paused: bool, streak: int, action: Action) -> None:
    assert respond(level, paused, streak) is action


@pytest.mark.parametrize(
    ("name", "available", "mlx_active", "others_take", "actions"),
    [
        # Admitted work uses all it counted (weights 6 + reserved 3.5 of a 10 GiB budget):
        # the machine is full of mlxd's own, counted memory, and nothing is done about it.
        pytest.param("counted", 12 << 30, (19 << 29), 0, ["none", "none", "none"],
                     id="own-counted-memory-is-never-pressure"),
        # Another program takes 9 GiB, 0.5 more than the running request left: stop
        # admitting and evict the prefix cache first, end the newest only if still red.
        pytest.param("others", 12 << 30, 6 << 30, 9 << 30, ["evict", "end_newest", "end_newest"],
                     id="outside-pressure-in-order"),
    ],
)  # fmt: skip
def test_monitor_acts_only_on_what_admission_cannot_see(
    name: str, available: int, mlx_active: int, others_take: int, actions: list[str]
) -> None:
    budget = MemoryBudget(limit=10 << 30, total=16 << 30, reserve=0.22, basis="test")
    evicted: list[int] = []
    gate = MemoryGate(
        budget,
        snapshot=lambda: _snapshot(available - others_take - (mlx_active - (6 << 30)), mlx_active),
        evict_prefix_cache=lambda: evicted.append(1),
    )
    entry = _entry("m")
    weights = gate.loaded(entry, LoadedModel(Path("/x"), {}, 0.0, 0, 6 << 30))
    need = RequestNeed(Need("m", weights=6 << 30, request=7 << 29, prompt_tokens=10,
                            max_tokens=10), entry)  # fmt: skip
    gate._snapshot = lambda: _snapshot(available, 6 << 30)  # admitted on a quiet machine
    decision = gate.decide(entry, need, Resident("m", weights))
    assert decision.kind is DecisionKind.JOIN
    running = Resident("m", weights, active=1, reserved=decision.need)  # the manager's record
    gate._snapshot = lambda: _snapshot(  # then it runs (and maybe others take memory)
        available - others_take - (mlx_active - (6 << 30)), mlx_active
    )
    ended: list[PressureReading] = []
    monitor = PressureMonitor(gate, lambda: running, ended.append, lambda: None)
    got = [monitor.step(gate.poll(running)).value for _ in actions]
    assert got == actions
    assert len(ended) == actions.count("end_newest")
    assert len(evicted) == actions.count("evict")
