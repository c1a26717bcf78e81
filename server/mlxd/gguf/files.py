"""Small file-writing helpers shared by the importer's steps."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def temporary_sibling(path: Path) -> Path:
    """A unique hidden name next to ``path`` (same file system, so a rename is atomic).

    Created with plain mkdir/open rather than tempfile so the result gets the usual
    umask-derived permissions instead of tempfile's owner-only ones.
    """
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
