"""The service files in deploy/ and the script that installs them.

The script runs for real against a temporary home directory, with recording fakes of
``launchctl`` and ``systemctl`` first on PATH.
"""

from __future__ import annotations

import argparse
import configparser
import os
import plistlib
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mlxd.__main__ import parser as cli_parser

REPO = Path(__file__).resolve().parents[2]
PLIST = REPO / "deploy/macos/dev.mlxd.server.plist"
UNIT = REPO / "deploy/linux/mlxd.service"
INSTALL = REPO / "deploy/install.sh"
LABEL = "dev.mlxd.server"


def read_unit(text: str) -> configparser.ConfigParser:
    """A systemd unit as INI: case-sensitive keys, ``%`` specifiers left alone."""
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(text)
    return unit


def serve_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` (without the executable) parsed by the real ``mlxd`` command line."""
    return cli_parser().parse_args(argv)


def assert_serves_loopback(argv: list[str]) -> None:
    args = serve_args(argv)
    assert args.command == "serve"
    assert args.host == "127.0.0.1"
    assert args.port == 8080


def test_launch_agent_template() -> None:
    agent = plistlib.loads(PLIST.read_bytes())
    assert agent["Label"] == LABEL
    assert agent["ProgramArguments"][0] == "__MLXD_BIN__"
    assert_serves_loopback(agent["ProgramArguments"][1:])
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["StandardOutPath"] == "__HOME__/Library/Logs/mlxd/mlxd.log"
    assert agent["StandardErrorPath"] == agent["StandardOutPath"]


def test_systemd_unit_template() -> None:
    text = UNIT.read_text()
    unit = read_unit(text)
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0] == "%h/mlxd/.venv/bin/mlxd"
    assert_serves_loopback(argv[1:])
    assert unit["Service"]["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "default.target"
    assert "\n#Environment=MLXD_MEMORY_BUDGET=" in text


# --------------------------------------------------------------------------------------------
# install.sh

FAKE = '#!/bin/sh\necho "$(basename "$0") $*" >> "$FAKE_CALLS"\n'


@dataclass(frozen=True)
class Sandbox:
    home: Path
    mlxd: Path  # an executable standing in for the installed mlxd
    calls: Path  # what the fake launchctl/systemctl were asked to do
    env: dict[str, str]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(INSTALL), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def called(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def files(self) -> set[Path]:
        return {p for p in self.home.rglob("*") if p.is_file()}


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    home = tmp_path / "home"
    fakes = tmp_path / "fakebin"
    for tool in ("launchctl", "systemctl"):
        _executable(fakes / tool, FAKE)
    calls = tmp_path / "calls.log"
    env = {"HOME": str(home), "PATH": f"{fakes}:/usr/bin:/bin", "FAKE_CALLS": str(calls)}
    mlxd = _executable(home / "venv/bin/mlxd", "#!/bin/sh\n")
    return Sandbox(home, mlxd, calls, env)


def installed(sandbox: Sandbox, os_name: str) -> Path:
    if os_name == "macos":
        return sandbox.home / f"Library/LaunchAgents/{LABEL}.plist"
    return sandbox.home / ".config/systemd/user/mlxd.service"


def program(sandbox: Sandbox, os_name: str) -> list[str]:
    """The installed service's command line."""
    path = installed(sandbox, os_name)
    if os_name == "macos":
        agent: dict[str, Any] = plistlib.loads(path.read_bytes())
        assert "__" not in str(agent)
        assert agent["StandardOutPath"] == f"{sandbox.home}/Library/Logs/mlxd/mlxd.log"
        assert agent["WorkingDirectory"] == str(sandbox.home)
        return list(agent["ProgramArguments"])
    return shlex.split(read_unit(path.read_text())["Service"]["ExecStart"])


def expected_calls(sandbox: Sandbox, os_name: str) -> list[str]:
    if os_name == "macos":
        domain = f"gui/{os.getuid()}"
        return [
            f"launchctl bootout {domain}/{LABEL}",
            f"launchctl bootstrap {domain} {installed(sandbox, os_name)}",
        ]
    return [
        "systemctl --user daemon-reload",
        "systemctl --user enable mlxd.service",
        "systemctl --user restart mlxd.service",
    ]


OSES = ["macos", "linux"]


@pytest.mark.parametrize("os_name", OSES)
def test_install(sandbox: Sandbox, os_name: str) -> None:
    done = sandbox.run("--os", os_name, "--bin", str(sandbox.mlxd))
    assert done.returncode == 0, done.stderr
    argv = program(sandbox, os_name)
    # systemd gets the home directory as %h; launchd needs the absolute path.
    assert argv[0] == ("%h/venv/bin/mlxd" if os_name == "linux" else str(sandbox.mlxd))
    assert_serves_loopback(argv[1:])
    assert sandbox.called() == expected_calls(sandbox, os_name)
    if os_name == "macos":
        assert (sandbox.home / "Library/Logs/mlxd").is_dir()


@pytest.mark.parametrize(
    ("os_name", "first_arg"),
    [
        ("macos", "{bin}"),
        # systemd: % doubled, and quoted because of the spaces (shlex reads its quotes alike)
        ("linux", "%h/my tools & 100%%/mlxd"),
    ],
    ids=OSES,
)
def test_install_escapes_the_path(sandbox: Sandbox, os_name: str, first_arg: str) -> None:
    odd = _executable(sandbox.home / "my tools & 100%/mlxd", "#!/bin/sh\n")
    done = sandbox.run("--os", os_name, "--bin", str(odd))
    assert done.returncode == 0, done.stderr
    assert program(sandbox, os_name)[0] == first_arg.format(bin=odd)


@pytest.mark.parametrize("os_name", OSES)
def test_dry_run_changes_nothing(sandbox: Sandbox, os_name: str) -> None:
    before = sandbox.files()
    done = sandbox.run("--os", os_name, "--bin", str(sandbox.mlxd), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert sandbox.files() == before
    assert sandbox.called() == []
    assert f"+ write {installed(sandbox, os_name)}:" in done.stdout
    assert "127.0.0.1" in done.stdout
    assert "__MLXD_BIN__" not in done.stdout
    for call in expected_calls(sandbox, os_name):
        assert f"+ {call}" in done.stdout


@pytest.mark.parametrize("os_name", OSES)
def test_uninstall(sandbox: Sandbox, os_name: str) -> None:
    assert sandbox.run("--os", os_name, "--bin", str(sandbox.mlxd)).returncode == 0
    sandbox.calls.unlink()
    done = sandbox.run("--os", os_name, "--uninstall")
    assert done.returncode == 0, done.stderr
    assert not installed(sandbox, os_name).exists()
    stop = (
        f"launchctl bootout gui/{os.getuid()}/{LABEL}"
        if os_name == "macos"
        else "systemctl --user disable --now mlxd.service"
    )
    assert sandbox.called()[0] == stop


@pytest.mark.parametrize("os_name", OSES)
def test_install_refuses_a_missing_executable(sandbox: Sandbox, os_name: str) -> None:
    before = sandbox.files()
    done = sandbox.run("--os", os_name, "--bin", str(sandbox.home / "nope/mlxd"))
    assert done.returncode == 1
    assert "is not an executable file" in done.stderr
    assert sandbox.files() == before
    assert sandbox.called() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--frobnicate"], "unknown option --frobnicate"), (["--os", "windows"], "must be macos")],
    ids=["unknown-option", "unknown-os"],
)
def test_install_refuses_bad_arguments(sandbox: Sandbox, args: list[str], message: str) -> None:
    done = sandbox.run(*args)
    assert done.returncode != 0
    assert message in done.stderr
    assert sandbox.called() == []


def test_install_defaults_to_the_repository_venv(sandbox: Sandbox) -> None:
    venv_mlxd = REPO / ".venv/bin/mlxd"
    if not venv_mlxd.is_file():
        pytest.skip("no .venv/bin/mlxd in this checkout (make install creates it)")
    done = sandbox.run("--os", "macos")
    assert done.returncode == 0, done.stderr
    assert program(sandbox, "macos")[0] == str(venv_mlxd.resolve())


def test_units_wait_longer_than_the_drain_timeout() -> None:
    """SIGTERM drains for --drain-timeout (default 30 s); the service managers must not SIGKILL
    before that is over."""
    from mlxd.settings import Settings

    drain = Settings().drain_timeout
    unit = read_unit(UNIT.read_text())
    assert int(unit["Service"]["TimeoutStopSec"]) > drain
    agent = plistlib.loads(PLIST.read_bytes())
    assert agent["ExitTimeOut"] > drain
