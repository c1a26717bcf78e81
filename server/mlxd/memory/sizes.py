"""Sizes for people: ``--memory-budget 6GB`` in, ``"5.59 GiB"`` out (binary units)."""

from __future__ import annotations

import re

KIB = 1024
MIB = 1024**2
GIB = 1024**3


class InvalidSizeError(ValueError):
    """A size string such as ``--memory-budget 6GB`` could not be parsed."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS: dict[str, int] = {"": 1, "b": 1} | {
    f"{letter}{tail}": 1024**power
    for power, letter in enumerate("kmgt", start=1)
    for tail in ("", "b", "ib")
}


def parse_size(text: str) -> int:
    """Parse a human size into bytes: ``6GB``, ``6G``, ``6GiB``, ``512MB``, ``1.5 gb``, ``4096``.

    Every unit is binary: ``GB``, ``G`` and ``GiB`` all mean 2³⁰ bytes. Memory is sold and
    reported that way (a "16 GB" Mac has 16 GiB; Activity Monitor and ``free -g`` count in
    GiB), so ``--memory-budget 12GB`` on a 16 GB machine means what its owner expects.
    Case-insensitive; a plain number is bytes.
    """
    match = _SIZE_RE.match(text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise InvalidSizeError(
            f"invalid size {text!r}: use bytes or a number with a unit such as 6GB, 6G, "
            "6GiB or 512MB (all binary: 1 GB = 1024 MB)"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    """Render bytes for people, in binary units (``"5.59 GiB"``, ``"512.00 MiB"``)."""
    for unit, scale in (("TiB", 1024**4), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
