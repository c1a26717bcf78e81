"""Fixtures shared by unit and end-to-end tests.

End-to-end tests use the real default model (SmolLM2-135M-Instruct, imported from the PyPI wheel
into ``$MLXD_HOME``; ``make test`` prepares it first, so these fixtures normally find it ready) and
start the real server as a subprocess on a free loopback port.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mlxd.config import REPO_ROOT, load_models
from mlxd.localnet import NotReady, free_port, wait_until_ready
from mlxd.registry import Registry
from mlxd.settings import Settings
from mlxd.sources import ModelSources


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.from_env(config_path=REPO_ROOT / "models.yaml")


@pytest.fixture(scope="session")
def registry(settings: Settings) -> Registry:
    return Registry(load_models(settings.config_path), ModelSources(settings.home, REPO_ROOT))


@pytest.fixture(scope="session")
def smollm2_dir(registry: Registry) -> Path:
    return registry.prepare_sync(registry.get("smollm2"), progress=False)


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir: Path, settings: Settings) -> Path:
    return settings.home / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class RunningServer:
    url: str  # base URL ending in /v1
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def run_server(
    args: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    timeout: float = 180.0,
    preexec_fn: Callable[[], object] | None = None,
) -> Iterator[RunningServer]:
    """Start ``mlxd serve`` with ``args`` and wait until /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlxd", "serve", "--host", "127.0.0.1", "--port", str(port)]
    full_env = {**os.environ, **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO_ROOT,
            preexec_fn=preexec_fn,
        )
    server = RunningServer(f"http://127.0.0.1:{port}/v1", proc, log)

    def failed() -> str | None:
        code = proc.poll()
        return None if code is None else f"mlxd exited with {code}:\n{server.log_text()}"

    try:
        try:
            wait_until_ready(f"{server.root}/health", timeout, failed, interval=0.2)
        except NotReady as exc:
            raise RuntimeError(f"{exc}\n{server.log_text()}") from None
        yield server
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[Any], grace: float = 20.0) -> None:
    """Terminate ``proc``, killing it if it has not exited after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
