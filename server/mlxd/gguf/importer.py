"""Import a GGUF file into an MLX model directory.

The result is written into a temporary directory next to the destination and renamed into place,
with a marker file that makes a second import of the same source a no-op.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxd.errors import GGUFImportError
from mlxd.gguf.files import json_text, temporary_sibling
from mlxd.gguf.header import check_tensor_data, check_tensor_types, read_header
from mlxd.gguf.hfconfig import build_config, build_generation_config
from mlxd.gguf.marker import (
    MARKER_NAME,
    expected_marker,
    is_current,
    read_marker,
    source_fingerprint,
)
from mlxd.gguf.tokenizer import build_tokenizer_files
from mlxd.gguf.weights import (
    SHARD_BYTES,
    convert_tensors,
    quantization_config,
    resolve_dtype,
    write_weights,
)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse a destination that holds something other than an earlier import."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise GGUFImportError(f"{out_dir} exists and is not a directory")
    if read_marker(out_dir) is None and any(out_dir.iterdir()):
        raise GGUFImportError(
            f"{out_dir} exists and is not a GGUF import; refusing to overwrite it"
        )


def _install(tmp: Path, out_dir: Path, expected: Mapping[str, Any]) -> None:
    """Move a finished import into place, replacing only a stale import or an empty directory."""
    old: Path | None = None
    if out_dir.exists():
        if is_current(out_dir, expected):  # another process finished the same import first
            return
        _check_replaceable(out_dir)  # again: it may have appeared during the conversion
        old = temporary_sibling(out_dir)
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        if not is_current(out_dir, expected):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def import_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    dtype: str | None = None,
    progress: bool = True,
    max_shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Convert a GGUF file into an mlx-lm model directory at ``out_dir`` and return it.

    ``dtype`` None picks the dtype fast on the active MLX device (see ``resolve_dtype``). A
    complete earlier import of the same source with the same dtype is reused as is. Weights are
    split into safetensors files of at most about ``max_shard_bytes`` each.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    resolved = resolve_dtype(dtype)
    if not gguf_path.is_file():
        raise GGUFImportError(f"GGUF file {gguf_path} does not exist")
    expected = expected_marker(source_fingerprint(gguf_path), resolved)
    if is_current(out_dir, expected):
        return out_dir

    _check_replaceable(out_dir)
    header = read_header(gguf_path)
    check_tensor_types(header, gguf_path)
    check_tensor_data(header, gguf_path)
    config = build_config(header.metadata, {info.name for info in header.tensors})
    tokenizer_files = build_tokenizer_files(header.metadata, config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out_dir)
    tmp.mkdir()
    try:
        try:
            tensors = mx.load(str(gguf_path))
        except (RuntimeError, ValueError) as e:
            raise GGUFImportError(f"MLX cannot read {gguf_path}: {e}") from e
        assert isinstance(tensors, dict)
        if resolved == "quantized" and (quantization := quantization_config(tensors)):
            config["quantization"] = quantization
        converted = list(convert_tensors(tensors, config, resolved))
        del tensors
        files = write_weights(tmp, converted, progress, max_shard_bytes)

        documents = {
            "config.json": json_text(config),
            "generation_config.json": json_text(build_generation_config(config)),
            **tokenizer_files,
        }
        for name, text in documents.items():
            (tmp / name).write_text(text, encoding="utf-8")
        marker = {**expected, "files": sorted([*files, *documents])}
        (tmp / MARKER_NAME).write_text(json_text(marker))  # written last: it vouches for the rest
        _install(tmp, out_dir, expected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
