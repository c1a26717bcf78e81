"""The idempotency marker: a second import of the same source is a no-op."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

IMPORTER_VERSION = 2
MARKER_NAME = "mlxd-import.json"
_FINGERPRINT_SPAN = 1 << 20  # bytes hashed at each end of the source file


def source_fingerprint(path: Path) -> dict[str, Any]:
    """Identify a source file cheaply: its size and a hash of its first and last MiB.

    The head holds all metadata (so another model of the same size differs there); the tail holds
    tensor data. The mtime is left out so that re-extracting the same file does not reconvert.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(_FINGERPRINT_SPAN))
        f.seek(max(0, size - _FINGERPRINT_SPAN))
        digest.update(f.read(_FINGERPRINT_SPAN))
    return {"path": str(path.resolve()), "size": size, "sha256_ends": digest.hexdigest()}


def expected_marker(source: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    return {"importer": "mlxd.gguf", "version": IMPORTER_VERSION, "dtype": dtype, "source": source}


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((out_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def marker_matches(marker: Mapping[str, Any] | None, expected: Mapping[str, Any]) -> bool:
    """Whether an existing import came from the same source bytes, dtype and importer version.

    The source path is not compared: the same file moved elsewhere converts to the same model.
    """
    if marker is None:
        return False
    same_source = all(
        marker.get("source", {}).get(key) == expected["source"][key]
        for key in ("size", "sha256_ends")
    )
    settings = ("importer", "version", "dtype")
    same_settings = all(marker.get(key) == expected[key] for key in settings)
    return same_source and same_settings


def is_current(out_dir: Path, expected: Mapping[str, Any]) -> bool:
    """A complete import matching ``expected`` is at ``out_dir``."""
    marker = read_marker(out_dir)
    if not marker_matches(marker, expected):
        return False
    assert marker is not None
    return all((out_dir / name).is_file() for name in marker.get("files", ()))
