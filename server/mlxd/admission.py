"""Whether a request may run now, decided from numbers alone.

`decide` is a pure function: given what the request needs (`Need`, from
:func:`mlxd.estimate.request.estimate_request`) and how things stand (`State`: the budget, what the
machine can still give, the resident model, pressure, the queue), it answers

- ``join``: the model is resident and the sequence fits beside the running batch (its KV cache
  and working memory next to the reservations of the sequences already running, and the batch
  is below ``max_concurrency``): it joins the batch now. mlx-lm's batch cache holds every
  sequence at the length of the longest (left-padded), so a sequence joining a batch pays
  for the padding too (`batch_padding`);
- ``swap``: load the model (unloading the idle resident one, if any) and then run it;
- ``swap_after_drain``: another model is serving; let its batch drain (nothing new joins it
  meanwhile, so the wait is bounded by what already runs), then swap;
- ``wait``: it will fit once a running sequence finishes, or the memory pressure clears;
- ``reject``: it never fits the budget, it exceeds the context, or the queue is full.

Loading, unloading and queueing are the caller's (:mod:`server.manager` carries the decision
out and keeps the one record of the resident model and its running sequences): this module
only decides, so every rule is a table row in the tests. A waiting request reserves nothing;
a sequence's reservation starts when it joins and ends when it leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from mlxd.errors import ContextLengthExceeded, InsufficientMemory, MlxdError, Overloaded
from mlxd.memory.pressure import PressureLevel
from mlxd.memory.sizes import format_size
from mlxd.settings import DEFAULT_QUEUE_SIZE


@dataclass(frozen=True)
class Need:
    """What one request asks for, in bytes and tokens."""

    model: str
    weights: int  # the model's weights once loaded
    request: int  # what the request adds at its peak: KV cache + working memory
    prompt_tokens: int
    max_tokens: int
    context_limit: int | None = None
    # ``request`` for another ``max_tokens``, non-decreasing in it (an estimate with a
    # different max_tokens); lets a refusal say how many tokens would fit.
    request_for: Callable[[int], int] | None = None
    kv_per_token: int = 0  # cache bytes of one more token (for the batch's padding)


@dataclass(frozen=True)
class Resident:
    """The loaded model and the requests it is serving."""

    model: str
    weights: int
    active: int = 0  # sequences admitted and not finished (the running batch)
    reserved: int = 0  # the sum of their ``Need.request``
    max_concurrency: int | None = None  # the most sequences the batch may hold
    longest: int = 0  # the most tokens (prompt + max_tokens) a running sequence may reach


@dataclass(frozen=True)
class State:
    """How things stand when the request arrives.

    ``budget`` is :attr:`mlxd.memory.budget.MemoryBudget.limit`. ``headroom`` is what can
    be allocated right now without swapping: :meth:`mlxd.memory.budget.MemoryBudget.headroom`
    less the part of running requests' reservations they have not allocated yet.
    """

    budget: int
    headroom: int
    resident: Resident | None = None
    pressure: PressureLevel = PressureLevel.GREEN
    queued: int = 0  # requests already waiting
    queue_limit: int = DEFAULT_QUEUE_SIZE
    retry_after: int = 5  # seconds, for a refusal because the queue is full


class DecisionKind(str, Enum):
    JOIN = "join"
    WAIT = "wait"
    SWAP = "swap"
    DRAIN = "swap_after_drain"
    REJECT = "reject"


class Reason(str, Enum):
    FITS = "fits"  # join
    LOAD = "load"  # swap into an empty slot
    SWAP_IDLE = "swap_idle"  # swap out an idle model
    RESIDENT_BUSY = "resident_busy"  # swap after drain: another model is serving requests
    BATCH_FULL = "batch_full"  # wait: the batch holds max_concurrency sequences
    MEMORY_BUSY = "memory_busy"  # wait: this model's running requests hold the memory
    MACHINE_BUSY = "machine_busy"  # wait: other programs hold the memory
    PRESSURE = "memory_pressure"  # wait: the OS is short of memory
    CONTEXT = "context_length_exceeded"  # reject
    INSUFFICIENT_MEMORY = "insufficient_memory"  # reject: never fits the budget
    OVERLOADED = "overloaded"  # reject: the wait queue is full


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    reason: Reason
    message: str
    need: int  # bytes that had to fit: the request, plus the weights when loading
    available: int  # bytes there were for it under the rule that decided
    unload: str | None = None  # swap: the resident model to unload first
    max_tokens_fit: int | None = None  # reject: the largest max_tokens that would fit
    retry_after: int | None = None  # reject because overloaded

    def error(self) -> MlxdError:
        """The client-facing error of a refusal (only for ``reject``)."""
        if self.kind is not DecisionKind.REJECT:
            raise ValueError(f"a {self.kind.value} decision is not an error")
        if self.reason is Reason.CONTEXT:
            return ContextLengthExceeded(self.message, param="max_tokens")
        if self.reason is Reason.INSUFFICIENT_MEMORY:
            param = "max_tokens" if self.max_tokens_fit is not None else "messages"
            return InsufficientMemory(self.message, param=param)
        return Overloaded(self.message, retry_after=self.retry_after or 1)


def decide(need: Need, state: State) -> Decision:
    """Admit, swap, wait or reject ``need`` given ``state`` (see the module docstring)."""
    refused = _context(need) or _never_fits(need, state)
    if refused is not None:
        return refused
    decision = _place(need, state)
    waits = decision.kind in (DecisionKind.WAIT, DecisionKind.DRAIN)
    if waits and state.queued >= state.queue_limit:
        return Decision(
            DecisionKind.REJECT,
            Reason.OVERLOADED,
            f"the server is busy ({state.queued} requests waiting: {decision.message}); "
            f"retry in {state.retry_after} s",
            decision.need,
            decision.available,
            retry_after=state.retry_after,
        )
    return decision


def _context(need: Need) -> Decision | None:
    limit = need.context_limit
    wanted = need.prompt_tokens + need.max_tokens
    if limit is None or wanted <= limit:
        return None
    room = limit - need.prompt_tokens
    return Decision(
        DecisionKind.REJECT,
        Reason.CONTEXT,
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{wanted} tokens ({need.prompt_tokens} in the messages, {need.max_tokens} in the "
        "completion). Please reduce the length of the messages or completion.",
        wanted,
        limit,
        max_tokens_fit=room if room > 0 else None,
    )


def _never_fits(need: Need, state: State) -> Decision | None:
    total = need.weights + need.request
    if total <= state.budget:
        return None
    fit = _largest_fitting_max_tokens(need, state.budget)
    hint = (
        f" With max_tokens <= {fit} it would fit."
        if fit is not None
        else " Use a smaller model or a shorter prompt."
    )
    return Decision(
        DecisionKind.REJECT,
        Reason.INSUFFICIENT_MEMORY,
        f"'{need.model}' needs {format_size(total)} for this request "
        f"({format_size(need.weights)} of weights + {format_size(need.request)} of KV cache "
        f"and working memory for {need.prompt_tokens} + {need.max_tokens} tokens), more "
        f"than the memory budget of {format_size(state.budget)}.{hint}",
        total,
        state.budget,
        max_tokens_fit=fit,
    )


def _largest_fitting_max_tokens(need: Need, budget: int) -> int | None:
    """Binary search over ``request_for``; ``None`` when not even one token fits."""
    request_for = need.request_for
    room = budget - need.weights
    if request_for is None or need.max_tokens <= 1 or request_for(1) > room:
        return None
    lo, hi = 1, need.max_tokens - 1  # lo fits; the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if request_for(mid) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def batch_padding(need: Need, resident: Resident) -> int:
    """Cache bytes a joining sequence adds beyond its own estimate: mlx-lm's batch cache is as
    long as its longest sequence, so a shorter joiner is padded to the batch's length, and a
    longer one pads every running sequence to its own."""
    if resident.active == 0:
        return 0
    own = need.prompt_tokens + need.max_tokens
    short = max(0, resident.longest - own)
    long = max(0, own - resident.longest)
    return need.kv_per_token * (short + resident.active * long)


def _place(need: Need, state: State) -> Decision:
    if state.pressure is PressureLevel.RED:
        return Decision(
            DecisionKind.WAIT,
            Reason.PRESSURE,
            "memory pressure is high; waiting for it to ease",
            need.request,
            state.headroom,
        )
    resident = state.resident
    if resident is not None and resident.model == need.model:
        limit = resident.max_concurrency
        if limit is not None and resident.active >= limit:
            return Decision(
                DecisionKind.WAIT,
                Reason.BATCH_FULL,
                f"the batch is full ({resident.active} of max_concurrency {limit} running)",
                need.request,
                0,
            )
        planned = state.budget - resident.weights - resident.reserved
        room = min(planned, state.headroom)
        wanted = need.request + batch_padding(need, resident)
        if wanted <= room:
            return Decision(
                DecisionKind.JOIN,
                Reason.FITS,
                f"fits: {format_size(wanted)} of {format_size(room)} free",
                wanted,
                room,
            )
        busy = resident.active > 0
        holders = f"{resident.active} running request(s)" if busy else "other programs"
        return Decision(
            DecisionKind.WAIT,
            Reason.MEMORY_BUSY if busy else Reason.MACHINE_BUSY,
            f"needs {format_size(wanted)} but {holders} leave {format_size(max(0, room))} free",
            wanted,
            room,
        )
    total = need.weights + need.request
    if resident is not None and resident.active > 0:
        return Decision(
            DecisionKind.DRAIN,
            Reason.RESIDENT_BUSY,
            f"'{resident.model}' is serving {resident.active} request(s); "
            f"'{need.model}' loads once they finish (nothing new joins them meanwhile)",
            total,
            state.headroom,
        )
    freed = resident.weights if resident is not None else 0
    room = min(state.budget, state.headroom + freed)
    if total > room:
        return Decision(
            DecisionKind.WAIT,
            Reason.MACHINE_BUSY,
            f"loading '{need.model}' needs {format_size(total)} but other programs leave "
            f"{format_size(max(0, room))} free",
            total,
            room,
        )
    if resident is None:
        return Decision(DecisionKind.SWAP, Reason.LOAD, f"load '{need.model}'", total, room)
    return Decision(
        DecisionKind.SWAP,
        Reason.SWAP_IDLE,
        f"unload idle '{resident.model}', load '{need.model}'",
        total,
        room,
        unload=resident.model,
    )
