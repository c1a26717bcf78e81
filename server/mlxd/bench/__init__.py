"""Benchmark OpenAI-compatible servers against the same model run in-process with mlx-lm.

One command measures everything for one model directory::

    python -m mlxd.bench --model-dir DIR --spawn-mlx-lm --spawn-mlxd --quick

The in-process baseline runs first, then each target in the order given, one at a time:
spawned servers are started, waited for and stopped before the next one starts, so no two
models are resident together. Results go to ``--out`` (``results.jsonl``, ``results.md``,
``plot.png``, ``meta.json``); see ``bench/README.md`` for what each number means.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import psutil

from mlxd.backend import blas_in_use
from mlxd.bench.report import (
    BASELINE,
    MemoryRecord,
    RequestRecord,
    plot,
    render_markdown,
    summarize,
    write_jsonl,
)
from mlxd.bench.runner import ALL_SCENARIOS, FULL, QUICK, Plan, PromptBook, TargetRun, run_target
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

MLX_LM_COMMAND = "{python} -m mlx_lm.server --model {model_dir} --port {port}"
MLXD_COMMAND = "{python} -m mlxd serve --config {config} --port {port} --preload"

__all__ = ["BenchError", "build_parser", "main"]


# --------------------------------------------------------------------------- CLI


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    name: str
    url: str | None = None  # an already running server
    command: str | None = None  # a server to spawn: a template with {python} {model_dir} {port}


def _split_pair(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise ValueError(f"expected NAME={what}, got {text!r}")
    return name.strip(), value.strip()


class _AddTarget(argparse.Action):
    """Append to one ordered list, whichever option names the target."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        specs: list[TargetSpec] = list(getattr(namespace, "targets", None) or [])
        try:
            if option_string == "--target":
                name, url = _split_pair(values, "URL")
                specs.append(TargetSpec(name, url=url))
            elif option_string == "--spawn":
                name, command = _split_pair(values, "CMD")
                specs.append(TargetSpec(name, command=command))
            elif option_string == "--spawn-mlx-lm":
                specs.append(TargetSpec("mlx_lm.server", command=MLX_LM_COMMAND))
            else:
                specs.append(TargetSpec("mlxd", command=values or MLXD_COMMAND))
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        namespace.targets = specs


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _scenario_list(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in ALL_SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown) or text!r}; known: {', '.join(ALL_SCENARIOS)}"
        )
    return names


def build_parser(prog: str = "python -m mlxd.bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Benchmark OpenAI-compatible servers against the same model run in-process with "
            "mlx-lm, in one run, and report the ratios."
        ),
        epilog=(
            "Spawn command templates may use {python} (this interpreter), {model_dir}, "
            "{port} (a free port chosen for it; required) and {config} (a models.yaml serving "
            "just the model dir, written next to the results). Example: %(prog)s --model-dir "
            "~/models/qwen3-8b-4bit --spawn-mlx-lm --spawn-mlxd --quick"
        ),
    )
    p.add_argument("--model-dir", type=Path, required=True, help="mlx-lm model directory")
    p.add_argument(
        "--model-name",
        help="model id to send to every target (default: the id a target lists for the model dir)",
    )
    targets = p.add_argument_group("targets (measured one at a time, in the order given)")
    targets.add_argument(
        "--target",
        action=_AddTarget,
        metavar="NAME=URL",
        help="a running server, e.g. mlxd=http://127.0.0.1:8080/v1",
    )
    targets.add_argument(
        "--spawn",
        action=_AddTarget,
        metavar="NAME=CMD",
        help="start a server with CMD, measure it, stop it",
    )
    targets.add_argument(
        "--spawn-mlx-lm", action=_AddTarget, nargs=0, help=f"spawn: {MLX_LM_COMMAND}"
    )
    targets.add_argument(
        "--spawn-mlxd",
        action=_AddTarget,
        nargs="?",
        metavar="CMD",
        help=f"spawn (default: {MLXD_COMMAND})",
    )
    targets.add_argument(
        "--no-baseline", action="store_true", help="skip the in-process mlx-lm baseline"
    )
    size = p.add_argument_group("size of the run")
    size.add_argument(
        "--quick", action="store_true", help="a CI-sized run (minutes on a laptop CPU)"
    )
    size.add_argument(
        "--repeats",
        type=int,
        help="repeats of each single-request measurement (default 3, --quick 1)",
    )
    size.add_argument(
        "--group-repeats",
        type=int,
        help="repeats of the chat conversation and of each concurrent group (default 1)",
    )
    size.add_argument(
        "--scenarios", type=_scenario_list, help=f"subset of {','.join(ALL_SCENARIOS)}"
    )
    size.add_argument("--prompt-lengths", type=_int_list, help="prefill prompt lengths in tokens")
    size.add_argument(
        "--max-prompt",
        type=int,
        default=8192,
        help="drop prefill lengths above this (default 8192)",
    )
    size.add_argument("--decode-tokens", type=int, help="max_tokens of the decode scenario")
    size.add_argument("--chat-turns", type=int, help="turns of the accumulated chat")
    size.add_argument("--chat-user-tokens", type=int, help="tokens in each chat user message")
    size.add_argument("--concurrency", type=_int_list, help="concurrent stream counts, e.g. 1,4,8")
    size.add_argument("--concurrency-tokens", type=int, help="max_tokens of each concurrent stream")
    size.add_argument("--join-prompt", type=int, help="tokens of the prompt that joins (join)")
    size.add_argument("--join-streams", type=int, help="streams running when it joins (join)")
    size.add_argument("--join-tokens", type=int, help="max_tokens of those streams (join)")
    size.add_argument(
        "--suppress-eos",
        action="store_true",
        help="bias end-of-sequence tokens to -100 (logit_bias) so every request runs to max_tokens",
    )
    size.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the unrecorded round before each concurrent group and join (--quick skips it)",
    )
    p.add_argument(
        "--out", type=Path, help="results directory (default bench/results/DATE-MACHINE-MODEL)"
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per request (default 1800)"
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds for a spawned server to be ready",
    )
    p.add_argument("--no-plot", action="store_true", help="skip plot.png (no matplotlib needed)")
    return p


def make_plan(args: argparse.Namespace, context: int | None) -> Plan:
    """The plan the flags ask for, prefill lengths capped by the model context and --max-prompt."""
    base = QUICK if args.quick else FULL
    changes: dict[str, Any] = {"suppress_eos": args.suppress_eos}
    if args.no_warmup:
        changes["warmup"] = False
    for flag, name in (
        ("repeats", "repeats"),
        ("group_repeats", "group_repeats"),
        ("scenarios", "scenarios"),
        ("prompt_lengths", "prefill_lengths"),
        ("decode_tokens", "decode_max_tokens"),
        ("chat_turns", "chat_turns"),
        ("chat_user_tokens", "chat_user_tokens"),
        ("concurrency", "concurrency"),
        ("concurrency_tokens", "concurrency_max_tokens"),
        ("join_prompt", "join_prompt"),
        ("join_streams", "join_streams"),
        ("join_tokens", "join_max_tokens"),
    ):
        if getattr(args, flag) is not None:
            changes[name] = getattr(args, flag)
    plan = dataclasses.replace(base, **changes)
    cap = args.max_prompt
    if context is not None:
        cap = min(cap, context - plan.prefill_max_tokens - 8)
    lengths = tuple(n for n in plan.prefill_lengths if n <= cap)
    if min(plan.repeats, plan.group_repeats) < 1:
        raise BenchError("--repeats and --group-repeats must be at least 1")
    return dataclasses.replace(plan, prefill_lengths=lengths)


# --------------------------------------------------------------------------- metadata


def model_summary(
    config: Mapping[str, Any], weights_bytes: int, name: str, dtype: str | None = None
) -> dict[str, Any]:
    """The shape facts of a model config that explain its speed and memory."""
    text = config.get("text_config") or {}
    cfg = {**config, **text}
    quant = cfg.get("quantization") or cfg.get("quantization_config")
    if isinstance(quant, Mapping) and quant.get("bits"):
        quantization = f"{quant['bits']}-bit (group {quant.get('group_size', '?')})"
    else:
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or dtype or "dtype unknown"
        quantization = f"none ({dtype})"
    return {
        "name": name,
        "type": cfg.get("model_type"),
        "layers": cfg.get("num_hidden_layers"),
        "hidden": cfg.get("hidden_size"),
        "heads": cfg.get("num_attention_heads"),
        "kv_heads": cfg.get("num_key_value_heads"),
        "vocab": cfg.get("vocab_size"),
        "context": cfg.get("max_position_embeddings"),
        "quantization": quantization,
        "weights_bytes": weights_bytes,
        "weights_gib": round(weights_bytes / 2**30, 3),
    }


def read_model_summary(model_dir: Path) -> dict[str, Any]:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise BenchError(f"{model_dir} is not an mlx-lm model directory (no config.json)")
    config = json.loads(config_path.read_text())
    shards = sorted(model_dir.glob("*.safetensors"))
    weights = sum(f.stat().st_size for f in shards)
    dtype = weights_dtype(shards[0]) if shards else None
    return model_summary(config, weights, model_dir.resolve().name, dtype)


def weights_dtype(shard: Path) -> str | None:
    """The most common floating-point dtype in a safetensors shard, from its header alone."""
    try:
        with shard.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
    except (OSError, ValueError):
        return None
    counts: dict[str, int] = {}
    for name, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) and name != "__metadata__" else None
        if dtype in {"F16", "BF16", "F32"}:
            counts[dtype] = counts.get(dtype, 0) + 1
    if not counts:
        return None
    best = max(counts, key=lambda d: counts[d])
    return {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}[best]


def _run(argv: Sequence[str]) -> str | None:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    if sys.platform == "darwin" and (brand := _run(["sysctl", "-n", "machdep.cpu.brand_string"])):
        return brand
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    if not out:
        return None
    names = out.splitlines()
    return names[0] if len(names) == 1 else f"{len(names)}x {names[0]}"


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cores": psutil.cpu_count(logical=True),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu_name(),
    }


def versions() -> dict[str, str | None]:
    import mlxd

    out: dict[str, str | None] = {"python": platform.python_version(), "mlxd": mlxd.__version__}
    for dist in ("mlx", "mlx-lm", "mlx-metal", "mlx-cuda", "transformers", "httpx"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def slug(text: str) -> str:
    text = re.sub(r"\((R|TM)\)|@.*$", "", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_out(machine: Mapping[str, Any], model_name: str, quick: bool) -> Path:
    day = datetime.now().strftime("%Y-%m-%d")
    name = f"{day}-{slug(machine.get('gpu') or machine['cpu'])}-{slug(model_name)}"
    return Path("bench/results") / (name + ("-quick" if quick else ""))


# --------------------------------------------------------------------------- run


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


def _check_names(specs: Sequence[TargetSpec], baseline: bool) -> None:
    names = [s.name for s in specs] + ([BASELINE] if baseline else [])
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BenchError(f"target names must be unique: {', '.join(dupes)}")
    for spec in specs:
        if spec.command is not None and "{port}" not in spec.command:
            raise BenchError(f"spawn command for {spec.name} must contain {{port}}")


class _Session:
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


def collect_meta(args: argparse.Namespace, plan: Plan, argv: Sequence[str]) -> dict[str, Any]:
    from mlxd.backend import backend_info

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "backend": backend_info().describe(),
        "spawned_servers_preload": blas_in_use(),
        "versions": versions(),
        "model": read_model_summary(args.model_dir),
        "plan": dataclasses.asdict(plan),
        "command": "python -m mlxd.bench " + shlex.join(argv),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _main(args, argv)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    from mlx_lm.utils import load_tokenizer

    specs: list[TargetSpec] = list(getattr(args, "targets", None) or [])
    baseline = not args.no_baseline
    _check_names(specs, baseline)
    if not specs and not baseline:
        raise BenchError("nothing to measure: give a --target/--spawn or keep the baseline")
    summary = read_model_summary(args.model_dir)
    plan = make_plan(args, summary.get("context"))
    meta = collect_meta(args, plan, argv)
    out = args.out or default_out(meta["machine"], summary["name"], args.quick)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((args.model_dir / "config.json").read_text())
    tokenizer = load_tokenizer(args.model_dir, eos_token_ids=config.get("eos_token_id"))
    session = _Session(args, plan, PromptBook(tokenizer), out)
    session.say(f"model {summary['name']} on {meta['backend']}; results in {out}")
    names = ([BASELINE] if baseline else []) + [s.name for s in specs]
    try:
        if baseline:
            session.baseline()
        for spec in specs:
            session.server(spec)
    finally:
        metrics = summarize(session.records, session.memory, session.startup)
        meta["targets"] = {s.name: s.url or s.command for s in specs}
        write_jsonl(
            out / "results.jsonl", meta, session.records, session.memory, metrics, session.errors
        )
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        markdown = render_markdown(metrics, names, meta, session.errors)
        (out / "results.md").write_text(markdown)
        if not args.no_plot and metrics:
            if importlib.util.find_spec("matplotlib") is None:
                session.say("matplotlib is not installed: no plot.png (pip install matplotlib)")
            else:
                plot(metrics, names, out / "plot.png")
    print(markdown)
    session.say(
        f"wrote {out}/results.md, results.jsonl, meta.json" + ("" if args.no_plot else ", plot.png")
    )
    return 1 if session.errors else 0
