"""The FastAPI application, built from Settings with no import-time globals.

``create_app(settings, engine_factory=...)`` is the only way to get an app: tests inject a fake
engine the way httpx injects a mock transport, and the CLI injects the MLX engine.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from server import __version__
from server.api import install_error_handlers, router
from server.chat import ChatService
from server.config import ConfigError, ModelsFile, Settings, load_models, parse_duration
from server.engine import Engine, MLXEngine
from server.manager import ModelManager
from server.registry import Registry
from server.router import Router
from server.sources import ModelSources
from server.state import AppState

log = logging.getLogger("mlxd.app")

EngineFactory = Callable[[Settings], Engine]


def default_engine(settings: Settings) -> Engine:
    from server.memory import parse_size

    size = parse_size(settings.prefix_cache_bytes) if settings.prefix_cache_bytes else 1 << 30
    return MLXEngine(prefix_cache_bytes=size)


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
    manager = ModelManager(
        engine,
        registry,
        queue_size=settings.queue_size,
        queue_timeout=settings.queue_timeout,
        default_keep_alive=parse_duration(settings.keep_alive),
    )
    chat = ChatService(registry, manager, engine)
    return AppState(
        settings=settings,
        registry=registry,
        engine=engine,
        manager=manager,
        chat=chat,
        router=Router(registry),
        started=time.time(),
    )


def create_app(
    settings: Settings,
    engine_factory: EngineFactory = default_engine,
    models: ModelsFile | None = None,
) -> FastAPI:
    engine = engine_factory(settings)
    state = build_state(settings, engine, models)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.preload:
            await state.manager.preload(state.registry.default)
        try:
            yield
        finally:
            await state.manager.close()
            engine.close()

    app = FastAPI(title="mlxd", version=__version__, lifespan=lifespan)
    app.state.mlxd = state
    app.include_router(router)
    install_error_handlers(app)
    return app
