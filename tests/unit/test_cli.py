from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.__main__ import banner, doctor_report, main
from server.config import REPO_ROOT, Settings


def test_models_json(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("MLXD_HOME", str(tmp_path))
    assert main(["models", "--config", str(REPO_ROOT / "models.yaml"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["id"] == "smollm2 *"
    assert {r["present"] for r in rows} == {"no"}  # nothing in an empty home


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
    text = banner(settings, "smollm2", tmp_path)
    assert "smollm2" in text and "http://127.0.0.1:8123/v1" in text
    assert "budget 6.00 GiB  (--memory-budget 6.00 GiB)" in text  # GB is read as GiB
    backend_line = next(line for line in text.splitlines() if "backend" in line)
    assert "mlx 0.32" in backend_line
