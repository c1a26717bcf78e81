from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from mlxd.app import create_app
from mlxd.config import parse_models
from mlxd.settings import Settings
from tests.fakes import FakeEngine, tiny_model_dir

TINY_CONTEXT = 2048
AppFactory = Callable[..., tuple[httpx.AsyncClient, FakeEngine]]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny-models")
    # 2048 tokens: room for the tool definitions mlxd writes into the system prompt (the tiny
    # tokenizer has no merges, one token per byte).
    return {name: tiny_model_dir(base / name, context=TINY_CONTEXT) for name in ("alpha", "beta")}


@pytest.fixture
async def make_client(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def factory(
        engine: FakeEngine, settings: dict[str, object] | None = None, **entry_extra: object
    ) -> httpx.AsyncClient:
        models = parse_models(
            {
                "default": "alpha",
                "models": [
                    {"id": "alpha", "aliases": ["a"], "source": {"path": str(tiny_dirs["alpha"])},
                     "tags": ["small"], **entry_extra},
                    {"id": "beta", "source": {"path": str(tiny_dirs["beta"])}, "tags": ["small"]},
                ],
            },
            "test",
        )  # fmt: skip
        config = Settings(
            home=tmp_path / "home",
            config_path=tmp_path / "models.yaml",
            **(settings or {}),  # type: ignore[arg-type]
        )
        app = create_app(config, engine_factory=lambda _: engine, models=models)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080"
        )
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aclose()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
