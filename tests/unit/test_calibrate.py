"""Calibration of working memory: the fit, its persistence, online raises (fakes, no MLX run).

Samples are generated from a known "backend" (a working-memory law that is not the prior's:
per chunk size its own constant and score slope, as on a GPU), so the tests can say exactly
what the fit must give back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mlxd.admission import DecisionKind, Resident
from mlxd.calibrate import (
    Calibration,
    CalibrationKey,
    CalibrationStore,
    Calibrator,
    Plan,
    Sample,
    _deep_depths,
    fit,
    model_fingerprint,
    plan_for,
)
from mlxd.config import ModelEntry, PathSource
from mlxd.engine import LoadedModel
from mlxd.estimate.request import ModelProfile, estimate_request
from mlxd.estimate.working import WorkingMemory, prior_working_memory
from mlxd.gate import MemoryGate
from mlxd.memory.budget import MemoryBudget
from mlxd.memory.snapshot import MemorySnapshot, MlxMemory
from tests.fakes import tiny_model_dir

MB = 1 << 20
QWEN3_8B = {
    "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
}  # fmt: skip
PROFILE = ModelProfile.from_config(QWEN3_8B, weights=4600 * MB, dtype_bytes=2)
PRIOR = prior_working_memory(PROFILE.architecture, 2, "cuda")


def backend_law(phase: str, tokens: int, keys: int, sampling: bool) -> int:
    """What the fake backend holds: a big constant for long chunks (dequantized weights),
    float32 scores for short ones, bf16 scores for long ones and twice that beyond 8K keys
    (not linear in the depth, as on a GPU); decode rows plus a sort."""
    if phase == "decode":
        return 3 * MB + 256 * keys + (5 * MB if sampling else 0)
    if tokens >= 512:
        return 2000 * MB + 40_000 * tokens + 64 * tokens * (keys + max(0, keys - 8192))
    return 10 * MB + 30_000 * tokens + 128 * tokens * keys


def samples_for(plan: Plan) -> list[Sample]:
    """What measure() takes on a backend following backend_law, with room for every depth."""
    out = []
    depths = {n: [0, plan.shallow] for n in plan.chunks}
    if plan.deep:
        depths[max(plan.chunks)] += _deep_depths(plan, max(plan.chunks), lambda d: True)
    for n, ds in depths.items():
        for depth in ds:
            work = backend_law("prefill", n, depth + n, False)
            out.append(Sample("prefill", n, depth + n, False, work))
    deep = [d + max(plan.chunks) for d in depths[max(plan.chunks)][2:]]
    for k in [*plan.decode_contexts, *deep]:  # measure() decodes at the deep contexts too
        out.append(Sample("decode", 1, k, False, backend_law("decode", 1, k, False)))
    k = plan.decode_contexts[0]
    out.append(Sample("decode", 1, k, True, backend_law("decode", 1, k, True)))
    return out


GPU_PLAN = plan_for("cuda", 2048, 40960)


def test_plans_measure_the_chunk_sizes_serving_uses() -> None:
    assert GPU_PLAN.chunks == (128, 512, 2048)
    assert GPU_PLAN.shallow == 2048
    assert GPU_PLAN.deep  # and deeper, as far as memory allows
    cpu = plan_for("cpu", 2048, 8192)
    assert cpu.chunks == (128, 512, 2048)
    assert cpu.shallow == 512  # short depths on the CPU, where a chunk costs a minute
    assert not cpu.deep
    assert cpu.decode_contexts == (2048, 4096)
    small = plan_for("cpu", 2048, 300)  # the context caps the chunk
    assert max(small.chunks) == 299


def test_deep_depths_halve_from_the_deepest_that_fits() -> None:
    assert _deep_depths(GPU_PLAN, 2048, lambda d: True) == [38912, 19456, 9728, 4864]
    # Room for 16K only: the deepest sample is the deepest that fits, then halving.
    room = _deep_depths(GPU_PLAN, 2048, lambda d: d <= 16384)
    assert room[0] <= 16384 and room == sorted(room, reverse=True)
    assert _deep_depths(GPU_PLAN, 2048, lambda d: False) == []  # nothing deep fits


@pytest.mark.parametrize("prompt", [512, 2048, 8192, 16384, 32768])
def test_calibrated_prefill_is_never_low_and_within_10_percent(prompt: int) -> None:
    """The regression of the H200 run: a line fitted at two shallow depths under-estimated
    long prompts by 19-32 %; the measured curve reaches the depths that matter."""
    working = fit(samples_for(GPU_PLAN), PRIOR)
    n = min(2048, prompt)
    keys = prompt  # the last chunk reads every key
    law = backend_law("prefill", n, keys, False)
    assert law <= working.prefill(n, keys) <= 1.10 * law


def test_fit_covers_every_sample_and_equals_the_largest() -> None:
    samples = samples_for(GPU_PLAN)
    working = fit(samples, PRIOR)
    assert working.source == "measured"
    for s in samples:
        if s.phase == "prefill":
            got = working.prefill(s.tokens, s.keys)
        else:
            got = working.decode(s.keys, s.sampling)
        assert got == pytest.approx(s.work * 1.02, rel=1e-6)  # through every sample + 2 %
    assert [n for n, _ in working.prefill_curves] == [128, 512, 2048]


def test_fit_extends_to_depths_it_did_not_measure() -> None:
    working = fit(samples_for(GPU_PLAN), PRIOR)
    # Short chunks (two depths, linear law): exact beyond them.
    law = backend_law("prefill", 128, 5000, False)
    assert working.prefill(128, 5000) == pytest.approx(law * 1.02, rel=1e-6)
    deep = 40_000  # beyond the deepest sample: its last segment, extended
    assert working.prefill(2048, deep) >= backend_law("prefill", 2048, deep, False)
    law = backend_law("decode", 1, deep, False)
    assert working.decode(deep, False) == pytest.approx(law * 1.02, rel=1e-6)


def test_fit_never_fits_below_a_sample() -> None:
    # Two samples at one size and depth, noisy: the fit takes the larger.
    samples = [Sample("prefill", 64, 64, False, 1000), Sample("prefill", 64, 64, False, 1500)]
    working = fit(samples, PRIOR)
    assert working.prefill(64, 64) >= 1500


def test_fit_without_depth_keeps_the_prior_growth_and_never_falls() -> None:
    one_depth = [Sample("prefill", 256, 256, False, 10 * MB)]
    working = fit(one_depth, PRIOR)
    grows = PRIOR.prefill(256, 4096) - PRIOR.prefill(256, 256)
    assert working.prefill(256, 4096) == pytest.approx(1.02 * 10 * MB + grows, rel=1e-6)
    # A deeper sample that held less (noise) keeps the curve flat, not falling.
    shrinking = [
        Sample("prefill", 256, 256, False, 10 * MB),
        Sample("prefill", 256, 4096, False, 9 * MB),
    ]
    assert fit(shrinking, PRIOR).prefill(256, 4096) == pytest.approx(1.02 * 10 * MB, rel=1e-6)
    assert fit(shrinking, PRIOR).prefill(256, 256) == pytest.approx(1.02 * 10 * MB, rel=1e-6)


def test_working_memory_interpolates_between_chunk_sizes_and_depths() -> None:
    w = WorkingMemory(
        prefill_curves=(
            (100, ((100, 1000.0), (200, 1200.0))),
            (200, ((200, 3000.0), (400, 3400.0), (800, 5000.0))),
        ),
        decode_fixed=0.0, decode_per_key=0.0, sampling=0.0, quantized_per_token_key=5.0,
    )  # fmt: skip
    assert w.prefill(200, 300) == pytest.approx(3200.0)  # between two depths
    assert w.prefill(200, 1000) == pytest.approx(5800.0)  # the last segment, extended
    assert w.prefill(200, 100) == pytest.approx(2800.0)  # the first segment, back
    assert w.prefill(150, 200) == pytest.approx((1200.0 + 3000.0) / 2)  # between two sizes
    assert w.prefill(50, 100) == pytest.approx(500.0)  # proportional below the first size
    assert w.prefill(200, 10, quantized=True) == pytest.approx(w.prefill(200, 10) + 5 * 200 * 10)
    assert WorkingMemory.from_json(json.loads(json.dumps(w.to_json()))) == w


def test_calibrated_estimate_uses_the_measured_terms() -> None:
    working = fit(samples_for(GPU_PLAN), PRIOR)
    prior = estimate_request(PROFILE, 2048, 32, backend="cuda", sampling=False)
    calibrated = estimate_request(PROFILE, 2048, 32, backend="cuda", sampling=False,
                                  working=working)  # fmt: skip
    assert calibrated.weights == prior.weights and calibrated.kv == prior.kv  # exact, unchanged
    assert calibrated.prefill == pytest.approx(
        1.02 * backend_law("prefill", 2047, 2047, False), rel=1e-3
    )
    assert calibrated.total > prior.total


# --------------------------------------------------------------------------- persistence


def key(**changes: Any) -> CalibrationKey:
    base: dict[str, Any] = {
        "fingerprint": "abc", "backend": "cuda", "mlx_version": "0.32.4", "dtype_bytes": 2,
        "kv_bits": None, "max_kv_size": None, "prefill_chunk": 2048,
    }  # fmt: skip
    return CalibrationKey(**{**base, **changes})


def calibration(k: CalibrationKey) -> Calibration:
    samples = samples_for(GPU_PLAN)
    return Calibration(k, fit(samples, PRIOR), tuple(samples), measured_at=1000.0, seconds=2.1)


def test_store_round_trip_and_keys(tmp_path: Path) -> None:
    store = CalibrationStore(tmp_path / "calibration")
    k = key()
    assert store.load(k) is None
    store.save(calibration(k))
    loaded = store.load(k)
    assert loaded is not None and loaded.reused
    assert loaded.working == calibration(k).working
    assert loaded.samples == calibration(k).samples
    # Every field of the key selects a different calibration.
    for change in ({"backend": "metal"}, {"mlx_version": "0.33.0"}, {"dtype_bytes": 4},
                   {"kv_bits": 8}, {"max_kv_size": 4096}, {"prefill_chunk": 512},
                   {"fingerprint": "other"}):  # fmt: skip
        assert key(**change).digest != k.digest
        assert store.load(key(**change)) is None


def test_store_ignores_corrupt_and_old_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CalibrationStore(tmp_path)
    k = key()
    store.path(k).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert store.load(k) is None
    assert "unreadable calibration" in caplog.text
    data = calibration(k).to_json()
    store.path(k).write_text(json.dumps({**data, "format": 0}))
    assert store.load(k) is None


def test_fingerprint_follows_shapes_not_paths(tmp_path: Path) -> None:
    a = tiny_model_dir(tmp_path / "a")
    b = tiny_model_dir(tmp_path / "b")
    assert model_fingerprint(a) == model_fingerprint(b)
    config = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert model_fingerprint(a) != model_fingerprint(b)


def fake_measure(samples: list[Sample], calls: list[int]) -> Callable[..., Any]:
    async def run(
        profile: ModelProfile, plan: Plan, max_kv_size: int | None, room: Any
    ) -> list[Sample]:
        calls.append(1)
        return samples  # what measure() would have read on a backend following backend_law

    return run


def test_calibrator_measures_once_then_later_starts_reuse(tmp_path: Path) -> None:
    calls: list[int] = []
    store = CalibrationStore(tmp_path)
    first = Calibrator(store, "cuda", "0.32.4", measure=fake_measure(samples_for(GPU_PLAN), calls))
    k = key()
    assert first.working("m", k) is None
    done = asyncio.run(first.ensure("m", k, PROFILE, 40960, lambda: 100 << 30))
    assert done is not None and not done.reused and calls == [1]
    assert "calibrated" in done.describe() and "measuring took" in done.describe()
    assert first.working("m", k) == done.working
    # A new process (new Calibrator) finds it in the store and does not measure.
    second = Calibrator(store, "cuda", "0.32.4", measure=fake_measure([], calls))
    again = asyncio.run(second.ensure("m", k, PROFILE, 40960, lambda: 100 << 30))
    assert again is not None and again.reused and calls == [1]
    assert again.describe().startswith("reused calibration from")
    assert second.status()["m"]["reused"] is True


def test_failed_measurement_keeps_the_prior(tmp_path: Path) -> None:
    async def broken(
        profile: ModelProfile, plan: Plan, max_kv_size: int | None, room: Any
    ) -> list[Sample]:
        raise RuntimeError("device lost")

    calibrator = Calibrator(CalibrationStore(tmp_path), "cuda", "0.32.4", measure=broken)
    assert asyncio.run(calibrator.ensure("m", key(), PROFILE, 40960, lambda: 1 << 30)) is None
    assert calibrator.working("m", key()) is None


# --------------------------------------------------------------------------- online


def test_exceeded_estimate_raises_and_persists_but_never_lowers(tmp_path: Path) -> None:
    store = CalibrationStore(tmp_path)
    calibrator = Calibrator(store, "cuda", "0.32.4")
    k = key()
    store.save(calibration(k))
    working = calibrator.working("m", k)
    assert working is not None
    est = estimate_request(PROFILE, 4000, 16, backend="cuda", sampling=False, working=working)
    assert est.peak_phase == "prefill"
    version = calibrator.version
    calibrator.observe("m", est, measured=est.total - 10 * MB)  # below: nothing changes
    assert calibrator.working("m", k) == working and calibrator.version == version
    calibrator.observe("m", est, measured=est.total + 300 * MB)  # over: raised
    raised = calibrator.working("m", k)
    assert raised is not None and raised.source == "learned"
    again = estimate_request(PROFILE, 4000, 16, backend="cuda", sampling=False, working=raised)
    assert again.total >= est.total + 300 * MB
    assert raised.decode_fixed == working.decode_fixed  # only the phase that peaked
    stored = store.load(k)
    assert stored is not None and stored.raises == 1 and stored.working == raised
    errors = calibrator.status()["m"]["estimate_error"]
    assert errors["requests"] == 2 and errors["exceeded"] == 1
    assert errors["min"] < 0 < errors["max"]


def test_gate_re_estimates_a_waiter_after_its_model_is_calibrated(tmp_path: Path) -> None:
    """A request estimated with the prior before its model loaded is decided (and its flight
    reserved) with the calibrated estimate made after the load; the samples' room is what
    the budget leaves beside the resident model."""
    model_dir = tiny_model_dir(tmp_path / "m")
    entry = ModelEntry(id="m", source=PathSource(path=str(model_dir)))
    profile = ModelProfile.from_dir(model_dir)
    budget = MemoryBudget(limit=10 << 30, total=16 << 30, reserve=0.22, basis="test")
    snap = MemorySnapshot(platform="linux", source="test", total=16 << 30, available=12 << 30,
                          physical_total=16 << 30, swap_total=0, swap_used=0,
                          mlx=MlxMemory(active=0, cache=0))  # fmt: skip
    prior = prior_working_memory(profile.architecture, profile.dtype_bytes, "cuda")
    samples = [Sample("prefill", 64, 64, False, 50 * MB)]
    rooms: list[int] = []

    async def run(
        profile: ModelProfile, plan: Plan, max_kv_size: int | None, room: Any
    ) -> list[Sample]:
        rooms.append(room())
        return samples

    # (A GPU backend: admission waits for the calibration; the CPU measures in the background.)
    calibrator = Calibrator(CalibrationStore(tmp_path / "cal"), "cuda", "0.32.4", measure=run)
    gate = MemoryGate(budget, snapshot=lambda: snap, calibrator=calibrator)
    need = gate.need_for(entry, model_dir, 100, 10, 512, sampling=False)
    assert need.need.request < 50 * MB  # the prior's guess
    assert gate.decide(entry, need, None).kind is DecisionKind.SWAP
    weights = gate.loaded(entry, LoadedModel(model_dir, {}, 0.0, 0, profile.weights))
    running = Resident("m", weights, active=1, reserved=1 << 30)
    asyncio.run(gate.calibrate(entry, model_dir, lambda: running))
    assert rooms == [(10 << 30) - weights - (1 << 30)]  # beside the weights and the batch
    assert not gate.calibrating
    assert gate.working(entry, model_dir) == fit(samples, prior)
    decision = gate.decide(entry, need, Resident("m", weights))
    assert decision.kind is DecisionKind.JOIN
    assert decision.need > 50 * MB  # reserved with the calibrated estimate


def test_background_calibration_estimates_with_the_prior_until_done(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow(
        profile: ModelProfile, plan: Plan, max_kv_size: int | None, room: Any
    ) -> list[Sample]:
        await release.wait()
        return samples_for(GPU_PLAN)

    async def scenario() -> None:
        calibrator = Calibrator(CalibrationStore(tmp_path), "cpu", "0.32.4", measure=slow)
        k = key(backend="cpu")
        assert (
            await calibrator.ensure("m", k, PROFILE, 40960, lambda: 1 << 30, background=True)
            is None
        )
        assert calibrator.working("m", k) is None  # the prior estimates meanwhile
        assert calibrator.status()["m"]["line"] == "calibrating"
        release.set()
        await calibrator.running["m"]
        assert calibrator.working("m", k) is not None
        assert "m" not in calibrator.running

    asyncio.run(scenario())
