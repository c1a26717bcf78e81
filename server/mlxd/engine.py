"""Generation on one dedicated MLX thread, requests decoding together in one batch.

MLX work (loading, prefill, decode, freeing) happens on a single worker thread: MLX streams and
caches are not meant to be driven from several threads, and a single owner makes "one model
resident" a fact rather than a convention. The asyncio side submits jobs and pulls
:class:`GenerationChunk` objects from an ``asyncio.Queue`` fed with ``call_soon_threadsafe``.

Generations join a running batch (:mod:`server.batching`, on mlx-lm's ``BatchGenerator``) and
leave it between steps; control jobs (load, limits, eviction) run between steps too. A request
that cannot share a batch (a fixed sampling seed, a quantized KV cache) waits for the batch to
drain and runs alone, and the log says why. Who may join, and when, is the manager's decision
(memory admission, ``max_concurrency``); the engine runs what it is given.

``memory()`` and ``stats()`` never wait behind generation: they return what the worker last
recorded. A generation whose processor raises gets the error and the batch goes on; if the
worker itself dies, every pending and later caller gets :class:`EngineFailure` instead of
waiting forever.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mlxd.batching import Batch, keep_cache, sampling_parts, solo_reason
from mlxd.errors import EngineFailure, ModelLoadFailed
from mlxd.layersync import sync_prefill_layers
from mlxd.prefix_cache import PrefixCache
from mlxd.sequence import Sequence

log = logging.getLogger("mlxd.engine")

T = TypeVar("T")
LogitsProcessor = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None


@dataclass
class GenerationRequest:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    tokenizer: Any  # mlx_lm TokenizerWrapper: detokenizer and EOS ids
    ignore_eos: bool = False
    extra_processors: list[LogitsProcessor] = field(default_factory=list)
    # From the model's models.yaml entry: a KV cap (rotating cache beyond it), KV quantization
    # and the prefill chunk; the memory estimate assumed the same values.
    max_kv_size: int | None = None
    kv_bits: int | None = None
    prefill_step_size: int = 2048
    # Checked between tokens; the caller sets it (client gone, stop string matched, pressure).
    cancel: threading.Event = field(default_factory=threading.Event)
    # Why the caller cancelled, reported as the finish reason.
    cancel_reason: str = "cancelled"
    # Log-probabilities in the chunks: None = off, k = the sampled token's plus k alternatives.
    logprobs: int | None = None
    # A continuation of raw text (/v1/completions): its first token's leading space is output.
    keep_leading_space: bool = False


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """One step of output; the last chunk of a generation carries ``finish_reason``."""

    text: str
    token: int | None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | a cancel_reason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprob: float | None = None  # of ``token``, when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first
    peak_bytes: int = 0  # final chunk: MLX peak memory seen while this request was in flight


@dataclass(frozen=True)
class LoadedModel:
    path: Path
    config: dict[str, Any]
    load_seconds: float
    peak_bytes: int
    active_bytes: int


class Engine(Protocol):
    async def load(self, path: Path, *, prewarm: bool = True) -> LoadedModel: ...
    async def unload(self) -> None: ...
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...
    async def memory(self) -> dict[str, int]: ...
    async def set_limits(self, memory_limit: int | None, wired_limit: int | None) -> None: ...
    async def evict_prefix_cache(self, max_bytes: int) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...


class _Stop:
    """Sentinel job that ends the worker."""


class MLXEngine:
    """mlx-lm generation on a dedicated thread, with a prefix cache of recent KV caches."""

    def __init__(self, prefix_cache_bytes: int = 1 << 30) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | _Stop] = queue.SimpleQueue()
        self._dead: BaseException | None = None
        self._model: Any = None
        self._path: Path | None = None
        self._batch: Batch | None = None
        self._pending: deque[Sequence] = deque()  # joined, not yet in the batch (FIFO)
        self._wired_limit: int | None = None
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.generations = 0
        self.tokens_generated = 0
        self.solo_runs = 0
        self._peak = 0
        self._memory: dict[str, int] = {"active": 0, "cache": 0, "peak": 0, "prefix_cache": 0}
        self._waiting: set[Callable[[BaseException], None]] = set()
        self._thread = threading.Thread(target=self._run, name="mlxd-mlx", daemon=True)
        self._thread.start()

    # ---- worker side ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                busy = bool(self._pending) or bool(self._batch and len(self._batch))
                try:
                    job = self._jobs.get_nowait() if busy else self._jobs.get()
                except queue.Empty:
                    self._step()
                    continue
                if isinstance(job, _Stop):
                    self._drop_all(EngineFailure("the server is shutting down"))
                    return
                job()
        except BaseException as exc:  # keep the cause for every later caller
            self._dead = exc
            log.exception("MLX worker thread died")
            # Whoever still waits on a generation is told now instead of waiting forever.
            for notify in list(self._waiting):
                notify(EngineFailure(f"the MLX worker thread died: {exc!r}"))

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the MLX thread (between batch steps) and await its result."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            try:
                result = fn()
                self._record_memory()  # before the caller resumes: it may read memory() next
            except Exception as exc:
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        self._jobs.put(job)
        return await future

    def _check_alive(self) -> None:
        if self._dead is not None or not self._thread.is_alive():
            raise EngineFailure(f"the MLX worker thread is not running ({self._dead!r})")

    def _record_memory(self) -> None:
        """Refresh the snapshot ``memory()`` returns (written here, read by the event loop)."""
        import mlx.core as mx

        batch_peak = self._batch.peak if self._batch is not None else 0
        self._peak = max(self._peak, batch_peak, int(mx.get_peak_memory()))
        self._memory = {
            "active": int(mx.get_active_memory()),
            "cache": int(mx.get_cache_memory()),
            "peak": self._peak,
            "prefix_cache": self.prefix_cache.nbytes,
        }

    # ---- model lifecycle -----------------------------------------------------------------

    async def load(self, path: Path, *, prewarm: bool = True) -> LoadedModel:
        return await self._call(lambda: self._load(path, prewarm))

    def _load(self, path: Path, prewarm: bool) -> LoadedModel:
        import mlx.core as mx
        from mlx_lm.utils import load_model

        if self._model is not None:  # the manager unloads first; this guards direct callers
            self._unload()
        start = time.perf_counter()
        mx.reset_peak_memory()
        self._peak = 0
        try:
            model, config = load_model(path)
        except Exception as exc:
            self._unload()
            raise ModelLoadFailed(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
        sync_prefill_layers(model)  # prefill's working memory: one layer's, every run
        if prewarm:
            self._prewarm(model)
        self._model, self._path = model, path
        self._batch = Batch(model, self.prefix_cache)
        if self._wired_limit:  # the generator sets mlx-lm's recommended limit; keep ours
            self._apply_wired_limit(self._wired_limit)
        return LoadedModel(
            path=path,
            config=config,
            load_seconds=time.perf_counter() - start,
            peak_bytes=int(mx.get_peak_memory()),
            active_bytes=int(mx.get_active_memory()),
        )

    @staticmethod
    def _prewarm(model: Any) -> None:
        """Run a tiny forward pass so kernels are compiled before the first real request."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(model)
        logits = model(mx.array([[1, 2, 3, 4]]), cache=cache)
        mx.eval(logits)
        logits = model(mx.array([[5]]), cache=cache)
        mx.eval(logits)
        del logits, cache

    async def unload(self) -> None:
        await self._call(self._unload)

    async def with_model(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(model)`` on the MLX thread with the resident mlx-lm model, between two
        batch steps (calibration's samples)."""

        def run() -> T:
            if self._model is None:
                raise EngineFailure("no model is loaded")
            return fn(self._model)

        return await self._call(run)

    def _unload(self) -> None:
        import mlx.core as mx

        self._drop_all(EngineFailure("the model was unloaded during generation"))
        self.prefix_cache.clear()
        self._model = None
        self._path = None
        # MLX keeps freed buffers in its own pool; dropping the last references, collecting
        # cycles (modules reference their parents), then clearing the pool returns the memory
        # to the OS so the next model (or the rest of the machine) can have it.
        gc.collect()
        mx.clear_cache()

    def _drop_all(self, error: EngineFailure) -> None:
        """End every waiting and running generation with ``error`` and drop the batch."""
        gone = list(self._pending)
        self._pending.clear()
        if self._batch is not None:
            gone += self._batch.abandon()
            self._batch.close()
            self._batch = None
        for seq in gone:
            seq.emit(error)

    async def memory(self) -> dict[str, int]:
        return dict(self._memory)

    async def set_limits(self, memory_limit: int | None, wired_limit: int | None) -> None:
        def apply() -> None:
            import mlx.core as mx

            if memory_limit:
                mx.set_memory_limit(memory_limit)
            if wired_limit:
                self._wired_limit = wired_limit
                self._apply_wired_limit(wired_limit)

        await self._call(apply)

    @staticmethod
    def _apply_wired_limit(limit: int) -> None:
        import mlx.core as mx

        try:
            mx.set_wired_limit(limit)
        except Exception as exc:  # only Metal has a wired limit
            log.debug("wired limit not set: %s", exc)

    async def evict_prefix_cache(self, max_bytes: int) -> int:
        def evict() -> int:
            import mlx.core as mx

            freed = self.prefix_cache.evict_to(max_bytes)
            mx.clear_cache()  # hand the freed buffers back, not just to MLX's pool
            return freed

        return await self._call(evict)

    def stats(self) -> dict[str, int]:
        """Counters for /health; plain ints written by the worker, read without locking."""
        batch = self._batch
        return {
            "generations": self.generations,
            "tokens_generated": self.tokens_generated,
            "batch_size": len(batch) if batch is not None else 0,
            "batch_pending": len(self._pending),
            "batch_steps": batch.steps if batch is not None else 0,
            "interleaved_prefill_steps": batch.sizer.interleaved_steps if batch is not None else 0,
            "prefill_chunk_while_decoding": batch.sizer.chunk if batch is not None else 0,
            "solo_runs": self.solo_runs,
            "prefix_cache_hits": self.prefix_cache.hits,
            "prefix_cache_reused_tokens": self.prefix_cache.reused_tokens,
            "prefix_cache_bytes": self.prefix_cache.nbytes,
        }

    def close(self) -> None:
        """Stop the worker after its current step (and wait briefly, so the interpreter does
        not exit while MLX is still computing on it)."""
        self._jobs.put(_Stop())
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    # ---- generation ----------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self._check_alive()
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()

        def emit(item: GenerationChunk | BaseException) -> None:
            loop.call_soon_threadsafe(out.put_nowait, item)

        self._waiting.add(emit)
        self._jobs.put(lambda: self._join(Sequence(request, emit)))
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    if isinstance(item, EngineFailure):
                        raise item
                    raise EngineFailure(
                        f"generation failed: {type(item).__name__}: {item}"
                    ) from item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._waiting.discard(emit)
            # Client gone or consumer stopped early: the worker sees this before its next step.
            request.cancel.set()

    def _join(self, seq: Sequence) -> None:
        if self._model is None:
            seq.emit(EngineFailure("no model is loaded"))
            return
        self.generations += 1
        self._pending.append(seq)

    def _step(self) -> None:
        """Between two steps: end cancelled sequences, let waiting ones in, then step."""
        batch = self._batch
        assert batch is not None
        for seq in [s for s in batch.live.values() if s.req.cancel.is_set()]:
            batch.leave(seq)
            seq.emit(seq.finish(seq.req.cancel_reason))
        while self._pending:
            seq = self._pending[0]
            if seq.req.cancel.is_set() or seq.req.max_tokens <= 0:
                self._pending.popleft()
                seq.emit(seq.finish(seq.req.cancel_reason if seq.req.cancel.is_set() else "length"))
                continue
            reason = solo_reason(seq, self._model)
            if reason is not None:
                if len(batch):
                    break  # FIFO: it runs once the batch has drained
                self._pending.popleft()
                log.info("request runs alone, not in the batch: %s", reason)
                self.solo_runs += 1
                self._run_alone(seq)
                return
            self._pending.popleft()
            try:
                batch.join(seq)
            except Exception as exc:
                seq.emit(exc)
        if not len(batch):
            return
        try:
            self.tokens_generated += batch.step()
        except Exception as exc:  # the step itself failed (e.g. MLX out of memory)
            log.exception("batch step failed; ending the batch's requests")
            for seq in batch.abandon():
                seq.emit(exc)
            batch.close()
            self._batch = Batch(self._model, self.prefix_cache)
            return
        self._record_memory()

    def _run_alone(self, seq: Sequence) -> None:
        """``generate_step`` for one request: the seed is set right before it, nothing else
        draws random numbers meanwhile, so a fixed seed reproduces."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        req = seq.req
        if req.sampling.seed is not None:
            mx.random.seed(req.sampling.seed)
        sampler, processors = sampling_parts(seq)
        hit = self.prefix_cache.take(req.prompt, req.max_kv_size, req.kv_bits)
        cache = hit.cache if hit.cache is not None else make_prompt_cache(
            self._model, max_kv_size=req.max_kv_size
        )  # fmt: skip
        seq.reused = hit.reused
        mx.reset_peak_memory()
        try:
            steps = generate_step(
                mx.array(req.prompt[hit.reused :]), self._model, max_tokens=req.max_tokens,
                sampler=sampler, logits_processors=processors or None, prompt_cache=cache,
                prefill_step_size=req.prefill_step_size, kv_bits=req.kv_bits,
            )  # fmt: skip
            for token, logprobs in steps:
                seq.peak = max(seq.peak, int(mx.get_peak_memory()))
                self.tokens_generated += 1
                if seq.error is not None:  # a processor failed on this step
                    seq.emit(seq.error)
                    return
                chunk = seq.add(int(token), logprobs)
                if chunk is None:
                    seq.emit(seq.finish("stop"))
                    return
                seq.emit(chunk)
                if seq.done:
                    return
                if req.cancel.is_set():
                    seq.emit(seq.finish(req.cancel_reason))
                    return
        except Exception as exc:
            seq.emit(exc)
        finally:
            keep_cache(self.prefix_cache, seq, req.prompt + seq.generated, cache)
            self._record_memory()


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
