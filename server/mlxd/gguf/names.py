"""llama.cpp tensor names → Hugging Face names, and undoing the Q/K row permutation.

llama.cpp's converter permutes the rows of Q and K for llama models (its RoPE pairs adjacent
dimensions, Hugging Face's pairs the two halves of each head); mlx-lm uses the HF convention, so
the permutation is undone here. It moves whole rows, so it applies unchanged to packed quantized
rows and to their scales/biases.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import mlx.core as mx

from mlxd.errors import GGUFImportError

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


def permutation_heads(gguf_base: str, config: Mapping[str, Any]) -> int | None:
    match = _BLOCK_RE.fullmatch(gguf_base)
    if match is None:
        return None
    if match.group(2) == "attn_q":
        return int(config["num_attention_heads"])
    if match.group(2) == "attn_k":
        return int(config["num_key_value_heads"])
    return None
