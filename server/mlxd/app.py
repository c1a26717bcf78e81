"""The FastAPI application, built from Settings with no import-time globals.

``create_app(settings, engine_factory=...)`` is the only way to get an app: tests inject a fake
engine the way httpx injects a mock transport, and the CLI injects the MLX engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from mlxd import __version__, apis
from mlxd.api import install_error_handlers, router
from mlxd.calibrate import CalibrationStore, Calibrator, measure
from mlxd.chat import ChatService
from mlxd.config import ConfigError, ModelsFile, load_models, parse_duration
from mlxd.engine import Engine, MLXEngine
from mlxd.gate import MemoryGate, PressureMonitor
from mlxd.guard import Guard, check_exposure
from mlxd.limits import InflightLimit, RequestLimits
from mlxd.manager import ModelManager
from mlxd.memory.pressure import PressureReading
from mlxd.metrics import Metrics, MetricsMiddleware
from mlxd.registry import Registry
from mlxd.router import Router
from mlxd.settings import Settings
from mlxd.sources import ModelSources
from mlxd.state import AppState
from mlxd.status import router as status_router

log = logging.getLogger("mlxd.app")

EngineFactory = Callable[[Settings], Engine]


def default_engine(settings: Settings) -> Engine:
    from mlxd.memory.sizes import parse_size

    size = parse_size(settings.prefix_cache_bytes) if settings.prefix_cache_bytes else 1 << 30
    return MLXEngine(prefix_cache_bytes=size)


def build_gate(settings: Settings, engine: Engine) -> MemoryGate:
    from mlxd.memory.budget import compute_budget
    from mlxd.memory.probe import take_snapshot
    from mlxd.memory.sizes import parse_size

    try:
        override = parse_size(settings.memory_budget) if settings.memory_budget else None
    except ValueError as exc:
        raise ConfigError(f"memory budget: {exc}") from None
    snapshot = take_snapshot()
    budget = compute_budget(snapshot, settings.memory_reserve, override)

    def evict() -> None:
        asyncio.get_running_loop().create_task(engine.evict_prefix_cache(0))

    return MemoryGate(
        budget,
        swap_baseline=snapshot.swap_used,
        prefix_cache_bytes=lambda: engine.stats().get("prefix_cache_bytes", 0),
        evict_prefix_cache=evict,
        calibrator=build_calibrator(settings, engine),
    )


def build_calibrator(settings: Settings, engine: Engine) -> Calibrator | None:
    """Working memory measured on this backend (only the MLX engine can measure)."""
    if not isinstance(engine, MLXEngine):
        return None
    from mlxd.backend import backend_info

    info = backend_info()
    backend = info.name if info.name in ("metal", "cuda") else "cpu"
    store = CalibrationStore(settings.home / "calibration")
    run = functools.partial(measure, engine.with_model)
    return Calibrator(store, backend, info.mlx_version, measure=run)


def build_state(settings: Settings, engine: Engine, models: ModelsFile | None = None) -> AppState:
    models = models or load_models(settings.config_path)
    if settings.default_model is not None:
        # `--model` picks the default among configured models (validated like any name).
        known = {name for entry in models.models for name in entry.names}
        if settings.default_model not in known:
            raise ConfigError(
                f"--model {settings.default_model!r} is not a configured model id or alias "
                f"(configured: {', '.join(e.id for e in models.models)})"
            )
        models = models.model_copy(update={"default": settings.default_model})
    registry = Registry(models, ModelSources(settings.home, settings.config_path.parent))
    gate = build_gate(settings, engine)
    manager = ModelManager(
        engine,
        registry,
        queue_size=settings.queue_size,
        queue_timeout=settings.queue_timeout,
        default_keep_alive=parse_duration(settings.keep_alive),
        gate=gate,
        max_concurrency=settings.max_concurrency,
    )
    chat = ChatService(registry, manager, engine, gate)
    return AppState(
        settings=settings,
        registry=registry,
        engine=engine,
        manager=manager,
        chat=chat,
        router=Router(registry, gate),
        gate=gate,
        started=time.time(),
        # What the engine can hold at once: a full batch plus a full queue.
        inflight=InflightLimit(settings.queue_size + settings.max_concurrency),
    )


def create_app(
    settings: Settings,
    engine_factory: EngineFactory = default_engine,
    models: ModelsFile | None = None,
) -> FastAPI:
    check_exposure(settings)
    engine = engine_factory(settings)
    state = build_state(settings, engine, models)

    def on_red(reading: PressureReading) -> None:
        # Still red after the prefix cache was given back: the newest request goes first.
        why = "memory pressure: " + "; ".join(reading.reasons)
        if state.manager.end_newest(why) is None and (
            state.manager.resident is not None and not state.manager.queue_depth
        ):
            # Nothing is running, so only the idle model itself can be given back.
            asyncio.get_running_loop().create_task(state.manager.unload())

    monitor = PressureMonitor(state.gate, state.manager.view, on_red, state.manager.poke)
    state.monitor = monitor

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # MLX's limit is a ceiling above the budget (at the budget it throttles admitted work:
        # see mlxd.memory.budget.mlx_memory_limit); on Metal the wired limit keeps the model
        # resident.
        await engine.set_limits(state.gate.mlx_limit, state.gate.budget.limit)
        monitor.start()
        if settings.preload:
            await state.manager.preload(state.registry.default)
        try:
            yield
        finally:
            await monitor.stop()
            await state.manager.close()
            engine.close()

    app = FastAPI(title="mlxd", version=__version__, lifespan=lifespan)
    app.state.mlxd = state
    metrics = Metrics(state)
    state.chat.observers.append(metrics.observe_request)
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(router)
    app.include_router(status_router)
    apis.install(app)
    install_error_handlers(app)
    # Added last = outermost: who may call is decided before the body is even looked at.
    app.add_middleware(
        RequestLimits,
        max_bytes=settings.max_body_bytes,
        timeout=settings.body_timeout,
        max_header_bytes=settings.max_header_bytes,
    )
    app.add_middleware(Guard, settings=settings)
    return app
