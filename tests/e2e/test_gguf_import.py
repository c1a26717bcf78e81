"""Import the real SmolLM2-135M-Instruct Q4_1 GGUF and run it with mlx-lm.

The file mixes the three quantized types the importer keeps (Q4_1 layers, a Q8_0 embedding) with
F32 norms, uses grouped-query attention (9 heads, 3 KV heads) and a byte-level BPE vocabulary with
ChatML specials: a wrong Q/K un-permutation, name, config entry or token id shows up here as a
model that no longer answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlxd.gguf import (
    MARKER_NAME,
    check_tensor_data,
    import_gguf,
    read_header,
    resolve_dtype,
)

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Imported:
    path: Path
    model: Any
    tokenizer: TokenizerWrapper


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Imported:
    path = import_gguf(smollm2_gguf, tmp_path_factory.mktemp("models") / "smollm2", progress=False)
    loaded = mlx_lm.load(str(path))
    return Imported(path, loaded[0], loaded[1])


def test_header_of_the_real_file(smollm2_gguf: Path) -> None:
    header = read_header(smollm2_gguf)
    types = {info.name: info.type_name for info in header.tensors}
    assert set(types.values()) == {"Q4_1", "Q8_0", "F32"}
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q4_1"
    assert len(header.tensors) == 30 * 9 + 2  # 9 per block, the embedding and the final norm
    check_tensor_data(header, smollm2_gguf)  # the last tensor ends inside the file
    assert header.metadata["tokenizer.ggml.model"] == "gpt2"


def test_greedy_answer(smollm2: Imported) -> None:
    prompt = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
    )
    text = mlx_lm.generate(
        smollm2.model, smollm2.tokenizer, prompt, max_tokens=24, sampler=make_sampler(temp=0.0)
    )
    assert "Paris" in text


def test_weights_have_the_devices_dtype(smollm2: Imported) -> None:
    expected = resolve_dtype(None)
    parameters = tree_flatten(smollm2.model.parameters())
    assert isinstance(parameters, list)
    dtypes = {array.dtype for _, array in parameters}
    if expected == "float32":
        assert dtypes == {mx.float32}
    else:
        assert mx.uint32 in dtypes
    assert (smollm2.path / MARKER_NAME).is_file()


def test_tokenizer_is_the_gguf_vocabulary(smollm2: Imported, smollm2_gguf: Path) -> None:
    tokens = read_header(smollm2_gguf).metadata["tokenizer.ggml.tokens"]
    vocab = smollm2.tokenizer.get_vocab()
    assert len(vocab) == len(tokens) == 49152
    assert all(vocab[token] == i for i, token in enumerate(tokens))


@pytest.mark.parametrize(
    "text",
    ["What is the capital of France?", "  indented\n\tcode()  ", "naïve café — 東京 🙂", "x=2024"],
    ids=["question", "whitespace", "unicode", "digits"],
)
def test_tokenizer_round_trips(smollm2: Imported, text: str) -> None:
    ids = smollm2.tokenizer.encode(text)
    assert smollm2.tokenizer.decode(ids) == text


def test_tokenizer_specials(smollm2: Imported) -> None:
    tokenizer = smollm2.tokenizer
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.encode("<|endoftext|>") == [0]
    assert tokenizer.eos_token_ids == {2}
    # SmolLM2 splits numbers into single digits; its vocabulary has no multi-digit tokens.
    assert tokenizer.encode("2024") == [tokenizer.get_vocab()[d] for d in "2024"]


def test_chat_template(smollm2: Imported) -> None:
    tokenizer = smollm2.tokenizer
    assert tokenizer.chat_template is not None
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_kept_quantized_import_matches_the_float_import(
    smollm2: Imported, smollm2_gguf: Path, tmp_path: Path
) -> None:
    """The quantized layout (what GPUs get) holds the same numbers as the dequantized one."""
    path = import_gguf(smollm2_gguf, tmp_path / "q", dtype="quantized", progress=False)
    config = mlx_lm.utils.load_config(path)
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    quantized = mx.load(str(path / "model.safetensors"))
    dense = mx.load(str(smollm2.path / "model.safetensors"))
    assert isinstance(quantized, dict)
    assert isinstance(dense, dict)
    for module, bits in [
        ("model.layers.0.self_attn.q_proj", 4),
        ("model.layers.29.self_attn.k_proj", 4),
        ("model.embed_tokens", 8),
    ]:
        w, scales, biases = (quantized[f"{module}.{k}"] for k in ("weight", "scales", "biases"))
        restored = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), 32, bits)
        assert mx.allclose(restored, dense[f"{module}.weight"].astype(mx.float32), atol=1e-6)
