"""Every way the parser tests split a text before feeding it in pieces."""

from __future__ import annotations

import random
from collections.abc import Iterator


def chunkings(text: str) -> Iterator[list[str]]:
    """Whole, every split in two, one character at a time, and a few random chunkings."""
    yield [text]
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]
    yield list(text)
    rng = random.Random(len(text))
    for _ in range(5):
        chunks, at = [], 0
        while at < len(text):
            size = rng.randint(1, 7)
            chunks.append(text[at : at + size])
            at += size
        yield chunks
