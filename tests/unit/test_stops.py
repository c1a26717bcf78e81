from __future__ import annotations

import pytest

from mlxd.stops import StopMatcher

CASES = [
    ("no-stops", [], "Hello world", "Hello world", False),
    ("simple", ["world"], "Hello world!", "Hello ", True),
    ("first-of-several", ["o w", "d!"], "Hello world!", "Hell", True),
    ("earliest-wins", ["!", "Hello"], "Hello!", "", True),
    ("absent", ["xyz"], "Hello world", "Hello world", False),
    ("partial-at-end-released", ["world peace"], "Hello world", "Hello world", False),
    ("unicode", ["€"], "cost: 5€ total", "cost: 5", True),
    ("newline", ["\n\n"], "line one\n\nline two", "line one", True),
]


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = []
    for piece in pieces:
        r = m.feed(piece)
        out.append(r.text)
        if r.stopped:
            return "".join(out), True
    out.append(m.finish())
    return "".join(out), False


@pytest.mark.parametrize(("stops", "text", "expected", "stopped"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_every_chunking_gives_the_same_result(
    stops: list[str], text: str, expected: str, stopped: bool
) -> None:
    assert run(stops, [text]) == (expected, stopped)
    assert run(stops, list(text)) == (expected, stopped)
    for cut in range(1, len(text)):
        assert run(stops, [text[:cut], text[cut:]]) == (expected, stopped), cut


def test_holds_back_only_a_possible_prefix() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST").text == "abc "
    assert m.feed("x").text == "STx"  # "STx" can no longer become "STOP"
    assert m.feed("S").text == ""
    assert m.finish() == "S"
