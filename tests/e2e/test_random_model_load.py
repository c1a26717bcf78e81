"""A tiny random Qwen3 directory loads with mlx_lm and generates a scripted output exactly."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx_lm
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper

from tools.random_model import ScriptedLogits, build_random_qwen3, main

pytestmark = pytest.mark.e2e

SCRIPT = '<think>\nhmm\n</think>\n\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@dataclass
class Loaded:
    build: str
    path: Path
    model: Any
    tokenizer: TokenizerWrapper


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer cache per test session, shared by the unit and e2e modules."""
    return tmp_path_factory.getbasetemp() / "qwen-token-cache"


# Unquantized in one file, and 4-bit split over several shards (each tensor is about 5 MB or less).
BUILDS: dict[str, dict[str, Any]] = {
    "bf16": {"bits": None},
    "4bit-sharded": {"bits": 4, "max_shard_bytes": 4 << 20},
}


@pytest.fixture(scope="session", params=list(BUILDS), ids=list(BUILDS))
def tiny(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, token_cache: Path
) -> Loaded:
    path = build_random_qwen3(
        tmp_path_factory.mktemp(request.param),
        "tiny",
        cache_dir=token_cache,
        **BUILDS[request.param],
    )
    loaded = mlx_lm.load(str(path))
    return Loaded(request.param, path, loaded[0], loaded[1])


def test_scripted_generation_is_exact(tiny: Loaded) -> None:
    tok = tiny.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Call f."}], tools=TOOLS, add_generation_prompt=True
    )
    end = tok.convert_tokens_to_ids("<|im_end|>")
    script = [*tok.encode(SCRIPT, add_special_tokens=False), end]
    # A small prefill step makes mlx_lm feed the prompt in chunks before the first processor call.
    for prefill_step_size in (2048, 16):
        text, finish = "", None
        for response in mlx_lm.stream_generate(
            tiny.model,
            tok,
            prompt,
            max_tokens=64,
            prefill_step_size=prefill_step_size,
            logits_processors=[ScriptedLogits(script)],
        ):
            text += response.text
            finish = response.finish_reason
        assert (text, finish) == (SCRIPT, "stop")


def test_mlx_lm_sees_a_qwen_checkpoint(tiny: Loaded) -> None:
    tok = tiny.tokenizer
    assert tok.eos_token_ids == {151645, 151643}
    assert (tok.think_start_id, tok.think_end_id) == (151667, 151668)
    assert tok.tool_call_start == "<tool_call>"  # mlx_lm recognised the JSON tool-call template
    args = tiny.model.args
    assert (args.model_type, args.vocab_size, args.num_hidden_layers) == ("qwen3", 151936, 2)
    index = json.loads((tiny.path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == sorted(p.name for p in tiny.path.glob("model*.safetensors"))


def test_shards_follow_mlx_lm_naming(tiny: Loaded) -> None:
    files = sorted(p.name for p in tiny.path.glob("model*.safetensors"))
    assert (len(files) > 1) == ("max_shard_bytes" in BUILDS[tiny.build])
    if len(files) == 1:
        assert files == ["model.safetensors"]
    else:
        assert files == [
            f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
        ]


def test_qwen3_6_vocab_starts_generation_inside_reasoning(
    tmp_path: Path, token_cache: Path
) -> None:
    path = build_random_qwen3(tmp_path / "m", "tiny", vocab="qwen3_6", cache_dir=token_cache)
    model, tok = mlx_lm.load(str(path))[:2]
    assert tok.eos_token_ids == {248046, 248044}
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(prompt, str)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    answer = "hmm\n</think>\n\nHello 👋"
    script = [*tok.encode(answer, add_special_tokens=False), 248046]
    text = "".join(
        r.text
        for r in mlx_lm.stream_generate(
            model,
            tok,
            tok.encode(prompt),
            max_tokens=32,
            logits_processors=[ScriptedLogits(script)],
        )
    )
    assert text == answer


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_seed_decides_the_weights(tmp_path: Path, token_cache: Path) -> None:
    builds = {
        name: build_random_qwen3(tmp_path / name, "tiny", seed=seed, cache_dir=token_cache)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    }
    assert _digest(builds["a"]) == _digest(builds["b"])
    assert _digest(builds["a"]) != _digest(builds["c"])


def test_cli_builds_a_directory(
    tmp_path: Path,
    token_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MLXD_CACHE_DIR", str(token_cache))
    assert main(["--shape", "tiny", "--bits", "8", "--out", str(tmp_path / "m")]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert "Qwen3 tiny 8-bit" in capsys.readouterr().out
