"""Two real models behind one server: swapping, memory returning to baseline, refusals.

The default SmolLM2 and a tiny random-weight Qwen3 are configured side by side; a third entry
points at a corrupt copy. All through real HTTP with the OpenAI SDK.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from mlxd.estimate.files import weights_bytes
from mlxd.memory.sizes import format_size
from tests.conftest import RunningServer, run_server
from tools.random_model import build_random_qwen3

pytestmark = pytest.mark.e2e

Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_dirs(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("swap-models")
    qwen = build_random_qwen3(base / "qwen-tiny", "tiny", cache_dir=base / "token-cache")
    corrupt = base / "corrupt"
    shutil.copytree(qwen, corrupt)
    for weights in corrupt.glob("*.safetensors"):
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 3])  # truncated mid-tensor
    return {"smollm2": smollm2_dir, "qwen-tiny": qwen, "corrupt": corrupt}


def write_config(path: Path, dirs: dict[str, Path]) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "default": "qwen-tiny",
                "models": [
                    {"id": name, "source": {"path": str(d)}, "tags": ["test"]}
                    for name, d in dirs.items()
                ],
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def server(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("swap-server")
    config = write_config(tmp / "models.yaml", model_dirs)
    with run_server(["--config", str(config)], tmp / "mlxd.log") as running:
        yield running


def chat(url: str, model: str, **kw: Any) -> Any:
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=300)
    return client.chat.completions.create(
        model=model, messages=Q, temperature=0, max_tokens=kw.pop("max_tokens", 8), **kw
    )


def health(server: RunningServer) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{server.root}/health", timeout=10).json()
    return body


def test_alternating_concurrent_clients_get_their_model(server: RunningServer) -> None:
    asked = ["smollm2", "qwen-tiny"] * 4
    with ThreadPoolExecutor(max_workers=len(asked)) as pool:
        replies = list(pool.map(lambda m: chat(server.url, m), asked))
    assert [r.model for r in replies] == asked  # every client answered by the model it asked
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    # Grouped by model: far fewer swaps than requests.
    assert health(server)["swaps"] <= 4


def test_memory_returns_to_baseline_after_unload(server: RunningServer) -> None:
    chat(server.url, "qwen-tiny", extra_body={"keep_alive": 0})
    baseline = _wait_unloaded(server)["memory"]["active"]
    chat(server.url, "smollm2")
    loaded = health(server)["memory"]["active"]
    assert loaded - baseline > 400 << 20  # SmolLM2's float32 weights are ~540 MB
    chat(server.url, "smollm2", extra_body={"keep_alive": 0})
    after = _wait_unloaded(server)["memory"]["active"]
    assert after - baseline < 16 << 20, (baseline, loaded, after)


def _wait_unloaded(server: RunningServer) -> dict[str, Any]:
    for _ in range(200):
        body = health(server)
        models = httpx.get(f"{server.root}/v1/models", timeout=10).json()["data"]
        # /health no longer waits on the MLX thread: wait for the unload itself to finish.
        if body["resident_model"] is None and all(m["status"] != "unloading" for m in models):
            return health(server)
        time.sleep(0.05)
    raise AssertionError(f"model still resident: {body}")


def test_corrupt_model_fails_without_taking_the_server_down(server: RunningServer) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        chat(server.url, "corrupt")
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "model_load_failed"
    models = {m["id"]: m for m in httpx.get(f"{server.url}/models").json()["data"]}
    assert models["corrupt"]["status"] == "failed" and models["corrupt"]["error"]
    assert chat(server.url, "qwen-tiny").model == "qwen-tiny"


def test_budget_below_need_refuses_that_model_only(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    config = write_config(tmp_path / "models.yaml", model_dirs)
    # SmolLM2 needs ~0.6 GB at float32; the tiny Qwen needs a few MB.
    args = ["--config", str(config), "--memory-budget", "300MB"]
    with run_server(args, tmp_path / "mlxd.log") as srv:
        with pytest.raises(openai.BadRequestError) as info:
            chat(srv.url, "smollm2")
        err = info.value.body
        assert isinstance(err, dict) and err["code"] == "insufficient_memory"
        assert "memory budget of 300.00 MiB" in err["message"]
        weights = format_size(weights_bytes(model_dirs["smollm2"]))  # from the headers, exact
        assert f"{weights} of weights" in err["message"]
        assert chat(srv.url, "qwen-tiny").model == "qwen-tiny"
        assert health(srv)["memory"]["budget"] == 300 << 20
