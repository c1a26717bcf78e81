"""What a request will cost in memory, worked out from a model's files before it is loaded.

Nothing here loads a tensor. The weights are the tensor bytes that the safetensors headers
declare (an 8-byte length, then a JSON header; ``mx.load`` allocates exactly that). The KV
cache, the recurrent state of linear-attention layers and the working memory of prefill
and decode follow from ``config.json`` and from how mlx-lm 0.32 allocates them:

- ``KVCache`` grows in steps of 256 tokens (``KV_STEP``); a prefill chunk of ``n`` tokens
  adds ``ceil(n / 256) · 256`` slots, and a cache whose fill is not a multiple of 256 is
  cut to its fill before it grows.
- A ``RotatingKVCache`` (Gemma-3 sliding layers, or any layer under ``max_kv_size`` where
  the architecture honours it) keeps ``window`` tokens while decoding, but a multi-token
  prefill chunk is appended to the last ``window − 1`` tokens first, so it briefly holds
  ``window − 1 + chunk``.
- Gated-DeltaNet layers (Qwen3-Next, Qwen3.5/3.6) keep a fixed state: a convolution tail
  of ``kernel − 1`` rows of ``2·Hk·Dk + Hv·Dv`` channels in the activation dtype, and a
  float32 ``Hv × Dv × Dk`` recurrent matrix.
- With ``kv_bits`` a full-attention cache is quantized (group size 64, a scale and a bias
  per group) once it holds ``quantized_kv_start`` tokens (5000 in mlx-lm); the moment of
  conversion holds both copies.

The peak of a request is simulated phase by phase, the way ``mlx_lm.generate_step`` runs
it: each prefill chunk (KV then allocated + that chunk's working memory), then decoding
(the final KV + logits). Working memory is `WorkingMemory`: measured on the running backend
by :mod:`server.calibrate`, or, until then, the prior (`prior_working_memory`), which was
fitted once on this project's CPU machine against ``mx.get_peak_memory()`` (see
`measure_request` and the constants below).
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from mlxd.errors import ModelLoadFailed
from mlxd.layersync import sync_prefill_layers

KV_STEP = 256  # mlx-lm KVCache / QuantizedKVCache / RotatingKVCache growth step, in tokens
KV_GROUP_SIZE = 64  # mlx-lm's kv_group_size default
QUANTIZED_KV_START = 5000  # mlx-lm's quantized_kv_start default
DEFAULT_PREFILL_CHUNK = 2048  # mlx-lm's prefill_step_size default

# Calibration (mlx 0.32.4, mlx-lm 0.32.2, CPU backend, against ``mx.get_peak_memory()``;
# SmolLM2-135M float32 and random Qwen3-shaped models, prompts of 16–4200 tokens):
# - an unfused attention holds one score matrix (heads × chunk × keys) in the activation
#   dtype at a time, plus a one-byte causal mask (chunk × keys);
# - everything else a prefill chunk holds, per token and per unit of (hidden + MLP width +
#   attention width), came to 16.4–16.7 bytes with float32 activations and 11.1 bytes with
#   bfloat16 ones: about 2.8 copies in the activation dtype plus 1.4 in float32 (norms,
#   RoPE and softmax work in float32); 3 and 1.5 are used;
# - a greedy decode step holds 4.2 vocabulary rows in the activation dtype (logits,
#   log-softmax, and the next step that mlx-lm evaluates ahead); temperature + top-p +
#   top-k sampling added 7.75 float32 rows (sorting the vocabulary).
ACTIVATION_COPIES = 3.0
FLOAT32_COPIES = 1.5
SCORE_COPIES = 1.0
MASK_BYTES = 1
DECODE_LOGIT_ROWS = 4.5
SAMPLING_ROWS = 8
# Allocator rounding and small buffers nobody models: the modelled parts came within
# 0.5 % of the measured peaks; 1 % of the lasting allocations is kept on top.
OVERHEAD_FRACTION = 0.01

Backend = Literal["metal", "cuda", "cpu"]

# Head dims that Metal's fused attention kernel runs for prompts (query length > 8) in
# mlx 0.32; other head dims (192, 256: Gemma-3, Qwen3.5) fall back to the unfused path,
# which materializes the scores. CPU and CUDA prefill are counted as unfused.
METAL_FUSED_PREFILL_HEAD_DIMS = frozenset({64, 72, 80, 96, 128})

# mlx-lm architectures that build their own caches (``make_cache``) ignore
# ``max_kv_size``; only these, which use mlx-lm's default cache list, honour it.
# (The complement in mlx-lm 0.32.2; tests check the list against the installed mlx-lm.)
HONOURS_MAX_KV_SIZE = frozenset(
    {
        "Klear", "apertus", "bailing_moe", "bitnet", "cohere", "dbrx", "deepseek",
        "deepseek_v2", "deepseek_v3", "dots1", "ernie4_5", "ernie4_5_moe", "exaone",
        "gemma", "gemma2", "glm", "glm4", "glm4_moe", "glm4_moe_lite", "gpt2",
        "gpt_bigcode", "gpt_neox", "gptj", "granite", "granitemoe", "helium", "hunyuan",
        "hunyuan_v1_dense", "internlm2", "internlm3", "kimi_k25", "kimi_vl", "lille-130m",
        "llama4_text", "mimo", "minicpm", "minicpm3", "minimax", "mistral3", "mistral4",
        "mixtral", "nanochat", "nemotron", "olmo2", "olmoe", "openelm", "phi", "phi3",
        "phi3small", "phimoe", "phixtral", "pixtral", "plamo", "qwen", "qwen2",
        "qwen2_moe", "qwen2_vl", "qwen3", "qwen3_moe", "qwen3_vl", "qwen3_vl_moe",
        "seed_oss", "smollm3", "solar_open", "stablelm", "starcoder2", "talkie",
        "telechat3", "youtu_llm",
    }
)  # fmt: skip
# mlx-lm's own aliases (``MODEL_REMAPPING``) for the families this module reasons about.
MODEL_TYPE_ALIASES = {"mistral": "llama", "llava": "mistral3", "kimi_k2": "deepseek_v3"}

# Families whose layer layout mlx-lm derives from a period rather than ``layer_types``.
SLIDING_PATTERN_FAMILIES = frozenset({"gemma3", "gemma3_text"})
LINEAR_INTERVAL_FAMILIES = frozenset({"qwen3_next", "qwen3_5", "qwen3_5_moe"})
# Families whose mlx-lm model gives ``"sliding_attention"`` layers a rotating cache; for
# any other family such layers get a full cache (so they are counted as full here).
SLIDING_LAYER_TYPE_FAMILIES = frozenset(
    {"llama", "gpt_oss", "ministral3", "cohere2", "exaone4", "olmo3", "afmoe", "laguna"}
)
# mlx-lm's defaults for the sparse Gemma-3 configs (the 4B+ VLM configs leave heads out).
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1152,
    "num_hidden_layers": 26,
    "intermediate_size": 6912,
    "num_attention_heads": 4,
    "head_dim": 256,
    "vocab_size": 262144,
    "num_key_value_heads": 1,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "max_position_embeddings": 32768,
}
GEMMA3_VLM_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 262208,
}
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


# --------------------------------------------------------------------------- weights


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
    tied = bool(_text_config(config or {}).get("tie_word_embeddings"))
    tensors: dict[str, TensorInfo] = {}
    for path in weight_files(model_dir):
        for name, info in read_safetensors_header(path).items():
            if name.startswith(DROPPED_WEIGHT_PREFIXES):
                continue
            if tied and name.rpartition(".")[0].endswith("lm_head"):
                continue  # tied models reuse the embedding; mlx-lm drops a stored copy
            tensors[name] = info
    return tensors


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadFailed(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadFailed(f"{model_dir / 'config.json'} is not a JSON object")
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
    text = _text_config(config)
    for key in ("torch_dtype", "dtype"):
        value = text.get(key) or config.get(key)
        if isinstance(value, str) and value in _CONFIG_DTYPES:
            return _CONFIG_DTYPES[value]
    return 2


# --------------------------------------------------------------------------- architecture


class LayerKind(str, Enum):
    FULL = "full_attention"
    SLIDING = "sliding_attention"
    LINEAR = "linear_attention"


@dataclass(frozen=True)
class LinearAttention:
    """A Gated-DeltaNet layer's shape (Qwen3-Next, Qwen3.5/3.6 ``linear_*`` keys)."""

    num_key_heads: int
    key_head_dim: int
    num_value_heads: int
    value_head_dim: int
    conv_kernel: int

    @property
    def conv_dim(self) -> int:
        return (
            2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim
        )

    def state_bytes(self, dtype_bytes: int) -> int:
        conv = (self.conv_kernel - 1) * self.conv_dim * dtype_bytes
        recurrent = self.num_value_heads * self.value_head_dim * self.key_head_dim * 4  # float32
        return conv + recurrent


@dataclass(frozen=True)
class Architecture:
    """What the memory estimate needs from ``config.json``."""

    model_type: str
    layers: tuple[LayerKind, ...]
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_width: int  # per-token MLP activation width (MoE: routed copies + shared expert)
    vocab_size: int
    context_length: int | None
    sliding_window: int | None
    linear: LinearAttention | None
    honours_max_kv_size: bool

    def count(self, kind: LayerKind) -> int:
        return sum(1 for layer in self.layers if layer is kind)

    @property
    def attention_width(self) -> int:
        width = self.num_heads * self.head_dim
        return max(width, self.linear.conv_dim) if self.linear else width

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Architecture:
        model_type = str(config.get("model_type", ""))
        family = MODEL_TYPE_ALIASES.get(model_type, model_type)
        text = _text_config(config)
        if family in SLIDING_PATTERN_FAMILIES:
            defaults = dict(GEMMA3_TEXT_DEFAULTS)
            if "text_config" in config:
                defaults.update(GEMMA3_VLM_DEFAULTS)
                if "vocab_size" in config:  # mlx-lm's gemma3 wrapper overrides the text one
                    text = {**text, "vocab_size": config["vocab_size"]}
            text = {**defaults, **text}

        def need(key: str) -> int:
            value = text.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelLoadFailed(f"config.json lacks a positive integer {key!r}")
            return value

        num_layers = need("num_hidden_layers")
        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = text.get("num_key_value_heads") or heads
        head_dim = text.get("head_dim") or hidden // heads
        layers = _layer_kinds(family, text, num_layers)
        linear = None
        if LayerKind.LINEAR in layers:
            linear = LinearAttention(
                num_key_heads=need("linear_num_key_heads"),
                key_head_dim=need("linear_key_head_dim"),
                num_value_heads=need("linear_num_value_heads"),
                value_head_dim=need("linear_value_head_dim"),
                conv_kernel=need("linear_conv_kernel_dim"),
            )
        sliding_window = text.get("sliding_window") if LayerKind.SLIDING in layers else None
        if LayerKind.SLIDING in layers and not sliding_window:
            raise ModelLoadFailed("config.json has sliding-window layers but no sliding_window")
        context = text.get("max_position_embeddings")
        return cls(
            model_type=model_type,
            layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            mlp_width=_mlp_width(text, hidden),
            vocab_size=need("vocab_size"),
            context_length=int(context) if isinstance(context, int) else None,
            sliding_window=int(sliding_window) if sliding_window else None,
            linear=linear,
            honours_max_kv_size=family in HONOURS_MAX_KV_SIZE,
        )


def _text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's settings: VLM configs (Qwen3.5, Gemma-3 4B+) nest them."""
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, Mapping) else dict(config)


def _layer_kinds(family: str, text: Mapping[str, Any], num_layers: int) -> tuple[LayerKind, ...]:
    if family in SLIDING_PATTERN_FAMILIES:
        # mlx-lm: layer i is global when i % pattern == pattern − 1.
        pattern = int(text["sliding_window_pattern"])
        return tuple(
            LayerKind.FULL if i % pattern == pattern - 1 else LayerKind.SLIDING
            for i in range(num_layers)
        )
    if family in LINEAR_INTERVAL_FAMILIES:
        # mlx-lm: layer i is linear unless (i + 1) % interval == 0.
        interval = int(text.get("full_attention_interval", 4))
        return tuple(
            LayerKind.FULL if (i + 1) % interval == 0 else LayerKind.LINEAR
            for i in range(num_layers)
        )
    layer_types = text.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        sliding_ok = family in SLIDING_LAYER_TYPE_FAMILIES
        return tuple(
            LayerKind.SLIDING if t == LayerKind.SLIDING.value and sliding_ok else LayerKind.FULL
            for t in layer_types
        )
    return (LayerKind.FULL,) * num_layers


def _mlp_width(text: Mapping[str, Any], hidden: int) -> int:
    experts = (
        text.get("num_experts") or text.get("num_local_experts") or text.get("n_routed_experts")
    )
    top_k = text.get("num_experts_per_tok")
    moe_width = text.get("moe_intermediate_size")
    if experts and top_k and moe_width:
        # A routed token is copied once per chosen expert before the expert MLPs run.
        shared = int(text.get("shared_expert_intermediate_size") or 0)
        return int(top_k) * (int(moe_width) + hidden) + shared
    return int(text.get("intermediate_size") or 4 * hidden)


# --------------------------------------------------------------------------- KV cache


def kv_element_bytes(kv_bits: int | None, dtype_bytes: int, head_dim: int) -> float:
    """Bytes per cached element: the dtype, or ``bits/8`` plus a scale and a bias (in the
    activation dtype) per group of 64."""
    if kv_bits is None:
        return float(dtype_bytes)
    if kv_bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"kv_bits must be one of 2, 3, 4, 5, 6, 8, not {kv_bits}")
    if head_dim % KV_GROUP_SIZE:
        raise ValueError(f"head_dim {head_dim} is not a multiple of the KV group size 64")
    return kv_bits / 8 + 2 * dtype_bytes / KV_GROUP_SIZE


def kv_bytes_per_token(
    config: Mapping[str, Any], kv_bits: int | None = None, dtype_bytes: int = 2
) -> int:
    """What each further token adds once the window of every sliding layer is full:
    layers × 2 (K and V) × KV heads × head_dim × bytes, over full-attention layers only.

    Sliding-window and linear-attention layers stop growing (see `kv_bytes`).
    """
    return _kv_per_token(Architecture.from_config(config), dtype_bytes, kv_bits)


def kv_bytes(
    config: Mapping[str, Any] | Architecture,
    tokens: int,
    kv_bits: int | None = None,
    dtype_bytes: int = 2,
    max_kv_size: int | None = None,
    quantized_kv_start: int = QUANTIZED_KV_START,
) -> int:
    """The cache mlx-lm has allocated once ``tokens`` tokens went through it one by one:
    full layers rounded up to 256-token steps (capped by ``max_kv_size`` where the
    architecture honours it), sliding layers capped at their window, linear layers' fixed
    state. ``kv_bits`` applies from ``quantized_kv_start`` tokens on, as in mlx-lm."""
    arch = config if isinstance(config, Architecture) else Architecture.from_config(config)
    caches = _make_caches(arch, dtype_bytes, kv_bits, max_kv_size)
    for cache in caches:
        cache.decode_to(tokens)
        cache.maybe_quantize(quantized_kv_start)
    return sum(cache.nbytes for cache in caches)


@dataclass
class _CacheGroup:
    """The layers that share one cache type; all of them grow identically.

    ``capacity`` counts token slots per layer, ``offset`` tokens seen. ``max_size`` is set
    for rotating caches. ``slot_bytes`` is K+V per token slot per layer.
    """

    layers: int
    slot_bytes: float
    quantized_slot_bytes: float | None = None  # set when kv_bits applies to this group
    max_size: int | None = None
    fixed_bytes: int = 0  # per layer, for linear-attention state
    offset: int = 0
    capacity: int = 0
    quantized: bool = False
    transient: float = 0.0  # bytes briefly held by the last growth (the old buffer, one layer)

    @property
    def nbytes(self) -> int:
        slot = self.quantized_slot_bytes if self.quantized else self.slot_bytes
        assert slot is not None
        state = self.fixed_bytes if self.offset else 0
        return math.ceil(self.layers * (self.capacity * slot + state))

    def _per_layer(self) -> float:
        slot = self.quantized_slot_bytes if self.quantized else self.slot_bytes
        assert slot is not None
        return self.capacity * slot

    def update(self, n: int) -> int:
        """Add ``n`` tokens as mlx-lm does; return how many keys attention then reads."""
        self.transient = 0.0
        if self.slot_bytes == 0:  # linear attention: fixed state, no keys
            self.offset += n
            return 0
        if self.max_size is None:
            if self.offset + n > self.capacity:
                self.transient = self._per_layer()
                base = self.capacity if self.offset % KV_STEP == 0 else self.offset
                self.capacity = base + math.ceil(n / KV_STEP) * KV_STEP
            self.offset += n
            return self.offset
        if n > 1:  # RotatingKVCache._update_concat
            self.transient = self._per_layer()
            kept = min(self.capacity, self.offset)
            self.capacity = (min(kept, self.max_size - 1) if self.capacity else 0) + n
            self.offset += n
            return self.capacity
        # RotatingKVCache._update_in_place: grow by a step until the window, then trim to it.
        if self.capacity == 0 or (self.offset >= self.capacity and self.capacity < self.max_size):
            self.transient = self._per_layer()
            self.capacity += max(0, min(KV_STEP, self.max_size - self.offset))
        if self.capacity > self.max_size:
            self.transient = self._per_layer()
            self.capacity = self.max_size
        self.offset += 1
        return min(self.offset, self.capacity)

    def decode_to(self, tokens: int) -> None:
        """One token at a time up to ``tokens``, jumping over steps that allocate nothing."""
        while self.offset < tokens:
            if self.slot_bytes == 0:
                self.offset = tokens  # fixed state
            elif self.max_size is not None and self.capacity == self.max_size:
                self.offset = tokens  # a full rotating cache only overwrites
            elif self.offset < self.capacity and (
                self.max_size is None or self.capacity < self.max_size
            ):
                self.offset = min(tokens, self.capacity)  # fits: no allocation
            else:
                self.update(1)

    def maybe_quantize(self, start: int) -> float:
        """Convert at ``start`` tokens as mlx-lm does; return the bytes briefly held twice."""
        if self.quantized_slot_bytes is None or self.quantized or self.offset < start:
            return 0.0
        before = self.nbytes
        self.quantized = True
        return float(before)


def _make_caches(
    arch: Architecture, dtype_bytes: int, kv_bits: int | None, max_kv_size: int | None
) -> list[_CacheGroup]:
    slot = 2 * arch.num_kv_heads * arch.head_dim
    fp_slot = float(slot * dtype_bytes)
    groups: list[_CacheGroup] = []
    full = arch.count(LayerKind.FULL)
    if full:
        rotating = max_kv_size if arch.honours_max_kv_size else None
        quantized = None
        if kv_bits is not None:
            if rotating is not None:
                raise ValueError(
                    "mlx-lm cannot quantize a rotating cache: drop kv_bits or max_kv_size"
                )
            quantized = slot * kv_element_bytes(kv_bits, dtype_bytes, arch.head_dim)
        groups.append(_CacheGroup(full, fp_slot, quantized, max_size=rotating))
    sliding = arch.count(LayerKind.SLIDING)
    if sliding:
        groups.append(_CacheGroup(sliding, fp_slot, None, max_size=arch.sliding_window))
    if arch.linear is not None:
        groups.append(
            _CacheGroup(
                arch.count(LayerKind.LINEAR),
                0.0,
                None,
                fixed_bytes=arch.linear.state_bytes(dtype_bytes),
            )
        )
    return groups


# --------------------------------------------------------------------------- working memory


@dataclass(frozen=True)
class WorkingMemory:
    """What prefill and decode hold beyond weights and KV cache, in bytes: the terms that
    calibration (:mod:`server.calibrate`) measures on the running backend.

    - Prefill: ``prefill_curves`` holds, per measured chunk size ``n`` (ascending), a curve of
      ``(keys, work)`` points: what a chunk of ``n`` tokens holds while its attention reads
      ``keys`` keys (the context so far plus the chunk). Work grows with ``n × keys`` where a
      kernel materializes the score matrix, and not always linearly (a kernel may switch to
      float32 scores for long keys, and on a GPU the old KV buffers of a growing cache stay
      allocated until the stream finishes), so the curve is measured at several depths, up
      to the deepest the budget allows, and read piecewise linearly: between points
      interpolated, beyond the last following its last segment. Between chunk sizes the
      work is interpolated linearly, below the smallest it is proportional.
    - Decode: one sequence's step at context ``k`` holds ``decode_fixed + decode_per_key · k``,
      plus ``sampling`` when it samples (top-p/top-k sort the vocabulary) rather than taking
      the argmax. A batch of sequences holds the sum of theirs.

    ``quantized_per_token_key`` is added per token × key once a ``kv_bits`` cache is quantized
    (mlx-lm's quantized attention is written out in plain ops: it materializes the scores).
    """

    prefill_curves: tuple[tuple[int, tuple[tuple[int, float], ...]], ...]
    decode_fixed: float
    decode_per_key: float
    sampling: float
    quantized_per_token_key: float
    source: str = "prior"  # "prior" (from the architecture), "measured", "learned"

    def prefill(self, tokens: int, keys: int, quantized: bool = False) -> float:
        """Working memory of one prefill chunk of ``tokens`` tokens reading ``keys`` keys."""
        curves = self.prefill_curves
        extra = self.quantized_per_token_key * tokens * keys if quantized else 0.0
        n0, first = curves[0]
        if tokens <= n0:
            return _read_curve(first, keys) * tokens / n0 + extra
        for (a, ca), (b, cb) in itertools.pairwise(curves):
            if tokens <= b:
                t = (tokens - a) / (b - a)
                wa, wb = _read_curve(ca, keys), _read_curve(cb, keys)
                return wa + (wb - wa) * t + extra
        n1, last = curves[-1]
        return _read_curve(last, keys) * tokens / n1 + extra

    def decode(self, context: int, sampling: bool) -> float:
        """Working memory of one sequence's decode step at ``context`` tokens."""
        extra = self.sampling if sampling else 0.0
        return self.decode_fixed + self.decode_per_key * context + extra

    def raised(self, phase: str, factor: float) -> WorkingMemory:
        """These terms with one phase's (``prefill`` or ``decode``) scaled up by ``factor``."""
        if factor <= 1.0:
            return self
        if phase == "decode":
            return replace(
                self,
                decode_fixed=self.decode_fixed * factor,
                decode_per_key=self.decode_per_key * factor,
                sampling=self.sampling * factor,
                source="learned",
            )
        return replace(
            self,
            prefill_curves=tuple(
                (n, tuple((k, w * factor) for k, w in curve)) for n, curve in self.prefill_curves
            ),
            quantized_per_token_key=self.quantized_per_token_key * factor,
            source="learned",
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "prefill_curves": [[n, [list(p) for p in curve]] for n, curve in self.prefill_curves],
            "decode_fixed": self.decode_fixed,
            "decode_per_key": self.decode_per_key,
            "sampling": self.sampling,
            "quantized_per_token_key": self.quantized_per_token_key,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WorkingMemory:
        return cls(
            prefill_curves=tuple(
                (int(n), tuple((int(k), float(w)) for k, w in curve))
                for n, curve in data["prefill_curves"]
            ),
            decode_fixed=float(data["decode_fixed"]),
            decode_per_key=float(data["decode_per_key"]),
            sampling=float(data["sampling"]),
            quantized_per_token_key=float(data["quantized_per_token_key"]),
            source=str(data.get("source", "measured")),
        )


def _read_curve(curve: tuple[tuple[int, float], ...], keys: int) -> float:
    """A piecewise-linear curve at ``keys``: interpolated inside, its end segments outside
    (never below 0); a one-point curve is flat."""
    if len(curve) == 1:
        return curve[0][1]
    segments = list(itertools.pairwise(curve))
    (k0, w0), (k1, w1) = segments[-1]
    for a, b in segments:
        if keys <= b[0]:
            (k0, w0), (k1, w1) = a, b
            break
    return max(0.0, w0 + (w1 - w0) * (keys - k0) / (k1 - k0))


def prior_working_memory(arch: Architecture, dtype_bytes: int, backend: Backend) -> WorkingMemory:
    """The hand-written model of working memory (calibrated once on the CPU backend, see the
    constants above): the estimate's terms until the running backend has measured its own."""
    width = arch.hidden_size + arch.mlp_width + arch.attention_width
    per_token = width * _activation_bytes(dtype_bytes)
    scores = arch.num_heads * SCORE_COPIES * dtype_bytes + MASK_BYTES
    slope = 0.0 if not _materializes_scores(backend, arch.head_dim, quantized=False) else scores
    n = DEFAULT_PREFILL_CHUNK
    curve = tuple((k, per_token * n + slope * n * k) for k in (n, 2 * n))
    return WorkingMemory(
        prefill_curves=((n, curve),),
        decode_fixed=DECODE_LOGIT_ROWS * dtype_bytes * arch.vocab_size + per_token,
        decode_per_key=arch.num_heads * 4.0,  # one float32 query row per head
        sampling=SAMPLING_ROWS * 4.0 * arch.vocab_size,
        quantized_per_token_key=scores,
    )


# --------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class ModelProfile:
    """A model's architecture, weight bytes and activation dtype: read once, reused."""

    architecture: Architecture
    weights: int
    dtype_bytes: int

    @classmethod
    def from_dir(cls, model_dir: Path | str) -> ModelProfile:
        path = Path(model_dir)
        config = read_config(path)
        tensors = model_tensors(path, config)
        return cls(
            architecture=Architecture.from_config(config),
            weights=sum(t.nbytes for t in tensors.values()),
            dtype_bytes=activation_dtype_bytes(tensors, config),
        )

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], weights: int = 0, dtype_bytes: int | None = None
    ) -> ModelProfile:
        return cls(
            architecture=Architecture.from_config(config),
            weights=weights,
            dtype_bytes=dtype_bytes if dtype_bytes is not None else config_dtype_bytes(config),
        )


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one request on a loaded model (bytes).

    ``total`` is the simulated peak: ``weights + overhead`` plus the largest of
    (KV allocated then + working memory then) over the prefill chunks and decoding, so it
    is not the sum of the other fields. ``request`` is what the request adds to resident
    weights — what admission compares with the free budget.
    """

    weights: int
    kv: int  # cache allocated at the end of the request
    prefill: int  # largest working memory of a prefill chunk
    decode: int  # working memory of a decode step
    overhead: int
    total: int
    prompt_tokens: int
    max_tokens: int  # generated tokens counted (clipped to the context limit)
    peak_phase: str  # "prefill", "decode" or "kv-quantize"
    kv_per_token: int  # what one more token of context adds, once windows are full
    # The peak of each phase, and "prefill-kv": the most cache a prefill chunk left
    # allocated (sliding layers hold window − 1 + chunk then).
    details: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def request(self) -> int:
        return self.total - self.weights


def estimate_request(
    model: ModelProfile | Path | str | Mapping[str, Any],
    prompt_tokens: int,
    max_tokens: int,
    context_limit: int | None = None,
    kv_bits: int | None = None,
    max_kv_size: int | None = None,
    *,
    backend: Backend | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    quantized_kv_start: int = QUANTIZED_KV_START,
    sampling: bool = True,
    working: WorkingMemory | None = None,
) -> Estimate:
    """Estimate the peak memory of generating ``max_tokens`` after ``prompt_tokens``.

    ``model`` is a model directory, a `ModelProfile`, or a config dict (then the weights
    count as 0 unless given through `ModelProfile.from_config`). Generation is clipped at
    ``context_limit``. ``backend`` decides whether prompt attention materializes its
    scores; ``None`` asks the running MLX (see :mod:`server.backend`). ``sampling=False``
    leaves out what top-p/top-k sampling sorts (greedy decoding). ``working`` is the
    calibrated working memory of this model on this backend; ``None`` uses the prior
    (`prior_working_memory`).
    """
    profile = _profile(model)
    if prompt_tokens < 1:
        raise ValueError("a request has at least one prompt token")
    if max_tokens < 0 or prefill_chunk < 1:
        raise ValueError("max_tokens must be >= 0 and prefill_chunk >= 1")
    if context_limit is not None:
        max_tokens = max(0, min(max_tokens, context_limit - prompt_tokens))
    if backend is None:
        backend = running_backend()
    arch = profile.architecture
    b = profile.dtype_bytes
    working = working or prior_working_memory(arch, b, backend)
    caches = _make_caches(arch, b, kv_bits, max_kv_size)

    prefill_peak = prefill_kv = kv_plus_prefill = quantize_peak = 0.0
    # mlx-lm prefills all but the last prompt token in chunks, then the last one with the
    # first decode step.
    for chunk in _chunks(prompt_tokens - 1, prefill_chunk):
        keys = {id(c): c.update(chunk) for c in caches}
        work = _prefill_work(working, chunk, caches, keys)
        transient = max(c.transient for c in caches)
        kv_now = sum(c.nbytes for c in caches)
        prefill_kv = max(prefill_kv, kv_now)
        held = kv_now + transient
        # Conversion happens before the chunk is evaluated: both copies meet its work.
        doubled = sum(c.maybe_quantize(quantized_kv_start) for c in caches)
        if doubled:
            after = sum(c.nbytes for c in caches)
            quantize_peak = max(quantize_peak, after + doubled + transient + work)
        prefill_peak = max(prefill_peak, work)
        kv_plus_prefill = max(kv_plus_prefill, held + work)

    decode_work = working.decode(prompt_tokens + max_tokens, sampling)
    final_tokens = prompt_tokens + max_tokens
    transient = 0.0
    for cache in caches:
        while cache.offset < final_tokens:
            stop = min(final_tokens, _next_growth(cache, final_tokens))
            if cache.quantized_slot_bytes is not None and not cache.quantized:
                stop = min(stop, max(quantized_kv_start, cache.offset + 1))
            cache.decode_to(stop)
            transient = max(transient, cache.transient)
            doubled = cache.maybe_quantize(quantized_kv_start)
            if doubled:
                others = sum(c.nbytes for c in caches if c is not cache)
                quantize_peak = max(quantize_peak, others + cache.nbytes + doubled + decode_work)
    kv_final = sum(c.nbytes for c in caches)
    decode_peak = kv_final + transient + decode_work

    phases = {"prefill": kv_plus_prefill, "decode": decode_peak, "kv-quantize": quantize_peak}
    phase = max(phases, key=lambda k: phases[k])
    overhead = math.ceil(OVERHEAD_FRACTION * (profile.weights + kv_final))
    total = profile.weights + overhead + math.ceil(phases[phase])
    return Estimate(
        weights=profile.weights,
        kv=kv_final,
        prefill=math.ceil(prefill_peak),
        decode=math.ceil(decode_work),
        overhead=overhead,
        total=total,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        peak_phase=phase,
        kv_per_token=_kv_per_token(arch, b, kv_bits),
        details={**{k: math.ceil(v) for k, v in phases.items()}, "prefill-kv": int(prefill_kv)},
    )


def running_backend() -> Backend:
    """The backend of the running MLX (imports mlx)."""
    from mlxd.backend import backend_info

    name = backend_info().name
    if name == "metal":
        return "metal"
    return "cuda" if name == "cuda" else "cpu"


def _profile(model: ModelProfile | Path | str | Mapping[str, Any]) -> ModelProfile:
    if isinstance(model, ModelProfile):
        return model
    if isinstance(model, (str, Path)):
        return ModelProfile.from_dir(model)
    return ModelProfile.from_config(model)


def _chunks(tokens: int, size: int) -> Iterator[int]:
    while tokens > 0:
        step = min(size, tokens)
        yield step
        tokens -= step


def _next_growth(cache: _CacheGroup, target: int) -> int:
    """The next offset at which decoding allocates (or ``target``)."""
    if cache.slot_bytes == 0:
        return target
    if cache.max_size is not None and cache.capacity >= cache.max_size:
        return target
    return cache.capacity + 1


def _kv_per_token(arch: Architecture, dtype_bytes: int, kv_bits: int | None) -> int:
    slot = 2 * arch.num_kv_heads * arch.head_dim
    return math.ceil(
        arch.count(LayerKind.FULL) * slot * kv_element_bytes(kv_bits, dtype_bytes, arch.head_dim)
    )


def _prefill_work(
    working: WorkingMemory, chunk: int, caches: list[_CacheGroup], keys: Mapping[int, int]
) -> float:
    """Working memory of one prefill chunk: attention reads the most keys of any cache."""
    attending = [c for c in caches if c.slot_bytes]
    most = max((keys[id(c)] for c in attending), default=0)
    quantized = any(c.quantized for c in attending)
    return working.prefill(chunk, most, quantized)


def _materializes_scores(backend: Backend, head_dim: int, quantized: bool) -> bool:
    if quantized:  # mlx-lm's quantized attention is written out in plain ops
        return True
    return not (backend == "metal" and head_dim in METAL_FUSED_PREFILL_HEAD_DIMS)


def _activation_bytes(dtype_bytes: int) -> float:
    """Bytes held per token per unit of layer width while a layer runs."""
    return ACTIVATION_COPIES * dtype_bytes + FLOAT32_COPIES * 4


# --------------------------------------------------------------------------- measurement


def measure_request(
    model_dir: Path | str,
    prompt_tokens: int,
    max_tokens: int,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    kv_bits: int | None = None,
    max_kv_size: int | None = None,
) -> int:
    """Peak MLX memory (``mx.get_peak_memory()``) of loading ``model_dir`` and generating
    exactly ``max_tokens`` greedy tokens after a synthetic ``prompt_tokens``-token prompt.

    This is the ground truth `estimate_request` is checked against; it loads the model,
    so it is for calibration and the README table, not for serving.
    """
    import mlx.core as mx
    from mlx_lm import load

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    model = load(str(model_dir))[0]
    sync_prefill_layers(model)  # as the engine runs it
    vocab = Architecture.from_config(read_config(Path(model_dir))).vocab_size
    peak = measure_loaded(
        model, vocab, prompt_tokens, max_tokens, prefill_chunk=prefill_chunk,
        kv_bits=kv_bits, max_kv_size=max_kv_size, reset=False,
    )  # fmt: skip
    del model
    gc.collect()
    mx.clear_cache()
    return peak


def measure_loaded(
    model: Any,
    vocab: int,
    prompt_tokens: int,
    max_tokens: int,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    kv_bits: int | None = None,
    max_kv_size: int | None = None,
    reset: bool = True,
) -> int:
    """MLX's peak while a loaded mlx-lm ``model`` serves one greedy request as the engine
    runs it (``generate_step``; weights included, as they are active). ``reset=False``
    keeps the peak of what came before (the load, in `measure_request`)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    if reset:
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
    # Spread ids over the vocabulary; which tokens they are does not change memory.
    prompt = mx.array([(i * 7919 + 100) % vocab for i in range(prompt_tokens)])
    steps = generate_step(
        prompt,
        model,
        max_tokens=max_tokens,
        prefill_step_size=prefill_chunk,
        kv_bits=kv_bits,
        max_kv_size=max_kv_size,
    )
    for _ in steps:
        pass
    peak = int(mx.get_peak_memory())
    del steps, prompt
    gc.collect()
    mx.clear_cache()
    return peak
