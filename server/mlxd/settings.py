"""Server settings, each declared once: type, default, help, environment variable and flag.

``Settings`` is built once at startup and passed down (``create_app(settings)``); nothing reads
the environment after that. Each field's declaration (``setting(...)``) is the one source the
environment reader (``Settings.from_env``) and the command line (``add_flags``, ``from_args``)
are built from, so a default or a variable name is written in one place. Precedence: a flag,
then the variable, then the default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from mlxd.config import REPO_ROOT, ConfigError, parse_duration

Kind = Literal["str", "int", "float", "bool", "list", "size", "path"]


@dataclass(frozen=True)
class Option:
    """How one setting is read from the environment and the command line."""

    help: str
    kind: Kind
    env: tuple[str, ...] = ()  # variables, first set one wins
    flag: str | None = None  # None: not on the command line
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


def setting(
    default: Any = MISSING,
    *,
    help: str,
    kind: Kind = "str",
    env: str | tuple[str, ...] = (),
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A ``Settings`` field with its reading rules (see ``Option``)."""
    option = Option(help, kind, (env,) if isinstance(env, str) else env, flag, choices, metavar)
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"option": option})
    return field(default=default, metadata={"option": option})


def _default_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mlxd"


def _default_config_path() -> Path:
    local = Path.cwd() / "models.yaml"
    return local if local.is_file() else REPO_ROOT / "models.yaml"


# Requests decoding together in one batch, unless models.yaml or --max-concurrency say otherwise
# (see bench/results/*-concurrency: aggregate throughput still grows up to 16 streams).
DEFAULT_MAX_CONCURRENCY = 16
DEFAULT_QUEUE_SIZE = 32


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know, resolved once at startup."""

    host: str = setting("127.0.0.1", help="bind address", env="MLXD_HOST", flag="--host")
    port: int = setting(8080, help="port", kind="int", env=("MLXD_PORT", "PORT"), flag="--port")
    config_path: Path = setting(
        help="models.yaml path (default: ./models.yaml, else the checkout's)",
        kind="path", env="MLXD_CONFIG", flag="--config", default_factory=_default_config_path,
    )  # fmt: skip
    default_model: str | None = setting(
        None, help="default model id or alias (prepared before listening)", env="MLXD_MODEL",
        flag="--model",
    )  # fmt: skip
    home: Path = setting(
        help="models, calibrations and imports (default: $XDG_CACHE_HOME/mlxd or ~/.cache/mlxd)",
        kind="path", env="MLXD_HOME", default_factory=_default_home,
    )  # fmt: skip
    memory_budget: str | None = setting(
        None, help="cap mlxd's memory, e.g. 6GB (default: from the machine)",
        env="MLXD_MEMORY_BUDGET", flag="--memory-budget",
    )  # fmt: skip
    memory_reserve: float = setting(
        0.22, help="share of the machine's memory left to everything else, in [0, 1)",
        kind="float", env="MLXD_MEMORY_RESERVE",
    )  # fmt: skip
    queue_size: int = setting(
        DEFAULT_QUEUE_SIZE, help="requests waiting for a place in the batch before 503",
        kind="int", env="MLXD_QUEUE_SIZE", flag="--queue-size",
    )  # fmt: skip
    queue_timeout: float = setting(
        300.0, help="seconds a request may wait in the queue", kind="float",
        env="MLXD_QUEUE_TIMEOUT",
    )  # fmt: skip
    preload: bool = setting(
        False, help="load the default model at startup", kind="bool", env="MLXD_PRELOAD",
        flag="--preload",
    )  # fmt: skip
    keep_alive: str | None = setting(
        None, help="unload an idle model after this long, e.g. 10m (default: never)",
        env="MLXD_KEEP_ALIVE", flag="--keep-alive",
    )  # fmt: skip
    log_level: str = setting(
        "info", help="log level", env="MLXD_LOG_LEVEL", flag="--log-level",
        choices=("debug", "info", "warning", "error"),
    )  # fmt: skip
    log_format: str = setting(
        "text", help="json: one JSON object per line (one per request)", env="MLXD_LOG_FORMAT",
        flag="--log-format", choices=("text", "json"),
    )  # fmt: skip
    prefix_cache_bytes: str | None = setting(
        None, help="bytes of KV cache kept for reuse, e.g. 2GB; 0 = off (default: from the budget)",
        env="MLXD_PREFIX_CACHE", flag="--prefix-cache",
    )  # fmt: skip
    max_concurrency: int = setting(
        DEFAULT_MAX_CONCURRENCY, help="most requests decoding together per model", kind="int",
        env="MLXD_MAX_CONCURRENCY", flag="--max-concurrency",
    )  # fmt: skip
    # Who may call (server.guard): keys, extra Host names, cross-origin pages allowed.
    api_keys: tuple[str, ...] = setting(
        (), help="require this key (repeatable, or comma-separated)", kind="list",
        env="MLXD_API_KEY", flag="--api-key", metavar="KEY",
    )  # fmt: skip
    api_key_file: Path | None = setting(
        None, help="file with one API key per line", kind="path", env="MLXD_API_KEY_FILE",
        flag="--api-key-file",
    )  # fmt: skip
    insecure_no_auth: bool = setting(
        False, help="allow a non-loopback --host without an API key", kind="bool",
        env="MLXD_INSECURE_NO_AUTH", flag="--insecure-no-auth",
    )  # fmt: skip
    allowed_hosts: tuple[str, ...] = setting(
        (), help="extra Host names to accept, comma-separated; '*' = any", kind="list",
        env="MLXD_ALLOWED_HOSTS", flag="--allowed-hosts", metavar="NAMES",
    )  # fmt: skip
    cors_origins: tuple[str, ...] = setting(
        (), help="web origins allowed to call, comma-separated (default: none)", kind="list",
        env="MLXD_CORS_ORIGINS", flag="--cors-origins", metavar="ORIGINS",
    )  # fmt: skip
    # How much and how slowly (server.limits, server.listener).
    max_body_bytes: int = setting(
        32 << 20, help="largest request body, e.g. 32MB", kind="size", env="MLXD_MAX_BODY_SIZE",
        flag="--max-body-size",
    )  # fmt: skip
    max_header_bytes: int = setting(
        64 << 10, help="largest request head (431 above)", kind="size",
        env="MLXD_MAX_HEADER_SIZE",
    )  # fmt: skip
    header_timeout: float = setting(
        10.0, help="seconds to send a request line and headers", kind="float",
        env="MLXD_HEADER_TIMEOUT", flag="--header-timeout",
    )  # fmt: skip
    body_timeout: float = setting(
        30.0, help="seconds of silence allowed between two body chunks", kind="float",
        env="MLXD_BODY_TIMEOUT", flag="--body-timeout",
    )  # fmt: skip
    max_connections: int | None = setting(
        None, help="open connections at once (default: from the open-file limit)", kind="int",
        env="MLXD_MAX_CONNECTIONS", flag="--max-connections",
    )  # fmt: skip
    drain_timeout: float = setting(
        30.0, help="on SIGTERM, seconds running requests get to finish", kind="float",
        env="MLXD_DRAIN_TIMEOUT", flag="--drain-timeout",
    )  # fmt: skip
    sse_ping_seconds: float = setting(
        5.0, help="seconds between keep-alive comments on a quiet stream", kind="float",
        env="MLXD_SSE_PING",
    )  # fmt: skip

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``MLXD_*`` variables, then explicit overrides (flags) on top.

        An override of None means "not given". Keys from ``api_key_file`` join ``api_keys``.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            option = f.metadata["option"]
            for var in option.env:
                raw = environ.get(var)
                if raw:
                    values[f.name] = _parse(option, raw, var)
                    break
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if settings.api_key_file is not None:
            keys = read_key_file(Path(settings.api_key_file).expanduser())
            settings = replace(settings, api_keys=(*settings.api_keys, *keys))
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse values no server can run with; the message names the setting."""
        if self.max_concurrency < 1:
            raise ConfigError(f"max concurrency must be >= 1: {self.max_concurrency}")
        if self.queue_size < 0:
            raise ConfigError(f"queue size must be >= 0: {self.queue_size}")
        if not 0 <= self.memory_reserve < 1:
            raise ConfigError(f"memory reserve must be in [0, 1): {self.memory_reserve}")
        if self.keep_alive is not None:
            try:
                parse_duration(self.keep_alive)
            except ValueError as exc:
                raise ConfigError(f"keep_alive: {exc}") from None
        if self.drain_timeout < 0:
            raise ConfigError(f"drain timeout must be >= 0: {self.drain_timeout}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max body size must be at least 1 KiB: {self.max_body_bytes}")

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


# ---- reading ----------------------------------------------------------------------------------


def _parse(option: Option, raw: str, source: str) -> Any:
    """One value from its text (a variable or a flag), ``source`` naming it in errors."""
    try:
        if option.kind == "int":
            return int(raw)
        if option.kind == "float":
            return float(raw)
        if option.kind == "bool":
            return raw.strip().lower() not in ("", "0", "false", "no", "off")
        if option.kind == "list":
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        if option.kind == "size":
            from mlxd.memory.sizes import parse_size

            return parse_size(raw)
        if option.kind == "path":
            return Path(raw).expanduser()
    except ValueError as exc:
        raise ConfigError(f"{source}={raw!r}: {exc}") from None
    if option.choices is not None and raw not in option.choices:
        raise ConfigError(f"{source}={raw!r}: choose one of {', '.join(option.choices)}")
    return raw


def read_key_file(path: Path) -> tuple[str, ...]:
    """API keys from a file: one per line; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    keys = tuple(
        s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("#")
    )
    if not keys:
        raise ConfigError(f"the API key file {path} holds no key")
    return keys


# ---- the command line -------------------------------------------------------------------------


def _options(names: Iterable[str]) -> list[tuple[str, Option, Any]]:
    by_name = {f.name: f for f in fields(Settings)}
    out = []
    for name in names:
        f = by_name[name]
        option = f.metadata["option"]
        assert option.flag is not None, f"{name} has no flag"
        default = f.default if f.default is not MISSING else None
        out.append((name, option, default))
    return out


def _flag_type(option: Option) -> Callable[[str], Any]:
    """argparse's ``type=``: the flag's text read as the setting reads it, or a usage error."""
    assert option.flag is not None
    flag = option.flag

    def read(raw: str) -> Any:
        try:
            return _parse(option, raw, flag)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return read


def add_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add the flags of these settings to ``parser``; help shows the default and variables."""
    for name, option, default in _options(names):
        extra = []
        if default not in (None, (), False) and option.kind != "size":
            extra.append(f"default {default}")
        if option.env:
            extra.append(" / ".join(option.env))
        text = option.help + (f" ({'; '.join(extra)})" if extra else "")
        assert option.flag is not None
        metavar = option.metavar or option.flag.lstrip("-").upper().replace("-", "_")
        if option.kind == "bool":
            parser.add_argument(option.flag, dest=name, action="store_true", default=None,
                                help=text)  # fmt: skip
        else:
            parser.add_argument(
                option.flag, dest=name, help=text, choices=option.choices,
                metavar=None if option.choices else metavar, type=_flag_type(option),
                action="append" if option.kind == "list" else "store",
            )  # fmt: skip


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the flags ``add_flags`` declared on this subcommand, over the environment."""
    overrides: dict[str, Any] = {}
    for f in fields(Settings):
        value = getattr(args, f.name, None)
        if value is None or f.metadata["option"].flag is None:
            continue
        if f.metadata["option"].kind == "list":  # one tuple per repeated flag
            value = tuple(item for part in value for item in part)
        overrides[f.name] = value
    return Settings.from_env(environ, **overrides)
