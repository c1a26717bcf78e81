"""The GGUF header: metadata and the tensor table, parsed without loading any tensor.

The tensor types, and that every tensor lies inside the file (a truncated download), are
checked here before anything is loaded.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from mlxd.errors import GGUFImportError

# ggml tensor type ids (from the GGUF specification) and the subset mx.load decodes faithfully.
# BF16 is left out on purpose: mx.load converts it to float16, which overflows above 65504.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip
# (values per block, bytes per block) of the types mx.load decodes faithfully.
_BLOCK_LAYOUT = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34)}
SUPPORTED_GGML_TYPES = frozenset(_BLOCK_LAYOUT)
_DEFAULT_ALIGNMENT = 32  # where tensor data starts, unless general.alignment says otherwise


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of a GGUF tensor table; ``shape`` is in MLX/numpy order (rows first).

    ``offset`` counts from the start of the file's tensor data section.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.ggml_type, f"type {self.ggml_type}")


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]
    data_offset: int  # where the tensor data section starts in the file
    file_size: int


# GGUF metadata value types: fixed-size scalars by struct format, plus 8 (string) and 9 (array).
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6


class _Reader:
    """Sequential little-endian reads over a memory-mapped file."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer = buffer
        self.pos = 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        raw = self.buffer[self.pos : self.pos + length]
        if len(raw) != length:
            raise struct.error("string runs past the end of the file")
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            element_type, count = self.unpack("<IQ")
            if element_type in (_STRING, _ARRAY):
                return [self.value(element_type) for _ in range(count)]
            if element_type not in _SCALAR_FORMATS:
                raise GGUFImportError(
                    f"unsupported GGUF metadata array element type {element_type}"
                )
            values = np.frombuffer(
                self.buffer,
                dtype=np.dtype(_SCALAR_FORMATS[element_type]),
                count=count,
                offset=self.pos,
            )
            self.pos += values.nbytes
            return values.tolist()
        if value_type not in _SCALAR_FORMATS:
            raise GGUFImportError(f"unsupported GGUF metadata value type {value_type}")
        (value,) = self.unpack(_SCALAR_FORMATS[value_type])
        if value_type == _FLOAT32:
            # The shortest decimal that round-trips the float32 (1e-05, not 9.999999747378752e-06).
            return float(str(np.float32(value)))
        return value


def read_header(path: Path) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table without reading tensor data."""
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as e:
        raise GGUFImportError(f"cannot read GGUF file {path}: {e.strerror or e}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise GGUFImportError(f"{path} is too small to be a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            if buffer[:4] != b"GGUF":
                raise GGUFImportError(f"{path} is not a GGUF file (no GGUF magic bytes)")
            reader = _Reader(buffer)
            reader.pos = 4
            try:
                version, tensor_count, kv_count = reader.unpack("<IQQ")
                if version not in (2, 3):
                    raise GGUFImportError(f"{path} is GGUF version {version}; supported: 2, 3")
                metadata: dict[str, Any] = {}
                for _ in range(kv_count):
                    key = reader.string()
                    (value_type,) = reader.unpack("<I")
                    metadata[key] = reader.value(value_type)
                tensors = []
                for _ in range(tensor_count):
                    name = reader.string()
                    (ndim,) = reader.unpack("<I")
                    dims = reader.unpack(f"<{ndim}Q")
                    ggml_type, offset = reader.unpack("<IQ")
                    # ggml lists dimensions fastest-varying first.
                    tensors.append(GGUFTensor(name, tuple(reversed(dims)), ggml_type, offset))
            except (struct.error, ValueError, OverflowError, RecursionError) as e:
                raise GGUFImportError(f"{path} is truncated or corrupt: {e}") from e
            alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
            if not isinstance(alignment, int) or alignment <= 0:
                raise GGUFImportError(f"{path} has an invalid general.alignment {alignment!r}")
            data_offset = -(-reader.pos // alignment) * alignment
    return GGUFHeader(version, metadata, tuple(tensors), data_offset, size)


def check_tensor_types(header: GGUFHeader, path: Path) -> None:
    """Refuse files whose tensor types mx.load cannot decode, naming the types found."""
    unsupported: dict[str, str] = {}
    for info in header.tensors:
        if info.ggml_type not in SUPPORTED_GGML_TYPES:
            unsupported.setdefault(info.type_name, info.name)
    if unsupported:
        found = ", ".join(f"{kind} (e.g. {name})" for kind, name in sorted(unsupported.items()))
        supported = ", ".join(GGML_TYPE_NAMES[t] for t in sorted(SUPPORTED_GGML_TYPES))
        raise GGUFImportError(
            f"{path} holds tensors of types MLX's GGUF reader cannot decode: {found}. "
            f"Supported tensor types: {supported}. Use a Q8_0, Q4_0, Q4_1 or F16 GGUF of this "
            f"model, or its safetensors release."
        )


def check_tensor_data(header: GGUFHeader, path: Path) -> None:
    """Refuse a file whose tensor table points past its end (an incomplete download).

    Only for tensor types that passed ``check_tensor_types``. Checked up front so a truncated
    file fails before any conversion work, with a message that says what is wrong.
    """
    for info in header.tensors:
        per_block, block_bytes = _BLOCK_LAYOUT[info.ggml_type]
        if not info.shape or info.shape[-1] % per_block:
            raise GGUFImportError(
                f"{path} is corrupt: tensor {info.name!r} of type {info.type_name} has shape "
                f"{info.shape}, whose rows are not whole blocks of {per_block}"
            )
        end = header.data_offset + info.offset + prod(info.shape) // per_block * block_bytes
        if end > header.file_size:
            raise GGUFImportError(
                f"{path} is truncated: tensor {info.name!r} ends at byte {end} but the file has "
                f"{header.file_size} bytes. Download it again."
            )
