"""The configured models: name resolution, local preparation and tokenizers.

A request's ``model`` must be a configured id or alias (or the router's ``auto``): the server never
loads a path or repository named by a client. Tokenizers are loaded on their own, without the
weights, so a prompt can be rendered and counted before the admission decision is made.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from mlxd.config import ModelEntry, ModelsFile
from mlxd.errors import ModelLoadFailed, ModelNotFound
from mlxd.estimate.files import read_config
from mlxd.sources import ModelSources

log = logging.getLogger("mlxd.registry")


class Registry:
    def __init__(self, models: ModelsFile, sources: ModelSources) -> None:
        self.models = models
        self.sources = sources
        self._by_name: dict[str, ModelEntry] = {}
        for entry in models.models:
            for name in entry.names:
                self._by_name[name] = entry
        self._tokenizers: dict[str, Any] = {}
        self._configs: dict[str, dict[str, Any]] = {}
        self._generation: dict[str, dict[str, Any]] = {}
        self._prepared: dict[str, Path] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def entries(self) -> list[ModelEntry]:
        return list(self.models.models)

    @property
    def default(self) -> ModelEntry:
        name = self.models.default or self.models.models[0].id
        return self._by_name[name]

    def get(self, name: str) -> ModelEntry:
        entry = self._by_name.get(name)
        if entry is None:
            raise ModelNotFound(name, [e.id for e in self.models.models])
        return entry

    def model_dir(self, entry: ModelEntry) -> Path:
        return self._prepared.get(entry.id) or self.sources.model_dir(entry)

    def is_present(self, entry: ModelEntry) -> bool:
        return entry.id in self._prepared or self.sources.is_present(entry)

    async def prepare(self, entry: ModelEntry) -> Path:
        """Download/import the entry once (concurrent callers share the work)."""
        if entry.id in self._prepared:
            return self._prepared[entry.id]
        lock = self._locks.setdefault(entry.id, asyncio.Lock())
        async with lock:
            if entry.id not in self._prepared:
                path = await asyncio.to_thread(self.sources.prepare, entry)
                self._prepared[entry.id] = path
        return self._prepared[entry.id]

    def prepare_sync(self, entry: ModelEntry, *, progress: bool = True) -> Path:
        path = self.sources.prepare(entry, progress=progress)
        self._prepared[entry.id] = path
        return path

    async def tokenizer(self, entry: ModelEntry) -> Any:
        cached = self._tokenizers.get(entry.id)
        if cached is not None:
            return cached
        path = await self.prepare(entry)
        tokenizer = await asyncio.to_thread(load_tokenizer, path, entry.id)
        self._tokenizers[entry.id] = tokenizer
        return tokenizer

    def generation_defaults(self, entry: ModelEntry) -> dict[str, Any]:
        """Sampling defaults the model ships in generation_config.json (empty if none)."""
        cached = self._generation.get(entry.id)
        if cached is not None:
            return cached
        path = self._prepared.get(entry.id)
        if path is None:
            return {}
        try:
            data = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        self._generation[entry.id] = data if isinstance(data, dict) else {}
        return self._generation[entry.id]

    async def config(self, entry: ModelEntry) -> dict[str, Any]:
        cached = self._configs.get(entry.id)
        if cached is None:
            cached = read_config(await self.prepare(entry), entry.id)
            self._configs[entry.id] = cached
        return cached


def load_tokenizer(path: Path, model_id: str) -> Any:
    """The mlx-lm tokenizer wrapper with the EOS ids the model's config declares."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    config = read_config(path, model_id)
    eos = config.get("eos_token_id")
    try:
        return mlx_load_tokenizer(path, eos_token_ids=eos)
    except Exception as exc:
        raise ModelLoadFailed(
            f"model {model_id!r}: cannot load its tokenizer from {path}: {exc}"
        ) from exc
