"""Settings: one declaration per setting drives the environment, the flags and their help."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from mlxd.__main__ import SERVE_FLAGS, parser
from mlxd.config import ConfigError
from mlxd.settings import Settings, add_flags, from_args


def serve(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    return from_args(parser().parse_args(["serve", *argv]), env or {})


def test_every_setting_is_declared_with_help_and_a_variable() -> None:
    for f in fields(Settings):
        option = f.metadata["option"]
        assert option.help, f.name
        assert option.env and all(v.startswith("MLXD_") for v in option.env[:1]), f.name


def test_serve_takes_every_setting_that_has_a_flag() -> None:
    flagged = {f.name for f in fields(Settings) if f.metadata["option"].flag is not None}
    assert flagged == set(SERVE_FLAGS)


def test_defaults_without_flags_or_variables() -> None:
    s = serve([])
    assert (s.host, s.port, s.queue_size, s.max_concurrency) == ("127.0.0.1", 8080, 32, 16)
    assert s.max_body_bytes == 32 << 20 and s.preload is False and s.api_keys == ()


def test_variables_are_read_by_kind_and_flags_win() -> None:
    env = {
        "MLXD_PORT": "9001", "MLXD_PRELOAD": "true", "MLXD_MEMORY_RESERVE": "0.3",
        "MLXD_CORS_ORIGINS": "http://a, http://b", "MLXD_MAX_BODY_SIZE": "2MB",
        "MLXD_HOME": "/tmp/h", "MLXD_LOG_FORMAT": "json",
    }  # fmt: skip
    s = serve([], env)
    assert (s.port, s.preload, s.memory_reserve) == (9001, True, 0.3)
    assert s.cors_origins == ("http://a", "http://b")
    assert s.max_body_bytes == 2 << 20 and s.home == Path("/tmp/h") and s.log_format == "json"
    s = serve(
        ["--port", "9002", "--cors-origins", "http://c", "--cors-origins", "http://d,http://e"], env
    )
    assert s.port == 9002
    assert s.cors_origins == ("http://c", "http://d", "http://e")


def test_port_falls_back_to_the_plain_port_variable() -> None:
    assert serve([], {"PORT": "7000"}).port == 7000
    assert serve([], {"PORT": "7000", "MLXD_PORT": "7001"}).port == 7001


@pytest.mark.parametrize(
    ("env", "named"),
    [({"MLXD_PORT": "eighty"}, "MLXD_PORT"),
     ({"MLXD_MAX_BODY_SIZE": "lots"}, "MLXD_MAX_BODY_SIZE"),
     ({"MLXD_LOG_LEVEL": "loud"}, "MLXD_LOG_LEVEL"),
     ({"MLXD_MAX_CONCURRENCY": "0"}, "concurrency")],
)  # fmt: skip
def test_a_bad_variable_is_refused_naming_it(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        serve([], env)


def test_a_bad_flag_is_a_usage_error_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--max-body-size", "huge"])
    assert "--max-body-size" in capsys.readouterr().err


def test_help_shows_default_and_variable() -> None:
    p = argparse.ArgumentParser()
    add_flags(p, "queue_size", "preload")
    text = p.format_help()
    assert "default 32; MLXD_QUEUE_SIZE" in text and "MLXD_PRELOAD" in text


def test_the_readme_lists_every_variable_and_flag() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for f in fields(Settings):
        option = f.metadata["option"]
        for name in [*option.env, *([option.flag] if option.flag else [])]:
            assert f"`{name}`" in readme, name
