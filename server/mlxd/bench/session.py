"""One benchmark run: the in-process baseline, then each target, one at a time.

A spawned server is started on a free port, waited for, measured and stopped before the next
target starts, so no two models are resident together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from mlxd.backend import blas_in_use
from mlxd.bench.meta import slug
from mlxd.bench.report import BASELINE, MemoryRecord, RequestRecord
from mlxd.bench.runner import Plan, PromptBook, TargetRun, run_target
from mlxd.bench.targets import (
    BenchError,
    HttpTarget,
    InProcessTarget,
    MemoryWatch,
    SpawnedServer,
    Target,
    list_models,
    listening_pid,
    resolve_model_name,
    server_env,
)
from mlxd.localnet import free_port


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """One target of a run, as the command line named it."""

    name: str
    url: str | None = None  # an already running server
    command: str | None = None  # a server to spawn: a template with {python} {model_dir} {port}


def mlxd_config(model_dir: Path) -> str:
    """A models.yaml serving just ``model_dir``, under its directory name.

    JSON is YAML, so no YAML writer is needed.
    """
    name = model_dir.resolve().name
    entry = {"id": name, "source": {"path": str(model_dir.resolve())}}
    return json.dumps({"default": name, "models": [entry]}, indent=2) + "\n"


def _local_pid(url: str) -> int | None:
    """The pid of a server on this machine at ``url``, for its memory (None when remote)."""
    match = re.match(r"^https?://(127\.0\.0\.1|localhost|\[::1\]):(\d+)", url)
    return listening_pid(int(match.group(2))) if match else None


class Session:
    """One benchmark run: the shared prompts, plan, progress line and collected results."""

    def __init__(self, args: argparse.Namespace, plan: Plan, book: PromptBook, out: Path) -> None:
        self.args, self.plan, self.book, self.out = args, plan, book, out
        self.started = time.monotonic()
        self.records: list[RequestRecord] = []
        self.memory: list[MemoryRecord] = []
        self.startup: dict[str, float] = {}
        self.errors: dict[str, str] = {}

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)

    def _measure(self, target: Target) -> None:
        run = TargetRun()
        try:
            run_target(target, self.plan, self.book, self.say, run)
        finally:
            self.records += run.records
            self.memory += run.memory

    def baseline(self) -> None:
        target = InProcessTarget(self.args.model_dir, suppress_eos=self.plan.suppress_eos)
        self.say(f"{BASELINE}: loading {self.args.model_dir}")
        watch = MemoryWatch(target.pid, mlx=True).start()
        try:
            self.startup[BASELINE] = target.load()
            rss, mlx_peak = watch.stop()
            self.memory.append(MemoryRecord(BASELINE, "startup", rss, mlx_peak))
            self._measure(target)
        finally:
            target.close()

    def _spawn(self, spec: TargetSpec, command: str) -> SpawnedServer:
        """Start a server on a free port and wait until it lists its models."""
        port = free_port()
        config = self.out / "models.yaml"
        if "{config}" in command:
            config.write_text(mlxd_config(self.args.model_dir))
        line = command.format(
            python=shlex.quote(sys.executable),
            model_dir=shlex.quote(str(self.args.model_dir)),
            port=port,
            config=shlex.quote(str(config)),
        )
        url = f"http://127.0.0.1:{port}/v1"
        log = self.out / f"{slug(spec.name)}.log"
        env = server_env(blas_in_use(), os.environ)
        spawned = SpawnedServer(spec.name, shlex.split(line), url, log, env)
        self.say(f"{spec.name}: starting {line}")
        start = time.perf_counter()
        watch = MemoryWatch(spawned.launch(), mlx=False).start()
        try:
            spawned.wait_ready(self.args.startup_timeout)
        finally:
            rss, _ = watch.stop()
        self.startup[spec.name] = time.perf_counter() - start
        self.memory.append(MemoryRecord(spec.name, "startup", rss, None))
        self.say(f"{spec.name}: ready after {self.startup[spec.name]:.1f} s")
        return spawned

    def server(self, spec: TargetSpec) -> None:
        spawned: SpawnedServer | None = None
        client: HttpTarget | None = None
        try:
            if spec.command is not None:
                spawned = self._spawn(spec, spec.command)
                url, pid = spawned.base_url, spawned.pid
            else:
                assert spec.url is not None
                url, pid = spec.url, _local_pid(spec.url)
            model = self.args.model_name or resolve_model_name(
                list_models(url), self.args.model_dir
            )
            extra: dict[str, Any] = {}
            if self.plan.suppress_eos:
                eos = self.book.tokenizer.eos_token_ids
                extra["logit_bias"] = {str(t): -100 for t in eos}
            client = HttpTarget(
                spec.name, url, model, timeout=self.args.timeout, extra_body=extra, pid=pid
            )
            self._measure(client)
        except (BenchError, OSError, httpx.HTTPError) as exc:
            self.errors[spec.name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.say(f"{spec.name}: FAILED: {exc}")
        finally:
            if client is not None:
                client.close()
            if spawned is not None:
                spawned.stop()
                self.say(f"{spec.name}: stopped")
