from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mlxd.__main__ import banner, doctor_report, main
from mlxd.config import REPO_ROOT
from mlxd.settings import Settings
from tests.fakes import tiny_model_dir


def test_models_json(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("MLXD_HOME", str(tmp_path))
    assert main(["models", "--config", str(REPO_ROOT / "models.yaml"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["id"] == "smollm2" and rows[0]["default"] is True
    assert {r["present"] for r in rows} == {False}  # nothing in an empty home
    assert {r["availability"] for r in rows} == {"download"}


@pytest.fixture
def mixed_config(tmp_path: Path) -> Path:
    """One model on disk, one on the hub (not cached), one local path that does not exist."""
    tiny = tiny_model_dir(tmp_path / "tiny")
    config = tmp_path / "models.yaml"
    config.write_text(
        "default: tiny\n"
        "models:\n"
        f"  - {{id: tiny, source: {{path: {tiny}}}}}\n"
        "  - {id: big-hub, source: {hf: example/not-downloaded-4bit}}\n"
        "  - {id: gone, source: {path: ./nowhere}}\n"
    )
    return config


def _models_table(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, str]:
    assert main(["models", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATUS", "NEEDS"]
    return {line.split()[0]: line for line in lines[1:4]}


def test_models_says_present_would_download_and_missing(
    capsys: pytest.CaptureFixture[str], mixed_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLXD_HOME", str(mixed_config.parent / "home"))
    table = _models_table(capsys, "--config", str(mixed_config), "--memory-budget", "4GB")
    assert re.match(r"tiny \*\s+present\s+[\d.]+ (KiB|MiB)\s", table["tiny"])  # binary units
    assert "would download" in table["big-hub"]
    assert "missing" in table["gone"]
    main(["models", "--config", str(mixed_config), "--memory-budget", "4GB"])
    out = capsys.readouterr().out
    assert "memory budget 4.00 GiB" in out
    assert "big-hub: not downloaded; would download example/not-downloaded-4bit from " \
           "Hugging Face on first use" in out  # fmt: skip
    assert "mlxd pull ID" in out


def test_models_says_when_a_present_model_exceeds_the_budget(
    capsys: pytest.CaptureFixture[str], mixed_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLXD_HOME", str(mixed_config.parent / "home"))
    table = _models_table(capsys, "--config", str(mixed_config), "--memory-budget", "64KB")
    assert "exceeds budget" in table["tiny"]
    main(["models", "--config", str(mixed_config), "--memory-budget", "64KB", "--json"])
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny"]["availability"] == "too_big" and rows["tiny"]["present"] is True
    assert "over the memory budget of 64.00 KiB" in rows["tiny"]["detail"]
    assert rows["tiny"]["estimated_memory_bytes"] > 64 * 1024


def test_doctor_reports_versions_and_api(tmp_path: Path) -> None:
    report = doctor_report(Settings(home=tmp_path, config_path=REPO_ROOT / "models.yaml"))
    assert report["mlx_lm_api"] == "ok"
    assert report["mlx"].startswith("0.32")
    assert "cpu" in report["backend"] or "metal" in report["backend"] or "cuda" in report["backend"]
    assert set(report["models"]) >= {"smollm2"}


def test_serve_with_unknown_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", "--config", str(REPO_ROOT / "models.yaml"), "--model", "nope"])
    assert code == 2
    assert "--model 'nope' is not a configured model" in capsys.readouterr().err


def test_bad_config_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  - id: x\n    source: {path: /x}\n    temprature: 1\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "temprature" in capsys.readouterr().err


def test_banner_names_model_backend_budget_and_url(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, port=8123, memory_budget="6GB")
    text = banner(settings, "smollm2", tmp_path, "using prior until measured after the load")
    assert "smollm2" in text and "http://127.0.0.1:8123/v1" in text
    assert "status       http://127.0.0.1:8123/  (metrics: /metrics)" in text
    assert "calibration  using prior until measured after the load" in text
    assert "budget 6.00 GiB  (--memory-budget 6.00 GiB)" in text  # GB is read as GiB
    backend_line = next(line for line in text.splitlines() if "backend" in line)
    assert "mlx 0.32" in backend_line
