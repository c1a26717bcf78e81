"""``config.json`` and ``generation_config.json`` rebuilt from GGUF metadata."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from mlxd.errors import GGUFImportError

SUPPORTED_ARCHITECTURES = ("llama",)


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


def build_generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Token ids generation stops on and starts from (mlx-lm reads ``eos_token_id`` here)."""
    return {key: config[key] for key in ("bos_token_id", "eos_token_id") if key in config}
