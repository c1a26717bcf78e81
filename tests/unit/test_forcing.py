"""tool_choice enforcement: prefixes, forcing and banning processors, real Qwen tokens."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import cast

import mlx.core as mx
import pytest
from tokenizers import Tokenizer

from server.parsers import HermesToolParser
from server.parsers.forcing import (
    BanTokens,
    PrefixForcer,
    ToolCallFormat,
    forced_prefix,
)
from server.random_model import (
    VOCABS,
    ScriptedLogits,
    build_qwen_tokenizer,
    qwen3_config,
)

VOCAB = 32


@pytest.mark.parametrize(
    ("fmt", "name", "prefix"),
    [
        ("json", None, "<tool_call>\n"),
        ("xml", None, "<tool_call>\n"),
        ("json", "get_weather", '<tool_call>\n{"name": "get_weather", "arguments": '),
        ("xml", "get_weather", "<tool_call>\n<function=get_weather>\n"),
        ("json", 'odd"name', '<tool_call>\n{"name": "odd\\"name", "arguments": '),
    ],
    ids=["json-required", "xml-required", "json-named", "xml-named", "json-name-escaped"],
)
def test_forced_prefix(fmt: ToolCallFormat, name: str | None, prefix: str) -> None:
    assert forced_prefix(fmt, name) == prefix


def drive(
    processor: PrefixForcer, prompt: list[int], free: list[int]
) -> tuple[dict[int, int], list[bool]]:
    """Generate len(free) tokens: the forced one where the processor forces, else free[step].

    Returns {step: forced token} and, per step, whether the processor had declared itself done.
    """
    tokens = list(prompt)
    forced: dict[int, int] = {}
    done = []
    for step, token in enumerate(free):
        logits = mx.random.normal((1, VOCAB), key=mx.random.key(step)).astype(mx.bfloat16)
        out = processor(mx.array(tokens), logits)
        assert out.shape == logits.shape and out.dtype == logits.dtype
        finite = mx.isfinite(out[0])
        if finite.sum().item() == 1:
            token = cast(int, mx.argmax(finite).item())
            forced[step] = token
            assert out[0, token].item() == 0
        else:
            assert mx.array_equal(out, logits).item()
        done.append(processor.done)
        tokens.append(token)
    return forced, done


PREFIX = [3, 9, 4]
FORCER_CASES = [
    # (id, prompt, wait_for, generated without forcing, {step: forced token})
    ("from-first-token", [1, 2], None, [5] * 8, {0: 3, 1: 9, 2: 4}),
    ("after-wait", [1, 2], [20, 21], [5, 20, 21, 0, 0, 0, 7, 20, 21, 8, 5, 5], {3: 3, 4: 9, 5: 4}),
    ("wait-at-first-step", [1, 2], [20], [20, 0, 0, 0, 5, 5, 5], {1: 3, 2: 9, 3: 4}),
    ("wait-only-in-prompt", [20, 21], [20, 21], [5, 6, 7, 8, 9, 10], {}),
    ("wait-straddles-prompt", [1, 20], [20, 21], [21, 5, 6, 7, 8], {}),
    ("wait-interrupted", [1], [20, 21], [20, 5, 21, 20, 6, 21, 7, 8], {}),
]


@pytest.mark.parametrize(
    ("prompt", "wait_for", "free", "forced"),
    [c[1:] for c in FORCER_CASES],
    ids=[c[0] for c in FORCER_CASES],
)
@pytest.mark.parametrize("give_prompt_len", [True, False], ids=["prompt-len", "first-call"])
def test_prefix_forcer(
    prompt: list[int],
    wait_for: list[int] | None,
    free: list[int],
    forced: dict[int, int],
    give_prompt_len: bool,
) -> None:
    forcer = PrefixForcer(PREFIX, len(prompt) if give_prompt_len else None, wait_for)
    got, done = drive(forcer, prompt, free)
    assert got == forced
    if forced:
        last = max(forced)
        # Done is learnt at once without waiting, two steps late while waiting for a sequence.
        first_done = last + 1 if wait_for is None else last + 2
        assert done == [step >= first_done for step in range(len(free))]


def test_prefix_forcer_rejects_empty_sequences() -> None:
    with pytest.raises(ValueError):
        PrefixForcer([], 3)
    with pytest.raises(ValueError):
        PrefixForcer([1], 3, wait_for=[])


def test_ban_tokens() -> None:
    logits = mx.random.normal((1, VOCAB), key=mx.random.key(0))
    out = BanTokens([7, 3, 7])(mx.array([1, 2]), logits)
    banned = mx.arange(VOCAB) < 0
    banned[mx.array([3, 7])] = True
    assert mx.all(mx.isneginf(out[0]) == banned).item()
    assert mx.array_equal(mx.where(banned, 0, out), mx.where(banned, 0, logits)).item()
    with pytest.raises(ValueError):
        BanTokens([VOCAB])(mx.array([1]), logits)
    with pytest.raises(ValueError):
        BanTokens([])


# --------------------------------------------------------------------------- real Qwen tokens


@functools.cache
def qwen_tokenizer(vocab: str) -> Tokenizer:
    """The real Qwen tokenizer; its build is cached in mlxd's default cache dir."""
    with tempfile.TemporaryDirectory() as out:
        build_qwen_tokenizer(Path(out), vocab)
        return Tokenizer.from_file(str(Path(out) / "tokenizer.json"))


@pytest.mark.parametrize("vocab", sorted(VOCABS))
@pytest.mark.parametrize(
    ("fmt", "name"),
    [("json", None), ("json", "get_weather"), ("xml", "get_weather"), ("xml", "write_file")],
    ids=["required", "json-named", "xml-named", "xml-named-other"],
)
def test_prefix_tokens_round_trip(vocab: str, fmt: ToolCallFormat, name: str | None) -> None:
    tokenizer = qwen_tokenizer(vocab)
    prefix = forced_prefix(fmt, name)
    ids = tokenizer.encode(prefix, add_special_tokens=False).ids
    assert ids[0] == VOCABS[vocab].token_id("<tool_call>")
    assert tokenizer.decode(ids, skip_special_tokens=False) == prefix
    assert tokenizer.encode("</think>", add_special_tokens=False).ids == [
        VOCABS[vocab].token_id("</think>")
    ]


def test_forced_call_through_mlx_lm_generation() -> None:
    """mlx-lm's pipelined loop, Qwen3.6 vocabulary with the prompt opening the reasoning:
    the model thinks (scripted), then the named call is forced, then it runs free."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.qwen3 import Model, ModelArgs

    vocab = VOCABS["qwen3_6"]
    tokenizer = qwen_tokenizer(vocab.name)

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    model = Model(ModelArgs.from_dict(qwen3_config("tiny", vocab.name, dtype="float32")))
    prompt = encode("<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    thinking = encode("Use the tool.\n</think>\n\n")
    prefix = encode(forced_prefix("xml", "get_weather"))
    forcer = PrefixForcer(prefix, len(prompt), wait_for=encode("</think>\n\n"))
    steps = generate_step(
        mx.array(prompt),
        model,
        max_tokens=len(thinking) + len(prefix) + 3,
        logits_processors=[ScriptedLogits(thinking), forcer],
    )
    generated = [cast(int, token) for token, _ in steps]  # typed as arrays, yielded as ints
    assert generated[: len(thinking) + len(prefix)] == thinking + prefix
    assert forcer.done
    text = tokenizer.decode(generated[len(thinking) :], skip_special_tokens=False)
    first = HermesToolParser().feed(text)
    assert [(d.index, d.name) for d in first.calls] == [(0, "get_weather")]
