"""Generation on one dedicated MLX thread.

MLX work (loading, prefill, decode, freeing) happens on a single worker thread: MLX streams and
caches are not meant to be driven from several threads, and a single owner makes "one model
resident" a fact rather than a convention. The asyncio side submits jobs and pulls
:class:`GenerationChunk` objects from an ``asyncio.Queue`` fed with ``call_soon_threadsafe``.

Jobs run in submission order, so requests wait their turn and none is lost. A job that raises
sends the error to its caller and the worker goes on with the next job; if the worker itself
dies, every pending and later caller gets :class:`EngineFailure` instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from server.errors import EngineFailure, ModelLoadFailed
from server.prefix_cache import PrefixCache

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
    # Report each token's logprob and this many top alternatives (0: none); None: no logprobs.
    logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """One step of output; the last chunk of a generation carries ``finish_reason``."""

    text: str
    token: int | None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | a cancel_reason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprob: float | None = None  # when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # (token, logprob), most likely first


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
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.generations = 0
        self.tokens_generated = 0
        self._waiting: set[Callable[[BaseException], None]] = set()
        self._thread = threading.Thread(target=self._run, name="mlxd-mlx", daemon=True)
        self._thread.start()

    # ---- worker side ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                job = self._jobs.get()
                if isinstance(job, _Stop):
                    return
                job()
        except BaseException as exc:  # keep the cause for every later caller
            self._dead = exc
            log.exception("MLX worker thread died")
            # Whoever still waits on a generation is told now instead of waiting forever.
            for notify in list(self._waiting):
                notify(EngineFailure(f"the MLX worker thread died: {exc!r}"))

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the MLX thread and await its result."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            try:
                result = fn()
            except Exception as exc:
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        self._jobs.put(job)
        return await future

    def _check_alive(self) -> None:
        if self._dead is not None or not self._thread.is_alive():
            raise EngineFailure(f"the MLX worker thread is not running ({self._dead!r})")

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
        try:
            model, config = load_model(path)
        except Exception as exc:
            self._unload()
            raise ModelLoadFailed(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
        if prewarm:
            self._prewarm(model)
        self._model, self._path = model, path
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

    def _unload(self) -> None:
        import mlx.core as mx

        self.prefix_cache.clear()
        self._model = None
        self._path = None
        # MLX keeps freed buffers in its own pool; dropping the last references, collecting
        # cycles (modules reference their parents), then clearing the pool returns the memory
        # to the OS so the next model (or the rest of the machine) can have it.
        gc.collect()
        mx.clear_cache()

    async def memory(self) -> dict[str, int]:
        def read() -> dict[str, int]:
            import mlx.core as mx

            return {
                "active": int(mx.get_active_memory()),
                "cache": int(mx.get_cache_memory()),
                "peak": int(mx.get_peak_memory()),
                "prefix_cache": self.prefix_cache.nbytes,
            }

        return await self._call(read)

    async def set_limits(self, memory_limit: int | None, wired_limit: int | None) -> None:
        def apply() -> None:
            import mlx.core as mx

            if memory_limit:
                mx.set_memory_limit(memory_limit)
            if wired_limit:
                try:
                    mx.set_wired_limit(wired_limit)
                except Exception as exc:  # only Metal has a wired limit
                    log.debug("wired limit not set: %s", exc)

        await self._call(apply)

    async def evict_prefix_cache(self, max_bytes: int) -> int:
        def evict() -> int:
            import mlx.core as mx

            freed = self.prefix_cache.evict_to(max_bytes)
            mx.clear_cache()  # hand the freed buffers back, not just to MLX's pool
            return freed

        return await self._call(evict)

    def stats(self) -> dict[str, int]:
        """Counters for /health; plain ints written by the worker, read without locking."""
        return {
            "generations": self.generations,
            "tokens_generated": self.tokens_generated,
            "prefix_cache_hits": self.prefix_cache.hits,
            "prefix_cache_reused_tokens": self.prefix_cache.reused_tokens,
            "prefix_cache_bytes": self.prefix_cache.nbytes,
        }

    def close(self) -> None:
        self._jobs.put(_Stop())

    # ---- generation ----------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self._check_alive()
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()

        def emit(item: GenerationChunk | BaseException) -> None:
            loop.call_soon_threadsafe(out.put_nowait, item)

        def job() -> None:
            try:
                self._generate(request, emit)
            except Exception as exc:
                emit(exc)

        self._waiting.add(emit)
        self._jobs.put(job)
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
            # Client gone or consumer stopped early: the worker sees this within one token.
            request.cancel.set()

    def _generate(self, req: GenerationRequest, emit: Callable[[GenerationChunk], None]) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        if self._model is None:
            raise EngineFailure("no model is loaded")
        if req.cancel.is_set():
            emit(GenerationChunk("", None, req.cancel_reason, len(req.prompt)))
            return
        s = req.sampling
        if s.seed is not None:
            mx.random.seed(s.seed)
        sampler = make_sampler(
            temp=s.temperature, top_p=s.top_p if s.top_p < 1.0 else 0.0, min_p=s.min_p,
            top_k=max(s.top_k, 0),
        )  # fmt: skip
        processors = make_logits_processors(
            logit_bias=s.logit_bias,
            repetition_penalty=s.repetition_penalty,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
        )
        processors += req.extra_processors

        self.generations += 1
        hit = self.prefix_cache.take(req.prompt, req.max_kv_size, req.kv_bits)
        cache = (
            hit.cache
            if hit.cache is not None
            else make_prompt_cache(self._model, max_kv_size=req.max_kv_size)
        )
        todo = req.prompt[hit.reused :]
        eos = set() if req.ignore_eos else set(req.tokenizer.eos_token_ids)
        detok = req.tokenizer.detokenizer
        detok.reset()
        generated: list[int] = []
        n_prompt = len(req.prompt)
        finish: str | None = None
        hit_eos = False
        try:
            steps = generate_step(
                mx.array(todo), self._model, max_tokens=req.max_tokens, sampler=sampler,
                logits_processors=processors or None, prompt_cache=cache,
                prefill_step_size=req.prefill_step_size, kv_bits=req.kv_bits,
            )  # fmt: skip
            for step, logprobs in steps:
                token = int(step)  # generate_step yields Python ints (via .item())
                picked = token_logprobs(logprobs, token, req.logprobs)
                generated.append(token)
                self.tokens_generated += 1
                if token in eos:
                    finish, hit_eos = "stop", True
                    break
                detok.add_token(token)
                last = len(generated) == req.max_tokens
                if last:
                    detok.finalize()
                    finish = "length"
                chunk = GenerationChunk(
                    detok.last_segment, token, finish, n_prompt, len(generated), hit.reused,
                    *picked,
                )  # fmt: skip
                emit(chunk)
                if last:
                    break
                if req.cancel.is_set():
                    finish = req.cancel_reason
                    break
            else:
                finish = "length"  # max_tokens reached inside generate_step (max_tokens == 0)
        finally:
            self._keep_cache(req, generated, cache)
        if finish != "length" or len(generated) != req.max_tokens:
            detok.finalize()
            completion = len(generated) - (1 if hit_eos else 0)  # EOS is not output
            emit(
                GenerationChunk(
                    detok.last_segment,
                    None,
                    finish or "stop",
                    n_prompt,
                    completion,
                    hit.reused,
                )
            )

    def _keep_cache(self, req: GenerationRequest, generated: list[int], cache: list[Any]) -> None:
        tokens = req.prompt + generated
        offset = getattr(cache[0], "offset", None) if cache else None
        if isinstance(offset, int) and offset < len(tokens):
            tokens = tokens[:offset]
        self.prefix_cache.put(tokens, cache, req.max_kv_size, req.kv_bits)


def token_logprobs(
    logprobs: Any, token: int, top: int | None
) -> tuple[float | None, list[tuple[int, float]] | None]:
    """`token`'s logprob and the `top` most likely (token, logprob) pairs; Nones if not asked."""
    if top is None:
        return None, None
    import mlx.core as mx

    if top <= 0:
        return float(logprobs[token].item()), None
    ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
    values = logprobs[ids]
    order = mx.argsort(-values)
    ids, values = ids[order], values[order]
    pairs: list[tuple[int, float]] = list(zip(ids.tolist(), values.tolist(), strict=True))  # type: ignore[arg-type]
    return float(logprobs[token].item()), pairs


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
