"""The ``mlxd`` command line: serve, models, pull, import-gguf, doctor, bench."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
from pathlib import Path
from typing import Any

import mlxd
from mlxd.config import ConfigError, load_models
from mlxd.errors import MlxdError
from mlxd.settings import Settings, add_flags, from_args

log = logging.getLogger("mlxd")


class _LogFormatter(logging.Formatter):
    """``time level logger: message`` with extra key=value fields, one event per line."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%H:%M:%S")
        text = f"{stamp} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(level: str, fmt: str = "text") -> None:
    from mlxd.limits import RateLimitFilter
    from mlxd.logfmt import JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _LogFormatter())
    handler.addFilter(RateLimitFilter())  # a flood of one error is one line per interval
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "huggingface_hub", "sse_starlette"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings(args: argparse.Namespace) -> Settings:
    """The settings: this subcommand's flags over the environment (``server.settings``)."""
    return from_args(args)


def banner(settings: Settings, model_id: str, model_dir: Path, calibration: str) -> str:
    from mlxd.backend import backend_info
    from mlxd.memory.budget import compute_budget
    from mlxd.memory.probe import take_snapshot
    from mlxd.memory.sizes import format_size, parse_size

    snapshot = take_snapshot()
    override = parse_size(settings.memory_budget) if settings.memory_budget else None
    budget = compute_budget(snapshot, settings.memory_reserve, override)
    url = f"http://{settings.host}:{settings.port}/v1"
    rows = [
        ("model", f"{model_id}  ({model_dir})"),
        ("backend", backend_info().describe()),
        ("memory", f"budget {format_size(budget.limit)}  ({budget.basis}), "
                   f"{format_size(snapshot.available)} available now"),
        ("calibration", calibration),
        ("models", str(settings.config_path)),
        ("url", url),
        ("status", f"http://{settings.host}:{settings.port}/  (metrics: /metrics)"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    lines = [f"mlxd {mlxd.__version__}"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append(f"  try: curl {url}/chat/completions -H 'Content-Type: application/json' \\")
    lines.append(
        f'         -d \'{{"model": "{model_id}", "messages": [{{"role": "user", '
        '"content": "Hello!"}]}\''
    )
    return "\n".join(lines)


def cmd_serve(args: argparse.Namespace) -> int:
    from mlxd import listener
    from mlxd.app import create_app
    from mlxd.limits import connection_cap, listen_backlog, raise_open_file_limit

    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_format)
    open_files = raise_open_file_limit()
    max_connections = connection_cap(open_files, settings.max_connections)
    app = create_app(settings)
    state = app.state.mlxd
    default = state.registry.default
    # Import/download the default model before listening, with progress bars on the terminal,
    # so the first request does not pay for it.
    model_dir = state.registry.prepare_sync(default, progress=True)
    calibration = state.gate.calibration_line(default, model_dir)
    print(banner(settings, default.id, model_dir, calibration), file=sys.stderr, flush=True)
    log_level = "warning" if settings.log_level == "info" else settings.log_level
    config = listener.config(
        app,
        settings,
        log_level=log_level,
        max_connections=max_connections,
        backlog=listen_backlog(open_files, max_connections),
    )
    server = listener.DrainingServer(
        config, settings.drain_timeout, state.drain_started, state.drain_expired
    )
    server.run()
    return 0


AVAILABILITY_WORDS = {
    "present": "present",
    "too_big": "exceeds budget",
    "download": "would download",
    "import": "would import",
    "missing": "missing",
}


def cmd_models(args: argparse.Namespace) -> int:
    from mlxd.gate import MemoryGate
    from mlxd.memory.budget import compute_budget
    from mlxd.memory.probe import take_snapshot
    from mlxd.memory.sizes import format_size, parse_size
    from mlxd.registry import Registry
    from mlxd.router import Router
    from mlxd.sources import ModelSources

    settings = _settings(args)
    models = load_models(settings.config_path)
    registry = Registry(models, ModelSources(settings.home, settings.config_path.parent))
    snapshot = take_snapshot()
    override = parse_size(settings.memory_budget) if settings.memory_budget else None
    budget = compute_budget(snapshot, settings.memory_reserve, override)
    router = Router(registry, MemoryGate(budget, snapshot=lambda: snapshot))
    default = registry.default.id
    found = [(entry, router.availability(entry)) for entry in registry.entries]
    if args.json:
        print(json.dumps([
            {"id": e.id, "default": e.id == default, "present": a.status in ("present", "too_big"),
             "availability": a.status, "detail": a.detail, "estimated_memory_bytes": a.memory,
             "tags": e.tags, "source": e.source.model_dump()}
            for e, a in found
        ]))  # fmt: skip
        return 0
    rows = [("ID", "STATUS", "NEEDS", "TAGS", "SOURCE")] + [
        (e.id + (" *" if e.id == default else ""), AVAILABILITY_WORDS[a.status],
         format_size(a.memory) if a.memory is not None else "?", ",".join(e.tags),
         ", ".join(f"{k}={v}" for k, v in e.source.model_dump(exclude_none=True).items()))
        for e, a in found
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"* default · memory budget {format_size(budget.limit)} ({budget.basis}) · "
          "NEEDS = weights + a 4K-token prompt and 1K-token answer")  # fmt: skip
    for entry, available in found:
        if available.status != "present":
            print(f"  {entry.id}: {available.detail}")
    if any(a.status == "download" for _, a in found):
        print("models that would download are fetched on first use, or now with `mlxd pull ID`")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from mlxd.registry import Registry
    from mlxd.sources import ModelSources

    settings = _settings(args)
    registry = Registry(
        load_models(settings.config_path), ModelSources(settings.home, settings.config_path.parent)
    )
    names = args.ids or [registry.default.id]
    for name in names:
        entry = registry.get(name)
        path = registry.prepare_sync(entry, progress=True)
        print(f"{entry.id}: {path}")
    return 0


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from mlxd.gguf import import_gguf

    settings = _settings(args)
    src = Path(args.file).expanduser()
    out = Path(args.out).expanduser() if args.out else settings.models_dir / src.stem
    path = import_gguf(src, out, dtype=args.dtype, progress=True)
    print(path)
    return 0


def doctor_report(settings: Settings) -> dict[str, Any]:
    from mlxd.backend import backend_info
    from mlxd.memory.budget import compute_budget
    from mlxd.memory.probe import take_snapshot
    from mlxd.memory.sizes import format_size

    report: dict[str, Any] = {"mlxd": mlxd.__version__, "python": sys.version.split()[0]}
    for dist in ("mlx", "mlx-lm", "mlx-cpu", "mlx-cuda-13", "mlx-metal", "fastapi", "uvicorn"):
        try:
            report[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    info = backend_info()
    report["backend"] = info.describe()
    needed = {
        "mlx_lm.generate": ["generate_step", "stream_generate"],
        "mlx_lm.sample_utils": ["make_sampler", "make_logits_processors"],
        "mlx_lm.models.cache": ["make_prompt_cache", "trim_prompt_cache"],
        "mlx_lm.utils": ["load_model", "load_tokenizer"],
    }
    missing = []
    for module_name, names in needed.items():
        module = __import__(module_name, fromlist=names)
        missing += [f"{module_name}.{n}" for n in names if not hasattr(module, n)]
    report["mlx_lm_api"] = "ok" if not missing else f"MISSING: {', '.join(missing)}"
    snapshot = take_snapshot()
    budget = compute_budget(snapshot, settings.memory_reserve)
    report["memory"] = {
        "total": format_size(snapshot.total),
        "available": format_size(snapshot.available),
        "swap_used": format_size(snapshot.swap_used),
        "budget": f"{format_size(budget.limit)} ({budget.basis})",
        "source": snapshot.source,
    }
    try:
        from mlxd.registry import Registry
        from mlxd.sources import ModelSources

        registry = Registry(
            load_models(settings.config_path),
            ModelSources(settings.home, settings.config_path.parent),
        )
        report["models"] = {
            e.id: ("present" if registry.is_present(e) else "not downloaded")
            for e in registry.entries
        }
    except ConfigError as exc:
        report["models"] = f"config error: {exc}"
    report["config"] = str(settings.config_path)
    report["home"] = str(settings.home)
    return report


def cmd_doctor(args: argparse.Namespace) -> int:
    report = doctor_report(_settings(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<24} {v}")
        else:
            print(f"{key:<26} {value}")
    return 0 if report["mlx_lm_api"] == "ok" else 1


def cmd_bench(rest: list[str]) -> int:
    from mlxd.bench.cli import main as bench_main

    return bench_main(rest)


# The settings ``mlxd serve`` takes as flags (each declared once in server.settings).
SERVE_FLAGS = (
    "config_path", "host", "port", "default_model", "memory_budget", "preload", "keep_alive",
    "prefix_cache_bytes", "max_concurrency", "queue_size", "log_level", "log_format", "api_keys",
    "api_key_file", "insecure_no_auth", "allowed_hosts", "cors_origins", "max_body_bytes",
    "header_timeout", "body_timeout", "max_connections", "drain_timeout",
)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlxd", description=__doc__)
    p.add_argument("--version", action="version", version=f"mlxd {mlxd.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start the OpenAI-compatible server")
    add_flags(s, *SERVE_FLAGS)
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("models", help="configured models: present, would download, too big")
    add_flags(m, "config_path", "memory_budget")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    pl = sub.add_parser("pull", help="download/import configured models (default: the default)")
    add_flags(pl, "config_path")
    pl.add_argument("ids", nargs="*")
    pl.set_defaults(func=cmd_pull)

    g = sub.add_parser("import-gguf", help="convert a GGUF file into an MLX model directory")
    g.add_argument("file")
    g.add_argument("--out", help="output directory (default: $MLXD_HOME/models/<name>)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "quantized"])
    g.set_defaults(func=cmd_import_gguf)

    d = sub.add_parser("doctor", help="platform, backend, versions, memory and models")
    add_flags(d, "config_path")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)

    sub.add_parser("bench", help="benchmark servers against in-process mlx-lm (see --help)",
                   add_help=False)  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # bench owns its arguments; hand it everything after the subcommand.
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    args = parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except (ConfigError, MlxdError) as exc:
        print(f"mlxd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
