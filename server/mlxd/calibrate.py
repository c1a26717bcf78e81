"""Working memory measured on the running backend, fitted, stored and raised when exceeded.

The estimate's weights and KV cache are exact (safetensors headers, mlx-lm's cache rules);
working memory is not: what a prefill chunk or a decode step holds depends on the kernels of
the backend (CPU, CUDA, Metal), its allocator and the MLX version. Measured on an H200, the
hand-written model was low by up to 53 %. So after a model loads and warms up, mlxd measures:

- prefill chunks of each size serving uses at depth 0 and at one shallow depth, and on a GPU
  the full chunk at up to four depths more, halving from the deepest the context and the
  memory room allow (the cache is filled with zeros up to the depth and is full, so the chunk
  grows it as serving does; a 32K-token depth costs one chunk of compute, not 16);
- a few decode steps at two context depths, greedy and sampled;

reading ``mx.get_peak_memory()`` above ``mx.get_active_memory()`` before each, and fits the
terms of :class:`mlxd.estimate.working.WorkingMemory` so that the fit covers every sample. The
result is stored as JSON under ``MLXD_HOME/calibration``, keyed by what changes it (model
fingerprint, backend, MLX version, activation dtype, ``kv_bits``, ``max_kv_size``, prefill
chunk), and reused on later starts.

Online, every request's measured peak is compared with its estimate (`Calibrator.observe`):
one that exceeds its estimate raises the terms of the phase that peaked (never lowers them),
and the stored calibration is rewritten.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mlxd.estimate.files import weight_files
from mlxd.estimate.kv import KV_STEP, kv_bytes
from mlxd.estimate.request import Estimate, ModelProfile
from mlxd.estimate.working import WorkingMemory, prior_working_memory

log = logging.getLogger("mlxd.calibrate")

FORMAT_VERSION = 2  # 2: prefill work as curves over the keys
DECODE_STEPS = 4  # decode steps measured per sample (mlx-lm evaluates one step ahead)
# On the CPU a 2048-token chunk of even a 135M model takes most of a minute on a small
# machine, so the CPU measures depth only this far (and decode only this deep).
CPU_MAX_DEPTH = 512
CPU_MAX_DECODE_CONTEXT = 4096
MIN_CHUNK = 16  # the smallest chunk size measured
# A sample is measured only when its cache and predicted work fit this share of the room
# (what the budget and the machine leave beside the resident model and running requests).
SAMPLE_ROOM_SHARE = 0.8
PRIOR_LINE = "using prior"  # no calibration yet: the hand-written working memory estimates
# Peaks of the same work vary by a few tenths of a percent from run to run (MLX's CPU threads
# free buffers in a different order): the fit covers each sample plus this margin.
FIT_MARGIN = 1.02
RAISE_MARGIN = 1.02  # a raise covers the exceeding sample plus 2 %
DEEP_SAMPLES = 4  # depths of the full chunk measured beyond the shallow one (GPU)


@dataclass(frozen=True)
class CalibrationKey:
    """Everything a calibration depends on; a change of any field measures again."""

    fingerprint: str
    backend: str
    mlx_version: str
    dtype_bytes: int
    kv_bits: int | None
    max_kv_size: int | None
    prefill_chunk: int

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def model_fingerprint(model_dir: Path) -> str:
    """A hash of ``config.json`` and the safetensors headers: the model's shape and dtypes
    (not its weight values, which do not change memory)."""
    digest = hashlib.sha256()
    digest.update((model_dir / "config.json").read_bytes())
    for path in weight_files(model_dir):
        with path.open("rb") as f:
            head = f.read(8)
            digest.update(head)
            digest.update(f.read(int.from_bytes(head, "little")))
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class Sample:
    """One measurement: bytes held above what was allocated before it started."""

    phase: str  # "prefill" or "decode"
    tokens: int  # chunk tokens (prefill); 1 (decode)
    keys: int  # keys attention reads: depth + chunk (prefill), context (decode)
    sampling: bool
    work: int


@dataclass(frozen=True)
class Plan:
    """What to measure: each chunk size at depth 0 and at ``shallow``; on a GPU the full chunk
    also at ``deep`` depths, halving from the deepest that the context and the memory room
    allow; decode at ``decode_contexts`` (and at the deepest prefill's context)."""

    chunks: tuple[int, ...]
    shallow: int
    deep: bool
    decode_contexts: tuple[int, ...]
    context: int


def plan_for(backend: str, prefill_chunk: int, context: int) -> Plan:
    """The measurement plan for a model served with ``prefill_chunk`` up to ``context``.

    Chunks are measured at the sizes serving uses (the full chunk, and smaller ones for the
    last chunk of a prompt). A GPU measures the full chunk deep too: there the work of a
    chunk is not linear in the depth (see `mlxd.estimate.working.WorkingMemory`) and a sample costs
    one chunk of compute. The CPU keeps to a shallow depth: a deep sample there costs minutes,
    and its work grows linearly with the depth (within 2 %, bench/results).
    """
    chunk = max(1, min(prefill_chunk, context - 1))
    sizes = {min(chunk, max(MIN_CHUNK, c)) for c in (chunk // 16, chunk // 4, chunk)}
    cap = CPU_MAX_DEPTH if backend == "cpu" else chunk
    shallow = max(KV_STEP, min(cap, context - chunk) // KV_STEP * KV_STEP)
    top = max(1, context - DECODE_STEPS - 1)
    decode: tuple[int, ...] = (min(chunk, top),)
    if backend == "cpu":
        decode = tuple(sorted({*decode, min(top, CPU_MAX_DECODE_CONTEXT)}))
    return Plan(tuple(sorted(sizes)), shallow, backend != "cpu", decode, context)


# --------------------------------------------------------------------------- fit


def fit(samples: Sequence[Sample], prior: WorkingMemory) -> WorkingMemory:
    """Working-memory terms that cover every sample.

    Prefill: per chunk size, the curve through its samples by key count (the largest at equal
    keys, never falling as keys grow), so it equals every sample's peak; a size measured at one
    depth only gets the prior's growth with depth. Decode is a line in the context that covers
    its samples; sampling adds what the sampled samples held beyond it. Terms without samples
    keep the prior's value. Every sample counts ``FIT_MARGIN`` over what it measured.
    """
    samples = [replace(s, work=math.ceil(s.work * FIT_MARGIN)) for s in samples]
    prefill = [s for s in samples if s.phase == "prefill"]
    decode = [s for s in samples if s.phase == "decode" and not s.sampling]
    sampled = [s for s in samples if s.phase == "decode" and s.sampling]
    working = prior
    if prefill:
        curves = []
        for n in sorted({s.tokens for s in prefill}):
            by_keys: dict[int, int] = {}
            for s in prefill:
                if s.tokens == n:
                    by_keys[s.keys] = max(by_keys.get(s.keys, 0), s.work)
            points: list[tuple[int, float]] = []
            for keys in sorted(by_keys):
                points.append((keys, float(max(by_keys[keys], points[-1][1] if points else 0))))
            if len(points) == 1:
                keys, work = points[0]
                grows = prior.prefill(n, keys + n) - prior.prefill(n, keys)
                points.append((keys + n, work + max(0.0, grows)))
            curves.append((n, tuple(points)))
        working = replace(working, prefill_curves=tuple(curves), source="measured")
    if decode:
        slope = _slope([(s.keys, s.work) for s in decode])
        per_key = prior.decode_per_key if slope is None else slope
        fixed = max(s.work - per_key * s.keys for s in decode)
        working = replace(working, decode_fixed=max(0.0, fixed), decode_per_key=per_key)
        if sampled:
            extra = max(s.work - working.decode(s.keys, sampling=False) for s in sampled)
            working = replace(working, sampling=max(0.0, extra))
        working = replace(working, source="measured")
    return working


def _slope(points: Sequence[tuple[int, int]]) -> float | None:
    """Least-squares slope of ``y`` over ``x``, at least 0; ``None`` with one distinct x."""
    xs = {x for x, _ in points}
    if len(xs) < 2:
        return None
    mx_ = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    num = sum((x - mx_) * (y - my) for x, y in points)
    den = sum((x - mx_) ** 2 for x, _ in points)
    return max(0.0, num / den)


# --------------------------------------------------------------------------- measurement


Run = Callable[[Callable[[Any], Any]], Awaitable[Any]]  # the engine's ``with_model``
Room = Callable[[], int]  # bytes a sample may hold now beside what is resident and running


async def measure(
    run: Run, profile: ModelProfile, plan: Plan, max_kv_size: int | None, room: Room
) -> list[Sample]:
    """Run ``plan`` on the loaded mlx-lm model through ``run`` (the engine's ``with_model``:
    each sample is one job on the MLX thread, between two batch steps, so requests run
    between samples). A sample whose cache and predicted work do not fit ``room()`` at that
    moment is skipped: calibration never pushes memory further than admission would."""
    filler: _CacheFiller = await run(lambda m: _CacheFiller(m, max_kv_size))
    arch = profile.architecture
    vocab = arch.vocab_size
    samples: list[Sample] = []
    prior = prior_working_memory(arch, profile.dtype_bytes, "cpu")

    def fits(tokens: int, keys: int, decode: bool = False) -> bool:
        guess = fit(samples, prior) if samples else prior
        kv = kv_bytes(arch, keys, None, profile.dtype_bytes, max_kv_size)
        work = guess.decode(keys, False) if decode else guess.prefill(tokens, keys)
        return kv + work <= SAMPLE_ROOM_SHARE * room()

    async def take(phase: str, tokens: int, keys: int, sampling: bool, make: Any) -> None:
        def job(model: Any) -> int:
            if model is not filler.model:
                raise RuntimeError("the model changed while it was being calibrated")
            return int(make(model))

        samples.append(Sample(phase, tokens, keys, sampling, await run(job)))

    async def prefill(n: int, depth: int) -> bool:
        if not fits(n, depth + n):
            log.info("calibration: skipping a %d-token chunk at depth %d (no room)", n, depth)
            return False
        work = functools.partial(_prefill_sample, filler=filler, vocab=vocab, n=n, depth=depth)
        await take("prefill", n, depth + n, False, work)
        return True

    for n in plan.chunks:
        for depth in (0, plan.shallow):
            await prefill(n, depth)
    contexts = list(plan.decode_contexts)
    if plan.deep:
        biggest = max(plan.chunks)
        for depth in _deep_depths(plan, biggest, lambda d: fits(biggest, d + biggest)):
            if await prefill(biggest, depth) and depth + biggest not in contexts:
                contexts.append(depth + biggest)
    contexts = [c for c in contexts if c == contexts[0] or fits(1, c, True)]
    for context, sampling in [(c, False) for c in contexts] + [(contexts[0], True)]:
        work = functools.partial(_decode_sample, filler=filler, context=context, sampling=sampling)
        await take("decode", 1, context + 1, sampling, work)
    return samples


def _deep_depths(plan: Plan, chunk: int, fits: Callable[[int], bool]) -> list[int]:
    """Depths for the full chunk beyond ``plan.shallow``: the deepest that fits (in KV steps,
    up to the context), then halving, at most ``DEEP_SAMPLES``, deepest first."""
    depth = (plan.context - chunk) // KV_STEP * KV_STEP
    while depth > plan.shallow and not fits(depth):
        depth = depth * 3 // 4 // KV_STEP * KV_STEP
    depths: list[int] = []
    while depth > 2 * plan.shallow and len(depths) < DEEP_SAMPLES:
        depths.append(depth)
        depth = depth // 2 // KV_STEP * KV_STEP
    return depths


def _prefill_sample(model: Any, *, filler: _CacheFiller, vocab: int, n: int, depth: int) -> int:
    """A chunk of ``n`` tokens at ``depth``, as serving runs it: the cache is full to its
    capacity, so it grows (a new buffer beside the old one) as it does in serving. The cache
    the chunk adds is KV, which the estimate counts exactly, so it is taken out."""
    import mlx.core as mx

    cache = filler.cache(depth, room=0)
    before = sum(c.nbytes for c in cache)
    x = mx.array([[(i * 7919 + 100) % vocab for i in range(n)]])
    mx.eval(x)
    held = _held(lambda: mx.eval([c.state for c in _call(model, x, cache)]))
    grown: int = sum(c.nbytes for c in cache) - before
    return max(0, held - grown)


def _decode_sample(model: Any, *, filler: _CacheFiller, context: int, sampling: bool) -> int:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    cache = filler.cache(context, room=DECODE_STEPS + 2)
    sampler = make_sampler(temp=1.0, top_p=0.9, top_k=40) if sampling else None
    x = mx.array([1])

    def run() -> None:
        for _ in generate_step(
            x, model, max_tokens=DECODE_STEPS, sampler=sampler, prompt_cache=cache
        ):
            pass

    return _held(run)


def _call(model: Any, x: Any, cache: list[Any]) -> list[Any]:
    model(x, cache=cache)  # as mlx-lm's prefill: only the cache is evaluated, not the logits
    return cache


def _held(run: Callable[[], None]) -> int:
    """Peak bytes ``run`` allocated above what was active when it started. MLX's peak is
    reset again afterwards, so the batch step that follows does not count this sample."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    base = int(mx.get_active_memory())
    mx.reset_peak_memory()
    run()
    peak = int(mx.get_peak_memory())
    mx.reset_peak_memory()
    return max(0, peak - base)


class _CacheFiller:
    """Prompt caches already ``depth`` tokens deep: plain KV caches get zero-filled buffers
    with ``room`` tokens free beyond the depth (rounded to mlx-lm's 256-token step); other
    cache types (rotating, linear-attention state) start empty, as their size does not grow
    with depth."""

    def __init__(self, model: Any, max_kv_size: int | None) -> None:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        self.model = model
        self._max_kv_size = max_kv_size
        probe = make_prompt_cache(model, max_kv_size=max_kv_size)
        model(mx.array([[1]]), cache=probe)
        mx.eval([c.state for c in probe])
        self._shapes = [self._kv_shapes(c) for c in probe]
        del probe

    @staticmethod
    def _kv_shapes(cache: Any) -> tuple[Any, Any] | None:
        from mlx_lm.models.cache import KVCache

        keys: Any = getattr(cache, "keys", None)
        values: Any = getattr(cache, "values", None)
        if type(cache) is not KVCache or keys is None or values is None:
            return None
        return (keys.shape, keys.dtype), (values.shape, values.dtype)

    def cache(self, depth: int, room: int) -> list[Any]:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model, max_kv_size=self._max_kv_size)
        if depth == 0 and room <= 0:
            return cache
        capacity = math.ceil((depth + room) / KV_STEP) * KV_STEP
        for c, shapes in zip(cache, self._shapes, strict=True):
            if shapes is None:
                continue
            (kshape, kdtype), (vshape, vdtype) = shapes
            c.keys = mx.zeros((*kshape[:2], capacity, kshape[3]), kdtype)
            c.values = mx.zeros((*vshape[:2], capacity, vshape[3]), vdtype)
            c.offset = depth
            mx.eval(c.keys, c.values)
        return cache


# --------------------------------------------------------------------------- store


@dataclass(frozen=True)
class Calibration:
    key: CalibrationKey
    working: WorkingMemory
    samples: tuple[Sample, ...]
    measured_at: float  # time.time()
    seconds: float  # how long measuring took
    raises: int = 0  # times online learning raised it
    reused: bool = False  # read from the store rather than measured by this process

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "key": asdict(self.key),
            "working": self.working.to_json(),
            "samples": [asdict(s) for s in self.samples],
            "measured_at": self.measured_at,
            "seconds": self.seconds,
            "raises": self.raises,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        return cls(
            key=CalibrationKey(**data["key"]),
            working=WorkingMemory.from_json(data["working"]),
            samples=tuple(Sample(**s) for s in data["samples"]),
            measured_at=float(data["measured_at"]),
            seconds=float(data["seconds"]),
            raises=int(data.get("raises", 0)),
            reused=True,
        )

    def describe(self, now: float | None = None) -> str:
        """The banner/health line: "calibrated 2.1 s ago (took 3.4 s)" or "reused ..."."""
        age = (now or time.time()) - self.measured_at
        how = "reused calibration from" if self.reused else "calibrated"
        raised = f", raised {self.raises}×" if self.raises else ""
        return f"{how} {_ago(age)} ago (measuring took {self.seconds:.1f} s{raised})"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


class CalibrationStore:
    """One JSON file per key under ``root`` (``MLXD_HOME/calibration``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: CalibrationKey) -> Path:
        return self.root / f"{key.digest}.json"

    def load(self, key: CalibrationKey) -> Calibration | None:
        path = self.path(key)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT_VERSION:
                return None
            found = Calibration.from_json(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable calibration %s: %s", path, exc)
            return None
        return found if found.key == key else None

    def save(self, calibration: Calibration) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(calibration.key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(calibration.to_json(), indent=1))
        tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one


# --------------------------------------------------------------------------- serving


@dataclass
class ErrorStats:
    """Estimate error of served requests: (estimate − measured) / measured."""

    count: int = 0
    low: float = math.inf
    high: float = -math.inf
    total: float = 0.0
    exceeded: int = 0
    last: float | None = None

    def add(self, error: float) -> None:
        self.count += 1
        self.low = min(self.low, error)
        self.high = max(self.high, error)
        self.total += error
        self.last = error
        self.exceeded += error < 0

    def to_json(self) -> dict[str, Any]:
        if not self.count:
            return {"requests": 0}
        return {
            "requests": self.count,
            "mean": round(self.total / self.count, 4),
            "min": round(self.low, 4),
            "max": round(self.high, 4),
            "last": round(self.last or 0.0, 4),
            "exceeded": self.exceeded,
        }


Measure = Callable[[ModelProfile, Plan, int | None, Room], Awaitable[list[Sample]]]


@dataclass
class Calibrator:
    """The calibrations of this process, by model id, with the store behind them.

    ``measure`` takes the samples of a plan on the loaded model (`measure` bound to the
    engine's ``with_model``); without it nothing is measured and estimates use the prior.
    ``version`` changes whenever any calibration does, so estimates made before can be redone.
    """

    store: CalibrationStore | None
    backend: str
    mlx_version: str
    measure: Measure | None = None
    current: dict[str, Calibration] = field(default_factory=dict)
    errors: dict[str, ErrorStats] = field(default_factory=dict)
    version: int = 0
    _keys: dict[tuple[str, Path, int | None, int | None, int], CalibrationKey] = field(
        default_factory=dict
    )
    _missing: set[str] = field(default_factory=set)  # digests the store does not have
    running: dict[str, asyncio.Task[Calibration | None]] = field(default_factory=dict)

    def key(
        self,
        model_dir: Path,
        profile: ModelProfile,
        kv_bits: int | None,
        max_kv_size: int | None,
        prefill_chunk: int,
    ) -> CalibrationKey:
        memo = (self.backend, model_dir, kv_bits, max_kv_size, prefill_chunk)
        key = self._keys.get(memo)
        if key is None:
            key = CalibrationKey(
                fingerprint=model_fingerprint(model_dir),
                backend=self.backend,
                mlx_version=self.mlx_version,
                dtype_bytes=profile.dtype_bytes,
                kv_bits=kv_bits,
                max_kv_size=max_kv_size,
                prefill_chunk=prefill_chunk,
            )
            self._keys[memo] = key
        return key

    def working(self, model: str, key: CalibrationKey) -> WorkingMemory | None:
        """The calibrated terms for ``key``: this process's, else the store's, else None."""
        found = self.current.get(model)
        if found is not None and found.key == key:
            return found.working
        if self.store is not None and key.digest not in self._missing:
            stored = self.store.load(key)
            if stored is not None:
                self._adopt(model, stored)
                return stored.working
            self._missing.add(key.digest)  # estimates run per request: read the disk once
        return None

    async def ensure(
        self,
        model: str,
        key: CalibrationKey,
        profile: ModelProfile,
        context: int,
        room: Room,
        background: bool = False,
    ) -> Calibration | None:
        """Reuse the stored calibration for ``key`` or measure one on the loaded model.

        ``background`` returns at once and measures between requests (estimates use the
        prior until it is done); otherwise admission waits for it.
        """
        if self.working(model, key) is not None:
            found = self.current[model]
            log.info("%s: %s", model, found.describe())
            return found
        if self.measure is None or model in self.running:
            return None
        task = asyncio.get_running_loop().create_task(
            self._measure(model, key, profile, context, room)
        )
        self.running[model] = task
        task.add_done_callback(lambda _: self.running.pop(model, None))
        if background:
            log.info("%s: calibrating between requests (the prior estimates until then)", model)
            return None
        return await task

    async def _measure(
        self, model: str, key: CalibrationKey, profile: ModelProfile, context: int, room: Room
    ) -> Calibration | None:
        assert self.measure is not None
        plan = plan_for(self.backend, key.prefill_chunk, context)
        start = time.perf_counter()
        try:
            samples = await self.measure(profile, plan, key.max_kv_size, room)
        except Exception as exc:  # a failed calibration leaves the prior in place
            log.warning("%s: calibration failed, estimating with the prior: %s", model, exc)
            return None
        prior = prior_working_memory(profile.architecture, profile.dtype_bytes, _backend(key))
        calibration = Calibration(
            key=key,
            working=fit(samples, prior),
            samples=tuple(samples),
            measured_at=time.time(),
            seconds=time.perf_counter() - start,
        )
        self._adopt(model, calibration)
        if self.store is not None:
            self.store.save(calibration)
        log.info("%s: %s, %d samples", model, calibration.describe(), len(samples))
        return calibration

    def observe(self, model: str, estimate: Estimate, measured: int) -> None:
        """Compare a served request's measured peak with its estimate; raise when exceeded."""
        error = (estimate.total - measured) / measured if measured > 0 else 0.0
        self.errors.setdefault(model, ErrorStats()).add(error)
        if measured <= estimate.total:
            return
        found = self.current.get(model)
        if found is None:
            log.warning(
                "%s: request peaked at %d bytes, %d over its estimate (no calibration to raise)",
                model, measured, measured - estimate.total,
            )  # fmt: skip
            return
        phase = "decode" if estimate.peak_phase == "decode" else "prefill"
        work = estimate.decode if phase == "decode" else estimate.prefill
        shortfall = measured - estimate.total
        factor = (work + shortfall) / work * RAISE_MARGIN if work > 0 else RAISE_MARGIN
        raised = replace(
            found,
            working=found.working.raised(phase, factor),
            raises=found.raises + 1,
        )
        self._adopt(model, raised)
        if self.store is not None:
            self.store.save(raised)
        log.warning(
            "%s: request peaked at %d bytes, %.1f %% over its estimate of %d: %s working "
            "memory raised ×%.3f",
            model, measured, 100 * shortfall / estimate.total, estimate.total, phase, factor,
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        now = time.time()
        out: dict[str, Any] = {}
        for model in sorted(set(self.current) | set(self.errors) | set(self.running)):
            entry: dict[str, Any] = {}
            found = self.current.get(model)
            if found is not None:
                entry.update(
                    line=found.describe(now),
                    reused=found.reused,
                    age_s=round(now - found.measured_at, 1),
                    seconds=round(found.seconds, 2),
                    raises=found.raises,
                    source=found.working.source,
                )
            if model in self.running:
                entry["line"] = "calibrating"
            entry.setdefault("line", PRIOR_LINE)
            entry["estimate_error"] = self.errors.get(model, ErrorStats()).to_json()
            out[model] = entry
        return out

    def _adopt(self, model: str, calibration: Calibration) -> None:
        self.current[model] = calibration
        self.version += 1


def _backend(key: CalibrationKey) -> Any:
    return key.backend if key.backend in ("metal", "cuda", "cpu") else "cpu"
