"""The GGUF importer on small synthetic files.

The files are written here from the GGUF specification (header, typed metadata, aligned tensor
data, and the Q8_0/Q4_0/Q4_1 block layouts), because ``mx.save_gguf`` writes float tensors only.
A tiny two-layer llama is built in Hugging Face layout, written the way llama.cpp's converter
writes it (GGUF names, Q/K rows permuted, weights quantized), imported, and loaded back with
mlx-lm: its logits must match the original model's.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.utils import load_model
from transformers import PreTrainedTokenizerFast

from server.errors import ModelLoadFailed
from server.gguf import (
    MARKER_NAME,
    GGUFImportError,
    build_config,
    extract_from_wheel,
    hf_name,
    import_gguf,
    read_header,
    resolve_dtype,
    unpermute_rows,
)

# --------------------------------------------------------------------------------------------
# A GGUF writer

# Metadata value types of the GGUF specification.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = range(10)
UINT64, INT64, FLOAT64 = 10, 11, 12
_FORMATS = {
    UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
    FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d",
}  # fmt: skip

# ggml tensor types.
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 3, 8, 12, 14, 30


@dataclass(frozen=True)
class Typed:
    """A metadata value with an explicit GGUF type; plain values get one inferred."""

    kind: int
    value: Any
    element: int | None = None  # for ARRAY


def _infer(value: Any) -> Typed:
    if isinstance(value, Typed):
        return value
    if isinstance(value, bool):
        return Typed(BOOL, value)
    if isinstance(value, int):
        return Typed(UINT32 if value >= 0 else INT32, value)
    if isinstance(value, float):
        return Typed(FLOAT32, value)
    if isinstance(value, str):
        return Typed(STRING, value)
    if isinstance(value, list):
        first = _infer(value[0]) if value else Typed(STRING, "")
        element = INT32 if first.kind == UINT32 else first.kind
        return Typed(ARRAY, value, element)
    raise TypeError(f"no GGUF type for {value!r}")


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _payload(typed: Typed) -> bytes:
    if typed.kind == STRING:
        return _string(typed.value)
    if typed.kind == ARRAY:
        assert typed.element is not None
        items = [v if isinstance(v, Typed) else Typed(typed.element, v) for v in typed.value]
        if typed.element == ARRAY:
            items = [_infer(v) for v in typed.value]
        head = struct.pack("<IQ", typed.element, len(items))
        return head + b"".join(
            struct.pack("<I", item.element) + _payload(item)[4:]
            if False
            else _payload(item)
            if typed.element != ARRAY
            else struct.pack("<IQ", item.element, len(item.value)) + _payload(item)[12:]
            for item in items
        )
    return struct.pack(_FORMATS[typed.kind], typed.value)


@dataclass(frozen=True)
class RawTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # rows first
    data: bytes


def write_gguf(
    path: Path, metadata: Mapping[str, Any], tensors: list[RawTensor], *, version: int = 3
) -> Path:
    alignment = metadata.get("general.alignment", 32)
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, value in metadata.items():
        typed = _infer(value)
        head += _string(key) + struct.pack("<I", typed.kind) + _payload(typed)
    data = b""
    for tensor in tensors:
        data += b"\0" * (-len(data) % alignment)
        head += _string(tensor.name) + struct.pack("<I", len(tensor.shape))
        head += struct.pack(f"<{len(tensor.shape)}Q", *reversed(tensor.shape))
        head += struct.pack("<IQ", tensor.ggml_type, len(data))
        data += tensor.data
    head += b"\0" * (-len(head) % alignment)
    path.write_bytes(head + data)
    return path
