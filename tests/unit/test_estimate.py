"""The memory estimate: weights from safetensors headers, KV cache from config.json (sizes
worked out by hand below), and the simulated peak of a request."""

from __future__ import annotations

import importlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from mlxd.errors import ModelLoadFailed
from mlxd.estimate.architecture import HONOURS_MAX_KV_SIZE, Architecture, LayerKind
from mlxd.estimate.files import (
    TensorInfo,
    activation_dtype_bytes,
    read_safetensors_header,
    weights_bytes,
)
from mlxd.estimate.kv import kv_bytes, kv_bytes_per_token, kv_element_bytes
from mlxd.estimate.request import ModelProfile, estimate_request

CONFIGS = Path(__file__).parents[1] / "fixtures" / "configs"
GIB = 1024**3


def config(name: str) -> dict[str, Any]:
    return json.loads((CONFIGS / f"{name}.json").read_text())


# --------------------------------------------------------------------------- KV per token


@pytest.mark.parametrize(
    ("name", "kv_bits", "dtype_bytes", "expected"),
    [
        # 36 layers × 2 (K, V) × 8 KV heads × head_dim 128 × 2 bytes
        pytest.param("qwen3-8b", None, 2, 36 * 2 * 8 * 128 * 2, id="qwen3-8b"),  # 147,456
        # 8-bit: 1 byte + (scale + bias) × 2 bytes / 64 per element = 1.0625 bytes
        pytest.param("qwen3-8b", 8, 2, 36 * 2 * 8 * 128 * 17 // 16, id="qwen3-8b-kv8"),  # 78,336
        # 4-bit: 0.5 + 0.0625 = 0.5625 bytes per element
        pytest.param("qwen3-8b", 4, 2, 36 * 2 * 8 * 128 * 9 // 16, id="qwen3-8b-kv4"),  # 41,472
        # MoE changes nothing for attention: 48 × 2 × 4 × 128 × 2
        pytest.param("qwen3-30b-a3b", None, 2, 48 * 2 * 4 * 128 * 2, id="qwen3-30b-a3b"),
        # no head_dim key: 4096 / 32 heads = 128; 32 × 2 × 8 × 128 × 2 = 131,072
        pytest.param("llama-3.1-8b-instruct", None, 2, 32 * 2 * 8 * 128 * 2, id="llama-3.1-8b"),
        # 26 layers, every 6th global (layers 5, 11, 17, 23): 4 × 2 × 1 × 256 × 2 = 4,096
        pytest.param("gemma-3-1b-it", None, 2, 4 * 2 * 1 * 256 * 2, id="gemma-3-1b"),
        # 34 layers → globals 5, 11, 17, 23, 29; heads from mlx-lm's defaults (8 / 4 KV)
        pytest.param("gemma-3-4b-it", None, 2, 5 * 2 * 4 * 256 * 2, id="gemma-3-4b-vlm"),
        # 64 layers, full attention every 4th: 16 × 2 × 4 × 256 × 2 = 65,536
        pytest.param("qwen3.6-27b", None, 2, 16 * 2 * 4 * 256 * 2, id="qwen3.6-27b-hybrid"),
        # 40 layers → 10 full: 10 × 2 × 2 × 256 × 2 = 20,480
        pytest.param("qwen3.6-35b-a3b", None, 2, 10 * 2 * 2 * 256 * 2, id="qwen3.6-35b-a3b"),
        # float32 weights → float32 cache: 30 × 2 × 3 × 64 × 4 = 46,080
        pytest.param("smollm2-135m-instruct", None, 4, 30 * 2 * 3 * 64 * 4, id="smollm2-f32"),
    ],
)
def test_kv_bytes_per_token(
    name: str, kv_bits: int | None, dtype_bytes: int, expected: int
) -> None:
    assert kv_bytes_per_token(config(name), kv_bits, dtype_bytes) == expected


@pytest.mark.parametrize(
    ("name", "full", "sliding", "linear", "window"),
    [
        pytest.param("qwen3-8b", 36, 0, 0, None, id="dense"),
        pytest.param("gemma-3-1b-it", 4, 22, 0, 512, id="gemma-1b"),
        pytest.param("gemma-3-4b-it", 5, 29, 0, 1024, id="gemma-4b"),
        pytest.param("qwen3.6-27b", 16, 0, 48, None, id="qwen3.6-27b"),
        pytest.param("qwen3.6-35b-a3b", 10, 0, 30, None, id="qwen3.6-35b"),
    ],
)
def test_layer_layout(name: str, full: int, sliding: int, linear: int, window: int | None) -> None:
    arch = Architecture.from_config(config(name))
    counts = (arch.count(LayerKind.FULL), arch.count(LayerKind.SLIDING))
    assert (*counts, arch.count(LayerKind.LINEAR)) == (full, sliding, linear)
    assert arch.sliding_window == window


def test_hybrid_layout_agrees_with_layer_types() -> None:
    text = config("qwen3.6-27b")["text_config"]
    arch = Architecture.from_config(config("qwen3.6-27b"))
    assert [kind.value for kind in arch.layers] == text["layer_types"]


def test_vlm_text_config_is_read() -> None:
    arch = Architecture.from_config(config("gemma-3-4b-it"))
    assert (arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (
        2560,
        8,
        4,
        256,
    )
    assert arch.vocab_size == 262208  # the VLM wrapper's vocabulary, not the text default


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("qwen3-8b", 12288, id="dense"),
        # 8 routed experts × (768 + a copy of the 2048 hidden state)
        pytest.param("qwen3-30b-a3b", 8 * (768 + 2048), id="moe"),
        # plus the shared expert's 512
        pytest.param("qwen3.6-35b-a3b", 8 * (512 + 2048) + 512, id="moe-shared"),
    ],
)
def test_mlp_width(name: str, expected: int) -> None:
    assert Architecture.from_config(config(name)).mlp_width == expected


def test_sliding_layer_types_only_where_mlx_lm_rotates() -> None:
    base = config("qwen3-8b") | {"sliding_window": 4096}
    base["layer_types"] = ["sliding_attention", "full_attention"] * 18
    # Qwen3 in mlx-lm gives every layer a full cache, whatever layer_types says …
    assert Architecture.from_config(base).count(LayerKind.SLIDING) == 0
    # … Llama honours it.
    llama = base | {"model_type": "llama"}
    assert Architecture.from_config(llama).count(LayerKind.SLIDING) == 18


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        pytest.param({"num_hidden_layers": None}, "num_hidden_layers", id="no-layers"),
        pytest.param({"hidden_size": "4096"}, "hidden_size", id="string"),
        pytest.param({"vocab_size": 0}, "vocab_size", id="zero-vocab"),
    ],
)
def test_bad_config(mutation: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadFailed, match=message):
        Architecture.from_config(config("qwen3-8b") | mutation)


def test_hybrid_without_linear_shape_is_rejected() -> None:
    broken = config("qwen3.6-27b")
    del broken["text_config"]["linear_num_value_heads"]
    with pytest.raises(ModelLoadFailed, match="linear_num_value_heads"):
        Architecture.from_config(broken)


@pytest.mark.parametrize(
    ("kv_bits", "head_dim", "message"),
    [
        pytest.param(7, 128, "kv_bits", id="bits"),
        pytest.param(4, 80, "multiple", id="head-dim-not-grouped"),
    ],
)
def test_kv_element_bytes_rejects(kv_bits: int, head_dim: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kv_element_bytes(kv_bits, 2, head_dim)


# --------------------------------------------------------------------------- KV by length

QWEN3_8B_SLOT = 147_456  # bytes per token slot, all layers


@pytest.mark.parametrize(
    ("name", "tokens", "kwargs", "expected"),
    [
        # mlx-lm's KVCache allocates 256 token slots at a time.
        pytest.param("qwen3-8b", 1, {}, 256 * QWEN3_8B_SLOT, id="one-token-one-step"),
        pytest.param("qwen3-8b", 256, {}, 256 * QWEN3_8B_SLOT, id="256-one-step"),
        pytest.param("qwen3-8b", 257, {}, 512 * QWEN3_8B_SLOT, id="257-two-steps"),
        # 32k tokens = 128 steps: 32768 × 147,456 = 4.5 GiB
        pytest.param("qwen3-8b", 32768, {}, 4608 * 1024**2, id="32k-4.5GiB"),
        # max_kv_size gives Qwen3 a rotating cache of that size
        pytest.param(
            "qwen3-8b", 10_000, {"max_kv_size": 4096}, 4096 * QWEN3_8B_SLOT, id="max-kv-size-caps"
        ),
        # … but mlx-lm's Llama builds its own caches and ignores it (256-step rounding)
        pytest.param(
            "llama-3.1-8b-instruct",
            10_000,
            {"max_kv_size": 4096},
            10_240 * 131_072,
            id="llama-ignores-max-kv-size",
        ),
        # kv_bits starts at 5000 tokens (mlx-lm's quantized_kv_start) …
        pytest.param("qwen3-8b", 4096, {"kv_bits": 4}, 4096 * QWEN3_8B_SLOT, id="kv4-before-start"),
        # … and then covers the whole allocation: ⌈20,000 / 256⌉ = 79 steps = 20,224 slots
        pytest.param("qwen3-8b", 20_000, {"kv_bits": 4}, 20_224 * 41_472, id="kv4-after-start"),
        # Gemma-3-1B at 10k tokens: 4 global layers × 10,240 slots × (2 × 1 × 256 × 2)
        # + 22 sliding layers × 512 window × 1,024 = 41,943,040 + 11,534,336
        pytest.param("gemma-3-1b-it", 10_000, {}, 41_943_040 + 11_534_336, id="gemma-1b-10k"),
        # below the window the sliding layers still grow by 256-token steps up to it:
        # 300 tokens → 512 slots everywhere: 4 × 512 × 1,024 + 22 × 512 × 1,024
        pytest.param("gemma-3-1b-it", 300, {}, 26 * 512 * 1024, id="gemma-1b-300"),
        # Gemma-3-4B at 8k: 5 × 8,192 × 4,096 + 29 × 1,024 × 4,096
        pytest.param("gemma-3-4b-it", 8192, {}, 167_772_160 + 121_634_816, id="gemma-4b-8k"),
        # Qwen3.6-27B at 32k: 16 full layers × 32,768 × (2 × 4 × 256 × 2)
        # + 48 linear layers × (conv 3 × (2·16·128 + 48·128) × 2 + state 48 × 128 × 128 × 4)
        # = 2,147,483,648 + 48 × (61,440 + 3,145,728)
        pytest.param(
            "qwen3.6-27b", 32768, {}, 2_147_483_648 + 48 * 3_207_168, id="qwen3.6-27b-32k"
        ),
        # Qwen3.6-35B-A3B at 1k: 10 × 1,024 × 2,048 + 30 × (3 × 8,192 × 2 + 32 × 128 × 128 × 4)
        pytest.param("qwen3.6-35b-a3b", 1000, {}, 20_971_520 + 30 * 2_146_304, id="qwen3.6-35b-1k"),
    ],
)
def test_kv_bytes(name: str, tokens: int, kwargs: dict[str, Any], expected: int) -> None:
    assert kv_bytes(config(name), tokens, **kwargs) == expected


def test_kv_bits_cannot_combine_with_a_rotating_cache() -> None:
    with pytest.raises(ValueError, match="rotating"):
        kv_bytes(config("qwen3-8b"), 100, kv_bits=4, max_kv_size=1024)


# --------------------------------------------------------------------------- weights


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], int]]) -> None:
    """A real safetensors file: header + zero-filled data (name → dtype, shape, itemsize)."""
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, (dtype, shape, itemsize) in tensors.items():
        size = itemsize
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_read_safetensors_header(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"a.weight": ("BF16", [3, 4], 2), "a.scales": ("F32", [3], 4)})
    assert read_safetensors_header(path) == {
        "a.weight": TensorInfo("BF16", (3, 4), 24),
        "a.scales": TensorInfo("F32", (3,), 12),
    }


def test_weights_bytes_sharded(tmp_path: Path) -> None:
    write_safetensors(
        tmp_path / "model-00001-of-00002.safetensors",
        {"model.embed_tokens.weight": ("BF16", [1000, 64], 2)},  # 128,000
    )
    write_safetensors(
        tmp_path / "model-00002-of-00002.safetensors",
        {
            "model.layers.0.mlp.up_proj.weight": ("U32", [128, 8], 4),  # 4,096 (4-bit packed)
            "model.layers.0.mlp.up_proj.scales": ("BF16", [128, 1], 2),  # 256
            "model.layers.0.mlp.up_proj.biases": ("BF16", [128, 1], 2),  # 256
        },
    )
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                    "model.layers.0.mlp.up_proj.weight": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    assert weights_bytes(tmp_path) == 128_000 + 4_096 + 256 + 256


def test_weights_bytes_leaves_out_what_mlx_lm_drops(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    write_safetensors(
        tmp_path / "model.safetensors",
        {
            "model.embed_tokens.weight": ("F16", [100, 8], 2),  # 1,600: kept
            "lm_head.weight": ("F16", [100, 8], 2),  # tied: mlx-lm reuses the embedding
            "vision_tower.blocks.0.weight": ("F16", [64, 64], 2),  # VLM tower, never loaded
            "mtp.layers.0.weight": ("F16", [64, 64], 2),  # multi-token prediction head
        },
    )
    assert weights_bytes(tmp_path) == 1_600


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        pytest.param("empty", "no model", id="no-files"),
        pytest.param("missing-shard", "incomplete", id="index-names-a-missing-shard"),
        pytest.param("truncated", "too short", id="truncated"),
        pytest.param("garbage-header", "corrupt", id="garbage-header"),
        pytest.param("wrong-size", "declares", id="size-does-not-match-shape"),
    ],
)
def test_weights_bytes_rejects(tmp_path: Path, setup: str, message: str) -> None:
    path = tmp_path / "model.safetensors"
    if setup == "missing-shard":
        write_safetensors(path, {"a": ("F32", [2], 4)})
        index = {"weight_map": {"a": "model.safetensors", "b": "model-2.safetensors"}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    elif setup == "truncated":
        path.write_bytes(b"\x01\x00")
    elif setup == "garbage-header":
        path.write_bytes(struct.pack("<Q", 5) + b"{oops")
    elif setup == "wrong-size":
        raw = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(ModelLoadFailed, match=message):
        weights_bytes(tmp_path)


@pytest.mark.parametrize(
    ("tensors", "cfg", "expected"),
    [
        pytest.param(
            {"model.embed_tokens.weight": TensorInfo("F32", (8, 4), 128)},
            {},
            4,
            id="float32-embedding",
        ),
        pytest.param(
            {
                "model.embed_tokens.weight": TensorInfo("U32", (8, 1), 32),
                "model.embed_tokens.scales": TensorInfo("F32", (8, 1), 32),
            },
            {"torch_dtype": "bfloat16"},
            4,  # quantized: the scales' dtype wins over the config's
            id="quantized-float32-scales",
        ),
        pytest.param({}, {"torch_dtype": "float32"}, 4, id="config-torch-dtype"),
        pytest.param({}, {"text_config": {"dtype": "bfloat16"}}, 2, id="config-nested-dtype"),
        pytest.param({}, {}, 2, id="default"),
    ],
)
def test_activation_dtype_bytes(
    tensors: dict[str, TensorInfo], cfg: dict[str, Any], expected: int
) -> None:
    assert activation_dtype_bytes(tensors, cfg) == expected


# --------------------------------------------------------------------------- the estimate

QWEN3_8B_4BIT = ModelProfile.from_config(config("qwen3-8b"), weights=4_600_000_000, dtype_bytes=2)


def test_estimate_parts() -> None:
    e = estimate_request(QWEN3_8B_4BIT, 1000, 1000, backend="metal")
    assert e.weights == 4_600_000_000
    assert e.kv == 2048 * QWEN3_8B_SLOT  # 2,000 tokens → 8 steps of 256
    assert e.kv_per_token == QWEN3_8B_SLOT
    assert e.request == e.total - e.weights
    assert e.total >= e.weights + e.kv + e.overhead
    assert e.peak_phase in {"prefill", "decode"}


def test_estimate_grows_with_max_tokens_by_256_steps() -> None:
    sizes = [estimate_request(QWEN3_8B_4BIT, 100, n, backend="metal").kv for n in (100, 156, 157)]
    assert sizes == [256 * QWEN3_8B_SLOT, 256 * QWEN3_8B_SLOT, 512 * QWEN3_8B_SLOT]


def test_estimate_clips_generation_at_the_context_limit() -> None:
    e = estimate_request(QWEN3_8B_4BIT, 30_000, 100_000, context_limit=32_768, backend="metal")
    assert e.max_tokens == 2_768
    assert e.kv == 32_768 * QWEN3_8B_SLOT


def test_metal_fused_attention_holds_no_scores() -> None:
    # An 8,192-token prompt: its 4th chunk (2,048 queries) attends to 8,192 keys. Unfused,
    # 32 heads × 2,048 × 8,192 scores × 2 bytes + a 1-byte 2,048 × 8,192 mask.
    cpu = estimate_request(QWEN3_8B_4BIT, 8193, 1, backend="cpu")
    metal = estimate_request(QWEN3_8B_4BIT, 8193, 1, backend="metal")
    assert cpu.prefill - metal.prefill == 32 * 2048 * 8192 * 2 + 2048 * 8192


def test_head_dim_256_is_unfused_on_metal_too() -> None:
    gemma = ModelProfile.from_config(config("gemma-3-1b-it"), weights=10**9)
    cpu = estimate_request(gemma, 4000, 10, backend="cpu")
    metal = estimate_request(gemma, 4000, 10, backend="metal")
    assert cpu.prefill == metal.prefill > 0


def test_sliding_layers_hold_window_plus_chunk_while_prefilling() -> None:
    # Gemma-3-1B, 4,097-token prompt: 4,096 prefill tokens in two chunks of 2,048. The 2nd
    # is appended to the last 511 tokens of each sliding layer (2,559 slots); the full
    # layers then hold 4,096.
    gemma = ModelProfile.from_config(config("gemma-3-1b-it"), weights=0)
    e = estimate_request(gemma, 4097, 1, backend="metal")
    assert e.details["prefill-kv"] == 4 * 4096 * 1024 + 22 * 2559 * 1024
    # Decoding trims them to the window; the full layers take one more step of 256.
    assert e.kv == 4 * 4352 * 1024 + 22 * 512 * 1024


def test_kv_quantization_peaks_when_both_copies_exist() -> None:
    # Crossing 5,000 tokens converts the cache; for that step it is there twice.
    e = estimate_request(QWEN3_8B_4BIT, 100, 6000, kv_bits=4, backend="metal")
    fp = 5120 * QWEN3_8B_SLOT  # 5,000 tokens sit in 20 steps of 256
    quantized = 5120 * 41_472
    assert e.details["kv-quantize"] >= fp + quantized
    assert e.kv == 6144 * 41_472


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param((0, 10), "prompt token", id="empty-prompt"),
        pytest.param((10, -1), "max_tokens", id="negative-max-tokens"),
    ],
)
def test_estimate_rejects(args: tuple[int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        estimate_request(QWEN3_8B_4BIT, *args, backend="cpu")


def test_estimate_from_a_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config("smollm2-135m-instruct")))
    write_safetensors(tmp_path / "model.safetensors", {"model.embed_tokens.weight":
                      ("F32", [49152, 576], 4)})  # fmt: skip
    e = estimate_request(tmp_path, 16, 8, backend="cpu")
    assert e.weights == 49152 * 576 * 4
    assert e.kv == 256 * 46_080  # float32 cache, from the embedding's dtype


# SmolLM2-135M-Instruct (float32, 538,060,032 bytes of weights), peaks measured with
# `measure_loaded` (mlx 0.32.4 CPU, mlx-lm 0.32.2, greedy): prompt, max_tokens, chunk, peak.
SMOLLM2_MEASURED = [
    (16, 8, 2048, 550_685_180),
    (256, 8, 2048, 563_298_129),
    (1000, 8, 2048, 664_803_741),
    (2100, 4, 2048, 878_036_476),
    (16, 300, 2048, 562_881_432),
    (1000, 8, 256, 604_454_913),
    (2100, 4, 512, 694_779_400),
    (3000, 4, 2048, 878_040_076),
]


@pytest.mark.parametrize(("prompt", "max_tokens", "chunk", "measured"), SMOLLM2_MEASURED)
def test_estimate_matches_recorded_smollm2_peaks(
    prompt: int, max_tokens: int, chunk: int, measured: int
) -> None:
    smollm2 = ModelProfile.from_config(
        config("smollm2-135m-instruct"), weights=538_060_032, dtype_bytes=4
    )
    e = estimate_request(
        smollm2, prompt, max_tokens, backend="cpu", prefill_chunk=chunk, sampling=False
    )
    assert 0.98 * measured <= e.total <= 1.05 * measured


# --------------------------------------------------------------------------- vs mlx-lm itself


def tiny_config(model_type: str, **extra: Any) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    } | extra


TINY = {
    "qwen3": tiny_config("qwen3"),
    "llama": tiny_config("llama"),
    "gemma3_text": tiny_config(
        "gemma3_text", sliding_window=32, sliding_window_pattern=3, query_pre_attn_scalar=64
    ),
    "qwen3_5": {
        "model_type": "qwen3_5",
        "text_config": tiny_config(
            "qwen3_5_text",
            linear_num_key_heads=2,
            linear_key_head_dim=32,
            linear_num_value_heads=4,
            linear_value_head_dim=32,
            linear_conv_kernel_dim=4,
            full_attention_interval=3,
        ),
    },
}


@pytest.mark.parametrize(
    ("family", "prompt", "max_tokens", "chunk", "max_kv_size", "kv_bits"),
    [
        pytest.param(family, *case, id=f"{family}-{case_id}")
        for family in TINY
        for case_id, case in [
            ("short", (5, 3, 8, None, None)),
            ("chunks", (100, 20, 16, None, None)),
            ("crosses-256", (300, 30, 64, None, None)),
            ("max-kv-size", (300, 20, 64, 40, None)),
            ("kv4", (120, 20, 64, None, 4)),
        ]
        # mlx-lm cannot quantize Gemma-3's rotating caches; max_kv_size needs a full cache.
        if not (family == "gemma3_text" and case[4])
        and not (family in ("gemma3_text", "qwen3_5") and case[3])
    ],
)
def test_kv_matches_mlx_lm_caches(
    family: str,
    prompt: int,
    max_tokens: int,
    chunk: int,
    max_kv_size: int | None,
    kv_bits: int | None,
) -> None:
    """Run mlx-lm's own generation loop on a tiny random model of each cache layout and
    compare the bytes its caches hold with the estimate's (float32 weights)."""
    mx = pytest.importorskip("mlx.core")
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    cfg = TINY[family]
    module = importlib.import_module(f"mlx_lm.models.{family}")
    model = module.Model(module.ModelArgs.from_dict(cfg))
    cache = make_prompt_cache(model, max_kv_size=max_kv_size)
    tokens = mx.array([(i * 31) % 500 + 1 for i in range(prompt)])
    steps = generate_step(
        tokens,
        model,
        max_tokens=max_tokens,
        prompt_cache=cache,
        prefill_step_size=chunk,
        kv_bits=kv_bits,
        quantized_kv_start=50,
    )
    for _ in steps:
        pass
    estimate = estimate_request(
        ModelProfile.from_config(cfg, dtype_bytes=4),
        prompt,
        max_tokens,
        kv_bits=kv_bits,
        max_kv_size=max_kv_size,
        backend="cpu",
        prefill_chunk=chunk,
        quantized_kv_start=50,
    )
    assert estimate.kv == sum(c.nbytes for c in cache)


@pytest.mark.parametrize(
    ("family", "prompt", "chunk"),
    [
        pytest.param("gemma3_text", 100, 16, id="gemma-window-plus-chunk"),
        pytest.param("qwen3_5", 100, 16, id="hybrid"),
        pytest.param("qwen3", 90, 40, id="dense-unaligned-chunks"),
    ],
)
def test_prefill_kv_matches_mlx_lm(family: str, prompt: int, chunk: int) -> None:
    """Prefill like ``generate_step`` does and take the most cache any chunk left."""
    mx = pytest.importorskip("mlx.core")
    from mlx_lm.models.cache import make_prompt_cache

    cfg = TINY[family]
    module = importlib.import_module(f"mlx_lm.models.{family}")
    model = module.Model(module.ModelArgs.from_dict(cfg))
    cache = make_prompt_cache(model)
    tokens = mx.array([(i * 31) % 500 + 1 for i in range(prompt - 1)])
    most = 0
    for start in range(0, prompt - 1, chunk):
        model(tokens[start : start + chunk][None], cache=cache)
        mx.eval([c.state for c in cache])
        most = max(most, sum(c.nbytes for c in cache))
    estimate = estimate_request(
        ModelProfile.from_config(cfg, dtype_bytes=4), prompt, 1, backend="cpu", prefill_chunk=chunk
    )
    assert estimate.details["prefill-kv"] == most


def test_max_kv_size_table_matches_mlx_lm() -> None:
    pytest.importorskip("mlx.core")
    for family in sorted(HONOURS_MAX_KV_SIZE):
        module = importlib.import_module(f"mlx_lm.models.{family}")
        assert not hasattr(module.Model, "make_cache"), family
    for family in ("llama", "gemma3", "gemma3_text", "qwen3_5", "qwen3_next", "gpt_oss"):
        module = importlib.import_module(f"mlx_lm.models.{family}")
        assert hasattr(module.Model, "make_cache"), family
