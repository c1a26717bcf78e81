from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mlxd.config import (
    REPO_ROOT,
    ConfigError,
    GGUFSource,
    HubSource,
    PathSource,
    PyPISource,
    load_models,
    parse_duration,
    parse_models,
)
from mlxd.settings import Settings


def test_repo_models_yaml_is_valid() -> None:
    models = load_models(REPO_ROOT / "models.yaml")
    assert models.default == "smollm2"
    ids = [m.id for m in models.models]
    assert "smollm2" in ids and len(ids) >= 4
    kinds = {type(m.source) for m in models.models}
    assert {PyPISource, HubSource} <= kinds


def entry(**extra: Any) -> dict[str, Any]:
    return {"id": "m", "source": {"path": "/x"}, **extra}


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"models": [entry(temprature=1)]}, "models[0] (id 'm').temprature"),
        ({"models": [entry(defaults={"temperature": 9})]}, "defaults.temperature"),
        ({"models": [entry(kv_bits=3)]}, "kv_bits"),
        ({"models": [{"id": "m", "source": {"pypi": "pkg"}}]}, "pypi"),
        ({"models": [{"id": "m", "source": {"ftp": "x"}}]}, "source"),
        ({"models": [entry(), entry()]}, "already used"),
        ({"models": [entry(aliases=["auto"])]}, "'auto'"),
        ({"default": "zzz", "models": [entry()]}, "default 'zzz'"),
        ({"models": []}, "models"),
        ({"models": [entry(keep_alive="soon")]}, "keep_alive"),
        ([1, 2], "mapping"),
    ],
    ids=["misspelt-key", "bad-default", "kv-bits", "unpinned-pypi", "unknown-source",
         "duplicate-id", "reserved-auto", "unknown-default", "empty", "bad-duration", "not-a-map"],
)  # fmt: skip
def test_bad_entries_name_the_key(data: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_models(data, "models.yaml")
    assert needle in str(info.value)


def test_source_forms() -> None:
    models = parse_models(
        {"models": [
            {"id": "a", "source": {"path": "dir"}},
            {"id": "b", "source": {"hf": "org/repo"}},
            {"id": "c", "source": {"gguf": "f.gguf"}},
            {"id": "d", "source": {"pypi": "p==1", "file": "f.gguf"}},
        ]},
        "t",
    )  # fmt: skip
    assert [type(m.source) for m in models.models] == [
        PathSource, HubSource, GGUFSource, PyPISource
    ]  # fmt: skip


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "m.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_models(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_models(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(300, 300.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("-1", None), (0, 0.0),
     ("250ms", 0.25), (None, None)],
)  # fmt: skip
def test_parse_duration(value: Any, seconds: float | None) -> None:
    assert parse_duration(value) == seconds


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLXD_PORT", "9000")
    monkeypatch.setenv("MLXD_MEMORY_BUDGET", "6GB")
    monkeypatch.setenv("MLXD_HOME", str(tmp_path))
    s = Settings.from_env(port=None, host="0.0.0.0")
    assert (s.port, s.host, s.memory_budget, s.home) == (9000, "0.0.0.0", "6GB", tmp_path)
    assert Settings.from_env(port=1234).port == 1234
    monkeypatch.setenv("MLXD_PORT", "eighty")
    with pytest.raises(ConfigError, match="MLXD_PORT"):
        Settings.from_env()
