"""The admission decision as a table: admit, swap, wait or reject, and why."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from mlxd.admission import Decision, DecisionKind, Need, Reason, Resident, State, decide
from mlxd.errors import ContextLengthExceeded, InsufficientMemory, Overloaded
from mlxd.estimate.request import ModelProfile, estimate_request
from mlxd.memory.pressure import PressureLevel
from mlxd.memory.sizes import GIB, MIB

BUDGET = 12 * GIB


def need(
    model: str = "qwen",
    weights: int = 5 * GIB,
    request: int = GIB,
    prompt: int = 1000,
    max_tokens: int = 1000,
    context: int | None = 32768,
) -> Need:
    return Need(model, weights, request, prompt, max_tokens, context)


def state(
    resident: Resident | None = None,
    headroom: int = 7 * GIB,
    pressure: PressureLevel = PressureLevel.GREEN,
    queued: int = 0,
) -> State:
    return State(BUDGET, headroom, resident, pressure, queued, queue_limit=32, retry_after=5)


QWEN_IDLE = Resident("qwen", 5 * GIB)
QWEN_BUSY = Resident("qwen", 5 * GIB, active=2, reserved=6 * GIB)
OTHER_IDLE = Resident("llama", 6 * GIB)
OTHER_BUSY = Resident("llama", 6 * GIB, active=1, reserved=GIB)

# Tokens cost 0.5 MiB each on top of 1 GiB: 4,096 tokens → 3 GiB.
LINEAR = Need("big", 10 * GIB, 3 * GIB, 1000, 4096, None, request_for=lambda m: GIB + m * MIB // 2)


@pytest.mark.parametrize(
    ("n", "s", "kind", "reason", "available", "unload"),
    [
        # The model is resident: the request fits in what the budget and the machine leave.
        pytest.param(need(), state(QWEN_IDLE), DecisionKind.JOIN, Reason.FITS, 7 * GIB, None,
                     id="fits-with-resident-model"),
        pytest.param(need(), state(Resident("qwen", 5 * GIB, 1, 2 * GIB), headroom=4 * GIB),
                     DecisionKind.JOIN, Reason.FITS, 4 * GIB, None,
                     id="fits-beside-a-running-request"),
        pytest.param(need(request=2 * GIB), state(QWEN_BUSY, headroom=GIB), DecisionKind.WAIT,
                     Reason.MEMORY_BUSY, GIB, None, id="own-requests-hold-the-memory"),
        pytest.param(need(request=2 * GIB), state(QWEN_IDLE, headroom=GIB), DecisionKind.WAIT,
                     Reason.MACHINE_BUSY, GIB, None, id="other-programs-hold-the-memory"),
        # The batch's own limit: a sequence joins below max_concurrency, waits at it.
        pytest.param(need(), state(Resident("qwen", 5 * GIB, 3, GIB, max_concurrency=4)),
                     DecisionKind.JOIN, Reason.FITS, 6 * GIB, None, id="joins-below-concurrency"),
        pytest.param(need(), state(Resident("qwen", 5 * GIB, 4, GIB, max_concurrency=4)),
                     DecisionKind.WAIT, Reason.BATCH_FULL, 0, None, id="batch-full-waits"),
        # Another model, or none, is resident.
        pytest.param(need(), state(None, headroom=10 * GIB), DecisionKind.SWAP, Reason.LOAD,
                     10 * GIB, None, id="load-into-empty-slot"),
        pytest.param(need(), state(OTHER_IDLE, headroom=2 * GIB), DecisionKind.SWAP,
                     Reason.SWAP_IDLE, 8 * GIB, "llama",  # 2 free + 6 freed by the unload
                     id="needs-swap-resident-idle"),
        pytest.param(need(), state(OTHER_BUSY, headroom=2 * GIB), DecisionKind.DRAIN,
                     Reason.RESIDENT_BUSY, 2 * GIB, None, id="needs-swap-resident-busy"),
        pytest.param(need(), state(Resident("llama", 2 * GIB), headroom=GIB), DecisionKind.WAIT,
                     Reason.MACHINE_BUSY, 3 * GIB, None, id="swap-would-not-fit-yet"),
        pytest.param(need(), state(None, headroom=20 * GIB), DecisionKind.SWAP, Reason.LOAD,
                     BUDGET, None, id="load-limited-by-budget-not-free-ram"),
        # Never fits: weights + this request's KV exceed the budget, whatever is unloaded.
        pytest.param(LINEAR, state(None, headroom=12 * GIB), DecisionKind.REJECT,
                     Reason.INSUFFICIENT_MEMORY, BUDGET, None, id="never-fits"),
        # The context limit comes first.
        pytest.param(need(prompt=30000, max_tokens=4096), state(QWEN_IDLE), DecisionKind.REJECT,
                     Reason.CONTEXT, 32768, None, id="context-exceeded"),
        pytest.param(need(prompt=28672, max_tokens=4096), state(QWEN_IDLE), DecisionKind.JOIN,
                     Reason.FITS, 7 * GIB, None, id="context-exactly-full"),
        pytest.param(need(context=None, max_tokens=10**6), state(QWEN_IDLE), DecisionKind.JOIN,
                     Reason.FITS, 7 * GIB, None, id="no-context-limit"),
        # Pressure.
        pytest.param(need(), state(QWEN_IDLE, pressure=PressureLevel.RED), DecisionKind.WAIT,
                     Reason.PRESSURE, 7 * GIB, None, id="pressure-red-waits"),
        pytest.param(need(), state(QWEN_IDLE, pressure=PressureLevel.YELLOW), DecisionKind.JOIN,
                     Reason.FITS, 7 * GIB, None, id="pressure-yellow-admits"),
        # The queue bounds waiting, not admitting.
        pytest.param(need(), state(OTHER_BUSY, queued=32), DecisionKind.REJECT, Reason.OVERLOADED,
                     7 * GIB, None, id="queue-full-overloaded"),
        pytest.param(need(), state(QWEN_IDLE, pressure=PressureLevel.RED, queued=32),
                     DecisionKind.REJECT, Reason.OVERLOADED, 7 * GIB, None,
                     id="queue-full-under-pressure"),
        pytest.param(need(), state(OTHER_BUSY, queued=31), DecisionKind.DRAIN,
                     Reason.RESIDENT_BUSY, 7 * GIB, None, id="last-queue-place"),
        pytest.param(need(), state(QWEN_IDLE, queued=32), DecisionKind.JOIN, Reason.FITS,
                     7 * GIB, None, id="queue-full-but-fits-now"),
        pytest.param(LINEAR, state(OTHER_BUSY, queued=32), DecisionKind.REJECT,
                     Reason.INSUFFICIENT_MEMORY, BUDGET, None, id="never-fits-before-queue-full"),
    ],
)  # fmt: skip
def test_decide(
    n: Need,
    s: State,
    kind: DecisionKind,
    reason: Reason,
    available: int,
    unload: str | None,
) -> None:
    decision = decide(n, s)
    assert (decision.kind, decision.reason) == (kind, reason), decision.message
    assert decision.available == available
    assert decision.unload == unload


@pytest.mark.parametrize(
    ("n", "fit"),
    [
        # 1 GiB + m × 0.5 MiB ≤ 12 − 10 GiB ⇔ m ≤ 2,048
        pytest.param(LINEAR, 2048, id="halve-max-tokens"),
        pytest.param(replace(LINEAR, weights=11 * GIB + GIB // 2), None,
                     id="not-even-one-token"),  # 1 GiB fixed part > 0.5 GiB left
        pytest.param(replace(LINEAR, weights=13 * GIB), None, id="weights-alone-too-big"),
        pytest.param(replace(LINEAR, request_for=None), None, id="no-estimator"),
        pytest.param(replace(LINEAR, max_tokens=1, request=3 * GIB), None, id="already-one"),
    ],
)  # fmt: skip
def test_never_fits_says_how_many_tokens_would(n: Need, fit: int | None) -> None:
    decision = decide(n, state(None, headroom=BUDGET))
    assert decision.reason is Reason.INSUFFICIENT_MEMORY
    assert decision.max_tokens_fit == fit
    assert decision.need == n.weights + n.request
    assert "12.00 GiB" in decision.message  # the budget, in the message


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "fit"),
    [
        pytest.param(30000, 4096, 2768, id="shorten-completion"),
        pytest.param(32768, 10, None, id="prompt-fills-context"),
        pytest.param(40000, 10, None, id="prompt-alone-too-long"),
    ],
)
def test_context_exceeded_says_how_many_tokens_would_fit(
    prompt: int, max_tokens: int, fit: int | None
) -> None:
    decision = decide(need(prompt=prompt, max_tokens=max_tokens), state(QWEN_IDLE))
    assert decision.reason is Reason.CONTEXT
    assert decision.max_tokens_fit == fit
    assert f"{prompt} in the messages, {max_tokens} in the completion" in decision.message


@pytest.mark.parametrize(
    ("n", "s", "error", "status", "param"),
    [
        pytest.param(need(prompt=30000, max_tokens=4096), state(QWEN_IDLE),
                     ContextLengthExceeded, 400, "max_tokens", id="context"),
        pytest.param(LINEAR, state(), InsufficientMemory, 400, "max_tokens",
                     id="insufficient-with-hint"),
        pytest.param(replace(LINEAR, request_for=None), state(), InsufficientMemory, 400,
                     "messages", id="insufficient-without-hint"),
        pytest.param(need(), state(OTHER_BUSY, queued=40), Overloaded, 503, None,
                     id="overloaded"),
    ],
)  # fmt: skip
def test_refusals_become_openai_errors(
    n: Need, s: State, error: type[Exception], status: int, param: str | None
) -> None:
    decision = decide(n, s)
    err = decision.error()
    assert isinstance(err, error)
    assert err.status_code == status
    assert err.param == param
    assert err.message == decision.message


def test_overloaded_carries_retry_after() -> None:
    err = decide(need(), state(OTHER_BUSY, queued=32)).error()
    assert isinstance(err, Overloaded)
    assert err.headers == {"Retry-After": "5"}


@pytest.mark.parametrize(
    "kind", [DecisionKind.JOIN, DecisionKind.WAIT, DecisionKind.SWAP, DecisionKind.DRAIN]
)
def test_only_refusals_are_errors(kind: DecisionKind) -> None:
    with pytest.raises(ValueError, match=kind.value):
        Decision(kind, Reason.FITS, "", 0, 0).error()


def test_hint_from_a_real_estimate_fits_when_retried() -> None:
    # Qwen3-8B in 4 bits (≈4.6 GB) on a 16 GB Mac's 12.48 GiB budget, asking for 64k tokens:
    # 147,456 bytes of KV per token make that 9 GiB+ of cache.
    cfg = json.loads(
        (Path(__file__).parents[1] / "fixtures" / "configs" / "qwen3-8b.json").read_text()
    )
    profile = ModelProfile.from_config(cfg, weights=4_600_000_000, dtype_bytes=2)
    budget = int(16 * GIB * 0.78)

    def request_for(max_tokens: int) -> int:
        return estimate_request(profile, 2000, max_tokens, backend="metal").request

    asked = Need("qwen3-8b", profile.weights, request_for(64_000), 2000, 64_000, None, request_for)
    refusal = decide(asked, State(budget, budget))
    assert refusal.reason is Reason.INSUFFICIENT_MEMORY
    fit = refusal.max_tokens_fit
    assert fit is not None and 20_000 < fit < 64_000
    retried = replace(asked, request=request_for(fit), max_tokens=fit)
    assert decide(retried, State(budget, budget)).kind is DecisionKind.SWAP
    one_more = replace(asked, request=request_for(fit + 1), max_tokens=fit + 1)
    assert decide(one_more, State(budget, budget)).reason is Reason.INSUFFICIENT_MEMORY


KV = 100_000  # cache bytes per token of the batch tests below


@pytest.mark.parametrize(
    ("running", "longest", "own", "padding"),
    [
        pytest.param(0, 0, 1000, 0, id="alone-no-padding"),
        pytest.param(2, 4000, 1000, 3000 * KV, id="short-joiner-padded-to-the-batch"),
        pytest.param(2, 1000, 4000, 2 * 3000 * KV, id="long-joiner-pads-every-running-one"),
        pytest.param(3, 2000, 2000, 0, id="same-length"),
    ],
)  # fmt: skip
def test_a_joining_sequence_pays_for_the_batch_cache_padding(
    running: int, longest: int, own: int, padding: int
) -> None:
    """mlx-lm's batch cache holds every sequence at the longest one's length."""
    need = Need("m", GIB, 500 * MIB, own - 10, 10, kv_per_token=KV)
    resident = Resident("m", GIB, active=running, reserved=running * GIB, longest=longest)
    decision = decide(need, State(100 * GIB, 100 * GIB, resident))
    assert decision.kind is DecisionKind.JOIN
    assert decision.need == 500 * MIB + padding  # what the flight reserves
    # The padding can be what does not fit: just enough room for the request alone waits.
    tight = State(GIB + running * GIB + 500 * MIB, 100 * GIB, resident)
    expected = DecisionKind.WAIT if padding else DecisionKind.JOIN
    assert decide(need, tight).kind is expected


def test_calibrated_working_memory_changes_the_decision() -> None:
    """The estimate decide() sees is the calibrated one: a request the prior lets join waits
    once calibration measured more working memory than the prior assumed."""
    from mlxd.estimate.working import WorkingMemory, prior_working_memory

    cfg = json.loads(
        (Path(__file__).parents[1] / "fixtures" / "configs" / "qwen3-8b.json").read_text()
    )
    profile = ModelProfile.from_config(cfg, weights=4_600_000_000, dtype_bytes=2)
    prior = prior_working_memory(profile.architecture, 2, "cuda")
    measured = WorkingMemory(
        prefill_curves=((2048, ((2048, 1.0 * GIB), (8192, 2.5 * GIB))),),
        decode_fixed=prior.decode_fixed, decode_per_key=prior.decode_per_key,
        sampling=prior.sampling, quantized_per_token_key=0.0, source="measured",
    )  # fmt: skip

    def need(working: WorkingMemory | None) -> Need:
        e = estimate_request(profile, 8000, 16, backend="cuda", working=working)
        return Need("m", e.weights, e.request, 8000, 16, kv_per_token=e.kv_per_token)

    resident = Resident("m", profile.weights, active=1, reserved=GIB, longest=8016)
    state = State(profile.weights + GIB + 3 * GIB, 100 * GIB, resident)
    assert decide(need(None), state).kind is DecisionKind.JOIN
    assert decide(need(measured), state).kind is DecisionKind.WAIT
