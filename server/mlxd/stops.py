"""Stop sequences over streamed text.

A stop string can arrive split over several tokens ("Par" + "is"), so text that could still be
the beginning of a stop string is held back until the next piece decides it. Only that much is
held: everything before it is released at once, which keeps streaming latency at one token.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopResult:
    text: str  # safe to emit now
    stopped: bool  # a stop sequence matched; ``text`` ends right before it
    stop: str | None = None  # which one


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> StopResult:
        if not self.stops:
            return StopResult(text, False)
        buf = self._pending + text
        first, stop = min(
            ((i, s) for s, i in ((s, buf.find(s)) for s in self.stops) if i >= 0),
            default=(-1, None),
        )
        if first >= 0:
            self._pending = ""
            return StopResult(buf[:first], True, stop)
        keep = self._held_suffix(buf)
        self._pending = buf[len(buf) - keep :]
        return StopResult(buf[: len(buf) - keep], False)

    def finish(self) -> str:
        """Release what was held back (the output ended without completing a stop string)."""
        rest, self._pending = self._pending, ""
        return rest

    def _held_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        for n in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
