"""The interleaved prefill chunk sizer against simulated step costs."""

from __future__ import annotations

from collections.abc import Callable

from mlxd.interleave import FIRST_CHUNK, INTERLEAVE_COST, MIN_CHUNK, ChunkSizer, sizes

DECODE = 0.020  # seconds of a decode-only step


def run(extra: Callable[[int, int], float], steps: int = 60, full: int = 2048) -> list[int]:
    """Decode-only steps, then ``steps`` interleaved ones; the chunk each step used.

    ``extra(chunk, visits)`` is what prefilling ``chunk`` tokens adds to a step, ``visits`` being
    how many times that size ran before.
    """
    sizer = ChunkSizer(full)
    for _ in range(5):
        sizer.observe(DECODE, decoding=4, prefilled=False)
    used: list[int] = []
    for _ in range(steps):
        chunk = sizer.step_size(decoding=4)
        sizer.observe(DECODE + extra(chunk, used.count(chunk)), decoding=4, prefilled=True)
        used.append(chunk)
    return used


def test_sizes_are_powers_of_two_up_to_the_full_chunk() -> None:
    assert sizes(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert sizes(500) == [16, 32, 64, 128, 256, 500]
    assert sizes(8) == [8]


def test_nobody_decoding_gets_the_full_chunk() -> None:
    sizer = ChunkSizer(1024)
    assert sizer.step_size(decoding=0) == 1024
    assert sizer.step_size(decoding=3) == FIRST_CHUNK


def test_cost_proportional_to_the_chunk_settles_on_the_largest_size_within_budget() -> None:
    per_token = 0.0001  # 256 tokens add 25.6 ms > one decode step (20 ms); 128 add 12.8 ms
    used = run(lambda c, _: per_token * c)
    assert used[-20:] == [128] * 20
    assert all(DECODE + per_token * c <= 2 * INTERLEAVE_COST * DECODE for c in used)


def test_a_fixed_cost_per_step_moves_to_the_best_throughput_not_the_smallest_chunk() -> None:
    # Every interleaved step costs 60 ms more whatever its size (3x the budget): shrinking
    # cannot help the streams, so the joiner gets large chunks.
    used = run(lambda c, _: 0.060 + 0.000001 * c)
    assert used[-10:] == [2048] * 10
    assert MIN_CHUNK not in used[-30:]


def test_a_first_use_cost_per_size_is_not_mistaken_for_the_steady_cost() -> None:
    # Each size costs 300 ms extra the first time it runs (kernels built per shape), then
    # proportional: after exploring, the sizer settles where the steady costs put it.
    per_token = 0.0001
    used = run(lambda c, visits: per_token * c + (0.3 if visits == 0 else 0.0), steps=120)
    assert used[-20:] == [128] * 20


def test_a_new_full_chunk_keeps_the_current_size_in_range() -> None:
    sizer = ChunkSizer(2048)
    sizer.set_full(64)
    assert sizer.step_size(decoding=1) == 64
    assert sizer.step_size(decoding=0) == 64
