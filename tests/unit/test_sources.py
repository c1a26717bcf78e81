from __future__ import annotations

from pathlib import Path

import pytest

from mlxd.config import ModelEntry, parse_models
from mlxd.errors import ModelLoadFailed
from mlxd.sources import ModelSources


def entries(tmp_path: Path) -> dict[str, ModelEntry]:
    models = parse_models(
        {"models": [
            {"id": "local", "source": {"path": "rel/dir"}},
            {"id": "hub", "source": {"hf": "mlx-community/does-not-exist-4bit"}},
            {"id": "gguf", "source": {"gguf": str(tmp_path / "absent.gguf")}},
        ]},
        "t",
    )  # fmt: skip
    return {m.id: m for m in models.models}


def test_relative_paths_resolve_against_the_config(tmp_path: Path) -> None:
    sources = ModelSources(tmp_path / "home", tmp_path)
    e = entries(tmp_path)["local"]
    assert sources.model_dir(e) == (tmp_path / "rel" / "dir").resolve()
    assert not sources.is_present(e)
    with pytest.raises(ModelLoadFailed, match="not an MLX model directory"):
        sources.prepare(e)
    (tmp_path / "rel" / "dir").mkdir(parents=True)
    (tmp_path / "rel" / "dir" / "config.json").write_text("{}")
    assert sources.is_present(e)


def test_hub_model_offline_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    sources = ModelSources(tmp_path / "home", tmp_path)
    e = entries(tmp_path)["hub"]
    assert not sources.is_present(e)
    with pytest.raises(ModelLoadFailed) as info:
        sources.prepare(e, progress=False)
    message = info.value.message
    assert "mlx-community/does-not-exist-4bit" in message and "offline" in message


def test_missing_gguf_is_a_clear_error(tmp_path: Path) -> None:
    sources = ModelSources(tmp_path / "home", tmp_path)
    with pytest.raises(ModelLoadFailed, match="does not exist"):
        sources.prepare(entries(tmp_path)["gguf"], progress=False)
