"""Tokenizer files rebuilt with transformers' torch-free GGUF tokenizer builder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlxd.errors import GGUFImportError
from mlxd.gguf.files import json_text

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
        "tokenizer_config.json": json_text(tokenizer_config),
        "special_tokens_map.json": json_text(special_tokens_map),
    }
