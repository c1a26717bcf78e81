"""Working memory measured on this backend: the estimate covers the real peak, admission under
a budget lets in only what fits, and a second start reuses the stored calibration.

A tiny random-weight Qwen3 is measured in-process against MLX's own peak; SmolLM2 is served
through real HTTP under a budget with growing prompts (its prefill chunk set to 256 tokens,
so that calibrating on this small CPU takes seconds rather than minutes).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mlxd.bench.measure import measure_loaded
from mlxd.bench.runner import PromptBook
from mlxd.calibrate import CalibrationStore, Calibrator, measure
from mlxd.estimate.request import ModelProfile, estimate_request
from mlxd.layersync import sync_prefill_layers
from mlxd.memory.sizes import format_size
from tests.conftest import RunningServer, run_server
from tools.random_model import build_random_qwen3

pytestmark = pytest.mark.e2e

CHUNK = 256
CONTEXT = 2048


def test_calibrated_estimate_covers_the_measured_peak(tmp_path: Path) -> None:
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model_dir = build_random_qwen3(tmp_path / "qwen", "tiny", cache_dir=tmp_path / "tok")
    profile = ModelProfile.from_dir(model_dir)
    model, _ = load_model(model_dir)
    sync_prefill_layers(model)  # as the engine runs it

    async def run(fn: Any) -> Any:
        return fn(model)

    calibrator = Calibrator(
        CalibrationStore(tmp_path / "cal"), "cpu", mx.__version__,
        measure=functools.partial(measure, run),
    )  # fmt: skip
    key = calibrator.key(model_dir, profile, None, None, 2048)
    found = asyncio.run(calibrator.ensure("tiny", key, profile, 8192, lambda: 1 << 30))
    assert found is not None and found.working.source == "measured"
    for prompt in (16, 700, 2100, 4500):
        estimate = estimate_request(
            profile, prompt, 8, backend="cpu", sampling=False, working=found.working
        ).total
        measured = measure_loaded(model, profile.architecture.vocab_size, prompt, 8)
        assert measured <= estimate <= measured * 1.10, (prompt, estimate, measured)


def config(path: Path, model_dir: Path) -> Path:
    entry = {
        "id": "smollm2", "source": {"path": str(model_dir)},
        "prefill_step_size": CHUNK, "context_length": CONTEXT,
    }  # fmt: skip
    path.write_text(yaml.safe_dump({"default": "smollm2", "models": [entry]}))
    return path


def health(server: RunningServer) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{server.root}/health", timeout=30).json()
    return body


def wait_calibrated(server: RunningServer, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = health(server)["memory"]["calibration"].get("smollm2", {})
        if line.get("line", "calibrating") != "calibrating":
            return line
        time.sleep(1)
    raise AssertionError(f"not calibrated after {timeout}s:\n{server.log_text()}")


@pytest.fixture(scope="module")
def setup(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("memory")
    profile = ModelProfile.from_dir(smollm2_dir)

    def need(prompt: int) -> int:
        return estimate_request(
            profile, prompt, 4, CONTEXT, prefill_chunk=CHUNK, backend="cpu", sampling=False
        ).total

    # A budget between what a 600-token and a 1900-token prompt need.
    budget = (need(600) + need(1900)) // 2
    yield {"tmp": tmp, "config": config(tmp / "models.yaml", smollm2_dir), "budget": budget,
           "home": tmp / "home", "dir": smollm2_dir}  # fmt: skip


def test_growing_prompts_under_a_budget_then_reuse(setup: dict[str, Any]) -> None:
    from mlx_lm.utils import load_tokenizer

    book = PromptBook(load_tokenizer(setup["dir"]))
    budget = setup["budget"]
    args = ["--config", str(setup["config"]), "--memory-budget", str(budget), "--preload"]
    env = {"MLXD_HOME": str(setup["home"])}
    with run_server(args, setup["tmp"] / "first.log", env, timeout=300) as server:
        line = wait_calibrated(server)
        assert line["reused"] is False and "calibrated" in line["line"]
        outcomes = []
        for i, prompt in enumerate((60, 600, 1900)):
            body = {"model": "smollm2", "messages": book.sized(f"grow-{i}", prompt),
                    "max_tokens": 4, "temperature": 0}  # fmt: skip
            r = httpx.post(f"{server.url}/chat/completions", json=body, timeout=300)
            if r.status_code == 200:
                choice = r.json()["choices"][0]
                # Admitted: it runs to its end (max_tokens or a natural stop), never cut off.
                assert choice["finish_reason"] in ("length", "stop")
                assert "finish_detail" not in choice
                peak = health(server)["memory"]["peak"]
                assert peak <= budget, f"peak {format_size(peak)} over {format_size(budget)}"
                outcomes.append("admitted")
            else:
                assert r.status_code == 400
                error = r.json()["error"]
                assert error["code"] == "insufficient_memory"
                assert "needs" in error["message"]
                assert f"memory budget of {format_size(budget)}" in error["message"]
                outcomes.append("refused")
        assert outcomes == ["admitted", "admitted", "refused"]
        memory = health(server)["memory"]
        assert memory["swap_growth"] == 0
        errors = memory["calibration"]["smollm2"]["estimate_error"]
        assert errors["requests"] >= 2 and errors["min"] >= 0  # never under the measured peak
    with run_server(args, setup["tmp"] / "second.log", env, timeout=300) as server:
        line = wait_calibrated(server, timeout=60)
        assert line["reused"] is True and line["line"].startswith("reused calibration from")
        assert "reused calibration" in server.log_text()
