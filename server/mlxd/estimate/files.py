"""A model's files as the estimate reads them: safetensors headers and ``config.json``.

Nothing here loads a tensor. The weights are the tensor bytes that the safetensors headers
declare (an 8-byte length, then a JSON header; ``mx.load`` allocates exactly that).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxd.errors import ModelLoadFailed
from mlxd.estimate.architecture import text_config

# Weights mlx-lm's ``sanitize`` drops before anything is evaluated, so they never occupy
# memory: vision/audio towers of VLM checkpoints and multi-token-prediction heads.
DROPPED_WEIGHT_PREFIXES = (
    "vision_tower",
    "model.visual",
    "visual.",
    "multi_modal_projector",
    "audio_tower",
    "mtp.",
    "model.mtp.",
)

SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "F8_E8M0": 1,
}  # fmt: skip
_FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
_CONFIG_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
_MAX_HEADER_BYTES = 100 * 1024**2  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a ``.safetensors`` file declares, read from its header only."""
    try:
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ModelLoadFailed(f"{path} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw_len)
            if length > _MAX_HEADER_BYTES:
                raise ModelLoadFailed(f"{path} has an implausible header length {length}")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise ModelLoadFailed(f"cannot read {path}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadFailed(f"{path} has a corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelLoadFailed(f"{path} has a corrupt safetensors header")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            info = TensorInfo(str(entry["dtype"]), tuple(entry["shape"]), end - start)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadFailed(f"{path}: bad header entry for {name!r}") from exc
        itemsize = SAFETENSORS_DTYPE_BYTES.get(info.dtype)
        if itemsize is not None and info.nbytes != math.prod(info.shape) * itemsize:
            raise ModelLoadFailed(f"{path}: {name!r} declares {info.nbytes} bytes for its shape")
        tensors[name] = info
    return tensors


def weight_files(model_dir: Path) -> list[Path]:
    """The files mlx-lm loads (every ``model*.safetensors``), checked against the index."""
    files = sorted(model_dir.glob("model*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadFailed(f"{index} is unreadable: {exc}") from exc
        missing = sorted({str(v) for v in weight_map.values()} - {p.name for p in files})
        if missing:
            raise ModelLoadFailed(
                f"{model_dir} is incomplete: the index lists {', '.join(missing)}, "
                "which is not there"
            )
    if not files:
        raise ModelLoadFailed(f"no model*.safetensors files in {model_dir}")
    return files


def model_tensors(
    model_dir: Path, config: Mapping[str, Any] | None = None
) -> dict[str, TensorInfo]:
    """Every tensor mlx-lm will keep, by name, from all shards."""
    tied = bool(text_config(config or {}).get("tie_word_embeddings"))
    tensors: dict[str, TensorInfo] = {}
    for path in weight_files(model_dir):
        for name, info in read_safetensors_header(path).items():
            if name.startswith(DROPPED_WEIGHT_PREFIXES):
                continue
            if tied and name.rpartition(".")[0].endswith("lm_head"):
                continue  # tied models reuse the embedding; mlx-lm drops a stored copy
            tensors[name] = info
    return tensors


def read_config(model_dir: Path, model_id: str | None = None) -> dict[str, Any]:
    """A model directory's ``config.json``; errors name ``model_id`` when it is given."""
    who = f"model {model_id!r}: " if model_id is not None else ""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadFailed(f"{who}cannot read {model_dir / 'config.json'}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadFailed(f"{who}{model_dir / 'config.json'} is not a JSON object")
    return config


def weights_bytes(model_dir: Path | str) -> int:
    """Bytes the weights occupy once loaded: the sum of the declared tensor sizes."""
    path = Path(model_dir)
    config = read_config(path) if (path / "config.json").exists() else None
    return sum(t.nbytes for t in model_tensors(path, config).values())


def activation_dtype_bytes(
    tensors: Mapping[str, TensorInfo], config: Mapping[str, Any] | None = None
) -> int:
    """Bytes per element of the activations (and so of the KV cache).

    mlx-lm computes in the dtype of the token embedding: its own dtype when it is float,
    its scales' dtype when it is quantized. The config's ``torch_dtype``/``dtype`` is only
    the fallback, since converted models often differ from it (float32 scales, say).
    """
    for name, info in tensors.items():
        if name.endswith("embed_tokens.weight"):
            if info.dtype in _FLOAT_DTYPES:
                return _FLOAT_DTYPES[info.dtype]
            scales = tensors.get(name.removesuffix("weight") + "scales")
            if scales is not None and scales.dtype in _FLOAT_DTYPES:
                return _FLOAT_DTYPES[scales.dtype]
    return config_dtype_bytes(config or {})


def config_dtype_bytes(config: Mapping[str, Any]) -> int:
    text = text_config(config)
    for key in ("torch_dtype", "dtype"):
        value = text.get(key) or config.get(key)
        if isinstance(value, str) and value in _CONFIG_DTYPES:
            return _CONFIG_DTYPES[value]
    return 2
