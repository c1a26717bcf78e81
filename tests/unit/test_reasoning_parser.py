"""ThinkSplitter: every case gives the same reasoning and content whatever the chunking."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mlxd.parsers.reasoning import ThinkSplitter, prompt_opens_reasoning
from tests.chunkings import chunkings


def split(chunks: list[str], start_in_reasoning: bool) -> tuple[str, str]:
    splitter = ThinkSplitter(start_in_reasoning=start_in_reasoning)
    reasoning, content = [], []
    for piece in [*(splitter.feed(c) for c in chunks), splitter.finish()]:
        reasoning.append(piece.reasoning)
        content.append(piece.content)
    return "".join(reasoning), "".join(content)


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    reasoning: str
    content: str
    start_in_reasoning: bool = False


CASES = [
    Case("no-think", "Hello there.", "", "Hello there."),
    Case("think-block", "<think>\nLet me see.\n</think>\n\nParis.", "Let me see.", "Paris."),
    Case("whitespace-before-think", "\n  <think>x</think>y", "x", "y"),
    Case("blank-lines-inside", "<think>\na\n\nb\n</think>\n\nc", "a\n\nb", "c"),
    Case("empty-think", "<think>\n\n</think>\n\nHi", "", "Hi"),
    Case("think-later-is-text", "Hi <think>x</think>", "", "Hi <think>x</think>"),
    Case("longer-tag-is-text", "<thinking>x", "", "<thinking>x"),
    Case("close-lookalike", "<think>a </thinker> b</think>c", "a </thinker> b", "c"),
    Case("ends-in-reasoning", "<think>\nstill thinking\n", "still thinking\n", ""),
    Case("ends-in-partial-close", "<think>a</thi", "a</thi", ""),
    Case("ends-in-partial-open", " <thi", "", " <thi"),
    Case("only-whitespace", "\n\n", "", "\n\n"),
    Case("second-close-is-content", "<think>a</think>b</think>", "a", "b</think>"),
    Case("unicode", "<think>생각 🤔\n</think>\n\n답 ✓", "생각 🤔", "답 ✓"),
    Case("content-layout-kept", "<think>a</think>\n\nl1\n\nl2\n", "a", "l1\n\nl2\n"),
    Case("spaces-before-close-kept", "<think>a \n</think> b", "a ", " b"),
    Case(
        "prompt-opened",
        "Let me think.\n</think>\n\nAnswer.",
        "Let me think.",
        "Answer.",
        start_in_reasoning=True,
    ),
    Case("prompt-opened-newline-first", "\nx\n</think>\n\ny", "x", "y", start_in_reasoning=True),
    Case("prompt-opened-no-close", "still going", "still going", "", start_in_reasoning=True),
    Case("prompt-opened-empty", "</think>\n\nHi", "", "Hi", start_in_reasoning=True),
    Case("prompt-opened-think-is-text", "<think>a</think>b", "<think>a", "b", True),
    Case("prompt-opened-nothing", "", "", "", start_in_reasoning=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_split_is_the_same_for_every_chunking(case: Case) -> None:
    for chunks in chunkings(case.text):
        assert split(chunks, case.start_in_reasoning) == (case.reasoning, case.content), chunks


def test_text_is_emitted_as_soon_as_it_cannot_be_a_marker() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("  ").content == ""  # a <think> may still follow
    assert splitter.feed("Hi").content == "  Hi"
    assert splitter.feed(" <think>").content == " <think>"

    splitter = ThinkSplitter(start_in_reasoning=True)
    assert splitter.feed("\nabc").reasoning == "abc"
    assert splitter.feed(" </th").reasoning == " "
    assert splitter.feed("e").reasoning == "</the"
    assert splitter.feed("\n").reasoning == ""  # newlines right before </think> are dropped
    assert splitter.feed("d").reasoning == "\nd"
    assert splitter.in_reasoning
    piece = splitter.feed("\n</think>\n\nok")
    assert (piece.reasoning, piece.content) == ("", "ok")
    assert not splitter.in_reasoning


@pytest.mark.parametrize(
    ("prompt", "opens"),
    [
        ("<|im_start|>assistant\n", False),
        ("<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("<think>\nold\n</think>\n\nx<|im_start|>assistant\n<think>\n", True),
        ("<think>\n</think><|im_start|>assistant\n", False),
    ],
    ids=["no-think", "opened", "thinking-off", "old-turn-then-opened", "closed"],
)
def test_prompt_opens_reasoning(prompt: str, opens: bool) -> None:
    assert prompt_opens_reasoning(prompt) is opens
