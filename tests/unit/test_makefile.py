"""The first run: what `make run` installs, and what it tells a newcomer.

A fresh clone's `make run` must install only what serving needs. The test reads the pip commands
`make -n run` would execute for a new venv, then resolves the full requirement closure of what
they name — the project's own dependencies and extras from pyproject.toml, then each installed
distribution's declared requirements, markers evaluated — without a network. Development tools
anywhere in that closure fail it; the same resolution of `make test` must find them (so the
check can tell the difference).
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mlxd.config import REPO_ROOT

tomllib = pytest.importorskip("tomllib")

DEV_TOOLS = {"pytest", "ruff", "mypy", "matplotlib"}
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def pip_specs(target: str, venv: Path) -> list[str]:
    """The requirement specs of every ``pip install`` line ``make -n target`` would run."""
    out = subprocess.run(
        ["make", "-n", target, f"VENV={venv}"], cwd=REPO_ROOT, capture_output=True, text=True,
        check=True, timeout=60,
    ).stdout  # fmt: skip
    specs: list[str] = []
    for line in out.splitlines():
        if " pip install " not in line:
            continue
        words = shlex.split(line.split(" pip install ", 1)[1])
        specs += [w for w in words if not w.startswith("-") and w not in ("on", "pip")]
    return specs


def closure(specs: list[str]) -> set[str]:
    """Distribution names pip would end up with for ``specs`` (the project as ``.[extras]``)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    todo: list[Requirement] = []
    for spec in specs:
        match = re.fullmatch(r"\.(?:\[([\w,-]*)\])?", spec)
        assert match, f"make installs something other than the project itself: {spec!r}"
        extras = [e for e in (match.group(1) or "").split(",") if e]
        todo += [Requirement(r) for r in project["dependencies"]]
        for extra in extras:
            todo += [Requirement(r) for r in project["optional-dependencies"][extra]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not in this venv (another platform's wheel): its name is all we know
        for text in requires:
            sub = Requirement(text)
            envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    return seen


def test_make_run_installs_no_development_tools(tmp_path: Path) -> None:
    specs = pip_specs("run", tmp_path / "venv")
    assert specs, "make run installs nothing?"
    installed = closure(specs)
    assert {"fastapi", "uvicorn", "mlx", "mlx-lm", "prometheus-client"} <= installed
    assert installed.isdisjoint(DEV_TOOLS), sorted(installed & DEV_TOOLS)


def test_make_test_and_lint_bring_the_development_tools(tmp_path: Path) -> None:
    for target in ("test", "lint"):
        installed = closure(pip_specs(target, tmp_path / "venv"))
        assert {"pytest", "ruff", "mypy"} <= installed, target


def test_make_run_shows_install_progress(tmp_path: Path) -> None:
    out = subprocess.run(["make", "-n", "run", f"VENV={tmp_path / 'venv'}"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True, timeout=60).stdout  # fmt: skip
    pip_lines = [line for line in out.splitlines() if " pip install " in line]
    assert pip_lines and not any("--quiet" in line or " -q" in line for line in pip_lines)


def test_make_tells_how_to_put_mlxd_on_path(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    out = subprocess.run(["make", "--no-print-directory", "path-hint", f"VENV={venv}"],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin"}).stdout  # fmt: skip
    assert f"mlxd is installed at {venv}/bin/mlxd" in out
    assert "make launcher" in out
    assert f'export PATH="{venv}/bin:$PATH"' in out


def test_make_launcher_links_into_the_user_bin(tmp_path: Path) -> None:
    """`make launcher` with the install already done (its stamp present) only links."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "mlxd").write_text("#!/bin/sh\necho launched\n")
    (venv / "bin" / "mlxd").chmod(0o755)
    (venv / "bin" / "python").symlink_to(shutil.which("python3") or "/usr/bin/python3")
    for stamp in (".mlxd-installed-cpu", ".mlxd-installed-metal", ".mlxd-installed-cuda"):
        (venv / stamp).touch()
    home = tmp_path / "home"
    out = subprocess.run(["make", "--no-print-directory", "launcher", f"VENV={venv}",
                          f"HOME={home}"], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True, timeout=60, env={"PATH": "/usr/bin:/bin"}).stdout  # fmt: skip
    link = home / ".local" / "bin" / "mlxd"
    assert link.resolve() == (venv / "bin" / "mlxd").resolve()
    assert subprocess.run([str(link)], capture_output=True, text=True).stdout == "launched\n"
    assert "add ~/.local/bin to PATH" in out
