"""How many prompt tokens to prefill in a step that also decodes running streams.

A step that prefills a chunk beside the decode step delays every running stream's next token.
The aim is that such a step costs about ``INTERLEAVE_COST`` decode-only steps, so the streams'
inter-token time while a long prompt joins stays near that multiple of its idle value, and that
the joining prompt still makes the most progress that allows.

Chunk sizes are powers of two (up to the model's full prefill chunk): a backend that builds
kernels per shape (MLX's CUDA backend) pays that once per size, not once per step. The cost of
each size is measured as the step runs, never assumed: the least of its last few costs, so a
one-off (the first use of a shape, a hiccup) does not condemn a size for good, and a size is
tried twice before the sizer gives up on it. When no size fits the
budget because a fixed per-step cost dominates (shrinking the chunk does not make the step
cheaper), smaller chunks would only slow the joiner down without helping the streams, so the
sizer moves to the size with the best prefill throughput instead.
"""

from __future__ import annotations

from collections import deque

INTERLEAVE_COST = 2.0
MIN_CHUNK = 16
FIRST_CHUNK = 128
_KEEP = 3  # observations remembered per size
_TRIES = 2  # observations before a size's cost is trusted


def sizes(full: int) -> list[int]:
    """The chunk sizes used while decoding: powers of two from ``MIN_CHUNK``, then ``full``."""
    out = []
    size = MIN_CHUNK
    while size < full:
        out.append(size)
        size *= 2
    out.append(max(full, 1))
    return out


class ChunkSizer:
    """Chooses the next interleaved prefill chunk from the measured cost of earlier steps."""

    def __init__(self, full: int = 2048) -> None:
        self.decode_step: float | None = None  # smoothed seconds of a decode-only step
        self.seen: dict[int, deque[float]] = {}  # chunk size -> seconds it added to recent steps
        self.interleaved_steps = 0
        self.full = 0
        self.sizes: list[int] = []
        self.chunk = 0
        self.set_full(full)

    def set_full(self, full: int) -> None:
        """The model's (request's) full prefill chunk: the largest size and the lone-prompt one."""
        if full == self.full:
            return
        self.full = full
        self.sizes = sizes(full)
        self.seen = {c: e for c, e in self.seen.items() if c in self.sizes}
        self.chunk = self._nearest(self.chunk or FIRST_CHUNK)

    def step_size(self, decoding: int) -> int:
        """The prefill chunk for the next step: the full one when nobody is decoding."""
        return self.chunk if decoding else self.full

    def observe(self, elapsed: float, decoding: int, prefilled: bool) -> None:
        """Account for a finished step (``elapsed`` seconds) and choose the next chunk."""
        if not decoding:
            return
        if not prefilled:
            prev = self.decode_step
            self.decode_step = elapsed if prev is None else 0.8 * prev + 0.2 * elapsed
            return
        self.interleaved_steps += 1
        if self.decode_step is None:
            return
        seen = self.seen.setdefault(self.chunk, deque(maxlen=_KEEP))
        seen.append(max(elapsed - self.decode_step, 1e-6))
        self.chunk = self._next()

    # ---- choosing -----------------------------------------------------------------------------

    def _nearest(self, chunk: int) -> int:
        fitting = [c for c in self.sizes if c <= chunk]
        return fitting[-1] if fitting else self.sizes[0]

    def _cost(self, size: int) -> float | None:
        """What ``size`` adds to a step, once it has been tried enough to say."""
        seen = self.seen.get(size)
        return min(seen) if seen is not None and len(seen) >= _TRIES else None

    def _throughput(self, size: int) -> float:
        assert self.decode_step is not None
        return size / (self.decode_step + min(self.seen[size]))

    def _next(self) -> int:
        assert self.decode_step is not None
        wanted = (INTERLEAVE_COST - 1.0) * self.decode_step
        i = self.sizes.index(self.chunk)
        up = self.sizes[i + 1] if i + 1 < len(self.sizes) else None
        cost = self._cost(self.chunk)
        if cost is None:
            cost = min(self.seen[self.chunk])
            if cost > wanted:
                return self.chunk  # once more before judging it
        if cost <= wanted:
            # Within budget: try the next size up unless it is known to cost too much.
            up_cost = None if up is None else self._cost(up)
            if up is not None and (up_cost is None or up_cost <= wanted):
                return up
            return self.chunk
        smaller = self.sizes[:i]
        if smaller and self._cost(smaller[-1]) is None:
            return smaller[-1]  # not judged yet: it may fit
        fitting = [c for c in smaller if (c_cost := self._cost(c)) is not None and c_cost <= wanted]
        if fitting:
            return fitting[-1]
        # No size fits: a fixed cost per step dominates; make the most prefill progress.
        best = max(self.seen, key=self._throughput)
        if best == self.chunk and up is not None and self._cost(up) is None:
            return up
        return best
