"""Tensors: read with ``mx.load``, converted to the chosen dtype, written as safetensors shards.

``mx.load`` keeps Q4_0/Q4_1/Q8_0 in MLX's affine quantized layout (group size 32) and cannot
decode K-quants or IQ types; those are refused up front by the header check.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
from tqdm import tqdm

from mlxd.gguf.files import json_text
from mlxd.gguf.names import hf_module_name, permutation_heads, split_name, unpermute_rows

GROUP_SIZE = 32  # the block size of every GGUF quant type mx.load keeps quantized

DTYPES = ("float32", "float16", "bfloat16", "quantized")
FLOAT_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# A single safetensors file stays below this; larger models are split the way mlx-lm splits them,
# which also bounds the converted tensors held in memory at once.
SHARD_BYTES = 5 << 30


def resolve_dtype(dtype: str | None, device: mx.Device | None = None) -> str:
    """The dtype to write: the requested one, or the one fast on ``device`` when None.

    MLX's CPU kernels are slow on quantized matrices with float16 scales, so the CPU gets plain
    float32; GPU backends keep the file's quantized tensors quantized.
    """
    if dtype is None:
        device = device if device is not None else mx.default_device()
        return "float32" if device.type == mx.cpu else "quantized"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


def quant_bits(weight: mx.array, scales: mx.array) -> int:
    """Bits per value of an MLX-packed affine matrix with group size ``GROUP_SIZE``."""
    in_features = scales.shape[-1] * GROUP_SIZE
    return weight.shape[-1] * 32 // in_features


def _pieces(tensors: Mapping[str, mx.array]) -> dict[str, dict[str, mx.array]]:
    grouped: dict[str, dict[str, mx.array]] = {}
    for name, array in tensors.items():
        base, suffix = split_name(name)
        grouped.setdefault(base, {})[suffix] = array
    return grouped


def convert_tensors(
    tensors: Mapping[str, mx.array], config: Mapping[str, Any], dtype: str
) -> Iterator[tuple[str, mx.array]]:
    """Yield ``(hf_name, array)`` for the model, lazily: rename, un-permute, (de)quantize."""
    target = mx.float16 if dtype == "quantized" else FLOAT_DTYPES[dtype]
    for base, pieces in sorted(_pieces(tensors).items()):
        module = hf_module_name(base)
        heads = permutation_heads(base, config)
        if heads is not None:
            pieces = {suffix: unpermute_rows(a, heads) for suffix, a in pieces.items()}
        if "scales" in pieces:
            weight, scales = pieces.pop("weight"), pieces.pop("scales")
            biases = pieces.pop("biases")
            if dtype == "quantized":
                yield f"{module}.weight", weight
                yield f"{module}.scales", scales.astype(mx.float16)
                yield f"{module}.biases", biases.astype(mx.float16)
            else:
                dense = mx.dequantize(
                    weight,
                    scales.astype(mx.float32),
                    biases.astype(mx.float32),
                    group_size=GROUP_SIZE,
                    bits=quant_bits(weight, scales),
                )
                yield f"{module}.weight", dense.astype(target)
        for suffix, array in pieces.items():
            yield f"{module}.{suffix}", array.astype(target)


def quantization_config(tensors: Mapping[str, mx.array]) -> dict[str, Any] | None:
    """mlx-lm's ``quantization`` entry: the commonest bit width, plus per-module exceptions."""
    bits = {
        hf_module_name(base): quant_bits(pieces["weight"], pieces["scales"])
        for base, pieces in _pieces(tensors).items()
        if "scales" in pieces
    }
    if not bits:
        return None
    default = Counter(bits.values()).most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default}
    for module, width in sorted(bits.items()):
        if width != default:
            config[module] = {"group_size": GROUP_SIZE, "bits": width}
    return config


def write_weights(
    dest: Path,
    converted: list[tuple[str, mx.array]],
    progress: bool,
    shard_bytes: int = SHARD_BYTES,
) -> list[str]:
    """Evaluate and save the (lazy) converted tensors in shards; returns the file names written.

    Entries are popped off ``converted`` and a shard is dropped once saved, so each converted
    array is freed after its shard is on disk.
    """
    shard_names: list[list[str]] = []  # tensor names per saved shard
    shard: dict[str, mx.array] = {}
    size = 0

    def flush(tensors: dict[str, mx.array]) -> None:
        path = dest / f".shard-{len(shard_names)}.safetensors"
        mx.save_safetensors(str(path), tensors, metadata={"format": "mlx"})
        shard_names.append(sorted(tensors))

    bar = tqdm(
        total=len(converted),
        desc="converting",
        unit="tensor",
        file=sys.stderr,
        disable=not progress,
    )
    converted.reverse()
    with bar:
        while converted:
            name, array = converted.pop()
            mx.eval(array)
            if shard and size + array.nbytes > shard_bytes:
                flush(shard)
                shard, size = {}, 0
            shard[name] = array
            size += array.nbytes
            bar.update(1)
        flush(shard)

    count = len(shard_names)
    if count == 1:
        (dest / ".shard-0.safetensors").rename(dest / "model.safetensors")
        return ["model.safetensors"]
    files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for i, file in enumerate(files):
        (dest / f".shard-{i}.safetensors").rename(dest / file)
    weight_map = {
        name: file for file, names in zip(files, shard_names, strict=True) for name in names
    }
    index = {"metadata": {}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json_text(index))
    return [*files, "model.safetensors.index.json"]
