"""What the memory estimate needs from ``config.json``: layer kinds, widths, windows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from mlxd.errors import ModelLoadFailed

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
        text = text_config(config)
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


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
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
