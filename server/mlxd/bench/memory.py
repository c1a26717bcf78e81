"""The memory scenario: is the estimate right, and does admission under a budget hold?

Two parts, both for one model directory::

    python -m mlxd.bench.memory --model-dir DIR --out OUT \\
        --lengths 512,2048,8192 --stress 512,2048,4096 --budget 9GB

1. **Estimate vs measured** (in this process): the model is loaded and calibrated exactly as
   the server does it (stored under ``OUT/home/calibration``), then for each prompt length
   the estimate (before calibration: the prior; after: the calibrated one) is compared with
   MLX's measured peak of the same request (greedy, ``--max-tokens`` tokens, mlx-lm's
   ``generate_step`` as the engine runs it).
2. **Length stress** (spawned ``mlxd serve``, prefix cache off, same ``MLXD_HOME`` so the
   calibration is reused): growing prompts, streamed, first without a budget, then under
   ``--budget``. Each admitted request must finish normally (``max_tokens`` or a stop), its
   MLX peak (``/health`` after it) must stay under the budget, refusals must be 4xx with the
   numbers, swap must not grow; TTFT with and without the budget side by side.

Writes ``memory.md`` (the tables), ``memory.jsonl`` (one object per row) and ``meta.json``.
Needs only what serving needs (no openai, no matplotlib), so it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from mlxd.bench.measure import measure_loaded
from mlxd.bench.runner import PromptBook
from mlxd.bench.targets import SpawnedServer, read_stream
from mlxd.calibrate import Calibration, CalibrationStore, Calibrator, measure
from mlxd.estimate.files import read_config
from mlxd.estimate.request import ModelProfile, estimate_request
from mlxd.localnet import free_port
from mlxd.memory.sizes import format_size, parse_size

GB = 1e9


@dataclass(frozen=True)
class EstimateRow:
    prompt_tokens: int
    max_tokens: int
    prior: int  # the hand-written estimate (before calibration)
    estimate: int  # the calibrated estimate
    measured: int  # MLX's peak

    @property
    def error(self) -> float:
        return (self.estimate - self.measured) / self.measured

    @property
    def prior_error(self) -> float:
        return (self.prior - self.measured) / self.measured


@dataclass(frozen=True)
class StressRow:
    budget: str  # "none" or the budget
    prompt_tokens: int
    status: int
    finish_reason: str | None
    completion_tokens: int
    ttft_s: float | None
    peak: int | None  # MLX's peak during the request (/health after it)
    message: str | None  # the refusal's message
    swap_growth: int | None


# --------------------------------------------------------------------------- in-process


def _backend() -> str:
    from mlxd.backend import backend_info

    name = backend_info().name
    return name if name in ("metal", "cuda") else "cpu"


def calibrate_in_process(
    model: Any, model_dir: Path, profile: ModelProfile, home: Path, chunk: int, context: int
) -> Calibration:
    """Calibrate ``model`` as the server would (and store it where the server looks)."""
    import asyncio

    import mlx.core as mx

    from mlxd.backend import backend_info
    from mlxd.memory.probe import take_snapshot

    async def run(fn: Any) -> Any:
        return fn(model)

    calibrator = Calibrator(
        CalibrationStore(home / "calibration"), _backend(), backend_info().mlx_version,
        measure=functools.partial(measure, run),
    )  # fmt: skip
    key = calibrator.key(model_dir, profile, None, None, chunk)

    def room() -> int:
        return take_snapshot().available + int(mx.get_cache_memory())

    found = asyncio.run(calibrator.ensure("bench", key, profile, context, room))
    if found is None:
        raise SystemExit("calibration failed (see the log)")
    return found


def estimates(
    model_dir: Path, lengths: Sequence[int], max_tokens: int, chunk: int, home: Path
) -> tuple[list[EstimateRow], Calibration]:
    from mlx_lm.utils import load_model

    from mlxd.backend import preload_blas
    from mlxd.layersync import sync_prefill_layers

    preload_blas()
    profile = ModelProfile.from_dir(model_dir)
    context = profile.architecture.context_length or 4096
    model, _ = load_model(model_dir)
    sync_prefill_layers(model)  # as the engine runs it
    calibration = calibrate_in_process(model, model_dir, profile, home, chunk, context)
    print(f"calibration: {calibration.describe()}", flush=True)
    backend: Any = _backend()
    rows = []
    for n in lengths:
        tokens = max(1, min(max_tokens, context - n))
        if n >= context:
            print(f"skipping {n}: the context is {context}", flush=True)
            continue
        kw: dict[str, Any] = {"backend": backend, "prefill_chunk": chunk, "sampling": False}
        prior = estimate_request(profile, n, tokens, **kw).total
        est = estimate_request(profile, n, tokens, working=calibration.working, **kw).total
        measured = measure_loaded(
            model, profile.architecture.vocab_size, n, tokens, prefill_chunk=chunk
        )
        row = EstimateRow(n, tokens, prior, est, measured)
        rows.append(row)
        print(
            f"{n:>6} tokens: prior {prior / GB:.3f} GB ({row.prior_error:+.1%}), "
            f"calibrated {est / GB:.3f} GB ({row.error:+.1%}), measured {measured / GB:.3f} GB",
            flush=True,
        )
    return rows, calibration


# --------------------------------------------------------------------------- length stress


def stress(
    model_dir: Path,
    lengths: Sequence[int],
    budgets: Sequence[str | None],
    max_tokens: int,
    home: Path,
    out: Path,
    errors: dict[str, Any],
) -> list[StressRow]:
    """Growing prompts against a spawned server per budget; ``errors`` receives, per budget,
    the server's calibration line and the estimate error it saw (``/health``)."""
    from mlx_lm.utils import load_tokenizer

    config = read_config(model_dir)
    book = PromptBook(load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id")))
    name = model_dir.resolve().name
    cfg = out / "models.json"
    entry = {"id": name, "source": {"path": str(model_dir.resolve())}}
    cfg.write_text(json.dumps({"default": name, "models": [entry]}))
    rows: list[StressRow] = []
    for budget in budgets:
        port = free_port()
        argv = [sys.executable, "-m", "mlxd", "serve", "--config", str(cfg), "--port", str(port),
                "--preload", "--prefix-cache", "0"]  # fmt: skip
        if budget:
            argv += ["--memory-budget", budget]
        label = budget or "none"
        env = {**os.environ, "MLXD_HOME": str(home)}
        server = SpawnedServer(f"mlxd-{label}", argv, f"http://127.0.0.1:{port}/v1",
                               out / f"mlxd-budget-{label}.log", env)  # fmt: skip
        server.launch()
        try:
            server.wait_ready(1800)
            for i, n in enumerate(lengths):
                messages = book.sized(f"stress-{i}", n)
                row = _one(server.base_url, name, messages, book.count(messages), max_tokens, label)
                rows.append(row)
                print(
                    f"budget {label}: {row.prompt_tokens} tokens -> {row.status} "
                    f"{row.finish_reason or row.message}, ttft {row.ttft_s}, "
                    f"peak {format_size(row.peak) if row.peak else '-'}",
                    flush=True,
                )
            health = httpx.get(server.base_url.removesuffix("/v1") + "/health", timeout=30).json()
            (out / f"health-budget-{label}.json").write_text(json.dumps(health, indent=1))
            calibration = health["memory"].get("calibration", {}).get(name, {})
            errors[label] = {"calibration": calibration.get("line"),
                             **calibration.get("estimate_error", {})}  # fmt: skip
        finally:
            server.stop()
    return rows


def _one(
    base: str, model: str, messages: Any, prompt: int, max_tokens: int, label: str
) -> StressRow:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=3600) as r:
        if r.status_code != 200:
            r.read()
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text
            return StressRow(label, prompt, r.status_code, None, 0, None, None, message, None)
        result = read_stream(r.iter_lines(), time.perf_counter)
    health = httpx.get(base.removesuffix("/v1") + "/health", timeout=30).json()["memory"]
    ttft = result.ttft - start if result.ttft is not None else None
    return StressRow(
        label, result.usage_prompt_tokens or prompt, 200, result.finish_reason,
        result.completion_tokens, round(ttft, 3) if ttft is not None else None,
        health.get("peak"), None, health.get("swap_growth"),
    )  # fmt: skip


# --------------------------------------------------------------------------- report


def render(
    model: str,
    est: Sequence[EstimateRow],
    calibration: Calibration | None,
    rows: Sequence[StressRow],
    budget: str | None,
    errors: dict[str, Any] | None = None,
) -> str:
    out = [f"# Memory: {model}", ""]
    if calibration is not None:
        out += [f"Calibration: {calibration.describe()}, {len(calibration.samples)} samples.", ""]
    if est:
        out += [
            "| prompt tokens | max_tokens | prior estimate (GB) | calibrated estimate (GB) "
            "| measured peak (GB) | prior error | calibrated error |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in est:
            out.append(
                f"| {e.prompt_tokens} | {e.max_tokens} | {e.prior / GB:.3f} | "
                f"{e.estimate / GB:.3f} | {e.measured / GB:.3f} | {e.prior_error:+.1%} | "
                f"{e.error:+.1%} |"
            )
        out.append("")
    if rows:
        limit = parse_size(budget) if budget else None
        free = {r.prompt_tokens: r for r in rows if r.budget == "none"}
        out += [
            f"Length stress under `--memory-budget {budget}` (streamed, temperature 0), "
            "TTFT beside the same request without a budget:",
            "",
            "| prompt tokens | status | finish | completion | TTFT no budget (s) "
            "| TTFT budget (s) | ratio | MLX peak | peak ≤ budget | refusal |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r.budget == "none" and budget:
                continue
            base = free.get(r.prompt_tokens)
            ratio = (
                f"{r.ttft_s / base.ttft_s:.2f}×"
                if base and base.ttft_s and r.ttft_s and r is not base
                else ""
            )
            fits = "" if r.peak is None or limit is None else ("yes" if r.peak <= limit else "NO")
            out.append(
                f"| {r.prompt_tokens} | {r.status} | {r.finish_reason or ''} | "
                f"{r.completion_tokens} | {base.ttft_s if base and base.ttft_s else ''} | "
                f"{r.ttft_s if r.ttft_s is not None else ''} | {ratio} | "
                f"{format_size(r.peak) if r.peak else ''} | {fits} | {r.message or ''} |"
            )
        growth = max((r.swap_growth or 0 for r in rows), default=0)
        out += ["", f"Swap growth seen by the server: {format_size(growth)}.", ""]
        for label, seen in (errors or {}).items():
            if seen.get("requests"):
                out.append(
                    f"Server (budget {label}): {seen.get('calibration')}; estimate error over "
                    f"{seen['requests']} requests (estimate − measured) / measured: "
                    f"min {seen['min']:+.1%}, mean {seen['mean']:+.1%}, max {seen['max']:+.1%}, "
                    f"{seen['exceeded']} exceeded."
                )
        out.append("")
    return "\n".join(out)


def _ints(text: str) -> list[int]:
    """``512,2k,32k`` → ``[512, 2048, 32768]``."""
    out = []
    for item in text.lower().replace(" ", "").split(","):
        if item:
            out.append(int(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlxd.bench.memory", description=__doc__)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lengths", type=_ints, default=[], help="estimate vs measured, e.g. 512,2k")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--stress", type=_ints, default=[], help="length stress prompt lengths")
    p.add_argument("--stress-max-tokens", type=int, default=16)
    p.add_argument("--budget", help="memory budget of the stress run, e.g. 9GB")
    p.add_argument("--home", type=Path, help="MLXD_HOME for the calibration (default OUT/home)")
    args = p.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    home = args.home or out / "home"
    est: list[EstimateRow] = []
    calibration: Calibration | None = None
    if args.lengths:
        est, calibration = estimates(
            args.model_dir, args.lengths, args.max_tokens, args.prefill_chunk, home
        )
    rows: list[StressRow] = []
    errors: dict[str, Any] = {}
    if args.stress:
        budgets = [None, args.budget] if args.budget else [None]
        rows = stress(
            args.model_dir, args.stress, budgets, args.stress_max_tokens, home, out, errors
        )
    name = args.model_dir.resolve().name
    report = render(name, est, calibration, rows, args.budget, errors)
    (out / "memory.md").write_text(report + "\n")
    with (out / "memory.jsonl").open("w") as f:
        for e in est:
            f.write(json.dumps({"kind": "estimate", **asdict(e), "error": e.error}) + "\n")
        for r in rows:
            f.write(json.dumps({"kind": "stress", **asdict(r)}) + "\n")
    meta: dict[str, Any] = {
        "argv": sys.argv, "machine": platform.platform(), "python": sys.version.split()[0],
        "versions": _versions(),
    }  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(report)
    return 0


def _versions() -> dict[str, str | None]:
    import importlib.metadata

    out: dict[str, str | None] = {}
    for name in ("mlx", "mlx-lm", "mlx-cuda", "mlx-metal", "mlx-cpu"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False) if (
        Path("/usr/bin/nvidia-smi").exists()
    ) else None  # fmt: skip
    out["gpu"] = gpu.stdout.strip() if gpu and gpu.returncode == 0 else None
    return out


if __name__ == "__main__":
    raise SystemExit(main())
