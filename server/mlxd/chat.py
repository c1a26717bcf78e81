"""The chat service: one path from an OpenAI request to a stream of deltas.

request ─► resolve model ─► render chat template ─► count tokens, check context
        ─► lease the model (swap/wait/reject) ─► engine ─► stop strings ─► <think> splitter
        ─► tool-call parser ─► ``Delta`` … ``Finish``

Streaming and non-streaming responses are both built from this one stream (the route folds it
into a single completion or frames it as SSE), so the two can never disagree. Nothing here
imports FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlxd.admission import Need
from mlxd.config import ModelEntry, parse_duration
from mlxd.constraints import constraint_processors
from mlxd.engine import Engine, GenerationRequest, SamplingParams
from mlxd.errors import BadRequest, ContextLengthExceeded
from mlxd.gate import MemoryGate, RequestNeed
from mlxd.logfmt import REQUEST_FIELD
from mlxd.logprobs import TokenLogprob, token_logprob
from mlxd.manager import Flight, KeepAlive, ModelManager
from mlxd.observe import RequestRecord
from mlxd.parsers.base import ToolCallDelta, ToolParser
from mlxd.parsers.reasoning import ThinkSplitter, prompt_opens_reasoning
from mlxd.prompt import render_prompt
from mlxd.protocol import ChatRequest, completion_id, now
from mlxd.registry import Registry
from mlxd.stops import StopMatcher
from mlxd.toolformats import ToolCallFormat, format_for

log = logging.getLogger("mlxd.chat")

OPENAI_DEFAULTS = SamplingParams(temperature=1.0, top_p=1.0)
MAX_KEEP_ALIVE = 366 * 86400.0  # beyond a year, say -1 (forever)
# No tokenizer packs more than this many characters into one token on average, so a prompt
# longer than context × this is refused before spending seconds of CPU tokenizing it.
MAX_CHARS_PER_TOKEN = 100


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    # Indices of calls already announced that turned out malformed (their text is in content):
    # a folded response drops them; a stream has already sent them.
    invalidated: list[int] = field(default_factory=list)
    index: int = 0  # the choice (n > 1)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # tokens of this step

    def __bool__(self) -> bool:
        return bool(
            self.content or self.reasoning or self.tool_calls or self.invalidated or self.logprobs
        )


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Finish:
    """The end of one choice; ``usage`` counts that choice's completion tokens."""

    reason: str
    usage: Usage
    stop_sequence: str | None = None  # the stop string that ended the output, if one did
    index: int = 0
    detail: str | None = None  # why the server ended it early (memory pressure)


@dataclass
class Prepared:
    """A request that passed validation: rendered, counted, and ready to be admitted."""

    entry: ModelEntry
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stops: list[str]
    tokenizer: Any
    think: bool
    starts_in_reasoning: bool
    # Makes the tool-call parser of one choice (in the model's call format); None: no tools.
    tool_parser: Callable[[], ToolParser] | None
    # Builds the logits processors of one sequence: they keep per-sequence state, so each of
    # the n choices gets its own.
    processors: Callable[[], list[Any]]
    ignore_eos: bool
    keep_alive: KeepAlive | None
    need: RequestNeed | None = None
    parallel_tool_calls: bool = True
    raw: bool = False  # a raw prompt (no chat template): the output continues it verbatim
    n: int = 1
    logprobs: int | None = None  # top_logprobs to report per token; None: no logprobs


class ChatRun:
    """One admitted request (n choices). Iterate ``events()`` once; ``aclose()`` is idempotent."""

    def __init__(
        self,
        prepared: Prepared,
        engine: Engine,
        exit_stack: contextlib.AsyncExitStack,
        observers: Sequence[Callable[[RequestRecord], None]] = (),
    ) -> None:
        self.id = completion_id()
        self._observers = observers
        self.created = now()
        self.prepared = prepared
        self.model = prepared.entry.id
        self._engine = engine
        self._stack = exit_stack
        self.generations = [self._generation(i) for i in range(prepared.n)]
        self.first_token_at: float | None = None
        self.started_at = time.perf_counter()
        self.client = "-"  # who asked (address:port), for the log line
        # Why the run was ended early, if it was: client_disconnected, shutdown, memory_pressure.
        self.cause: str | None = None
        self._logged = False
        self._usages = [Usage(len(prepared.prompt), 0, 0) for _ in self.generations]
        self.peak_bytes = 0  # MLX's peak while it ran (from the engine's final chunks)
        self.tokens_generated = 0
        self.ended_detail: str | None = None  # why the server ended it early, if it did

    def _generation(self, index: int) -> GenerationRequest:
        p = self.prepared
        sampling = p.sampling
        if index and sampling.seed is not None:  # seeded choices differ from one another
            sampling = dataclasses.replace(sampling, seed=sampling.seed + index)
        return GenerationRequest(
            prompt=p.prompt,
            max_tokens=p.max_tokens,
            sampling=sampling,
            tokenizer=p.tokenizer,
            ignore_eos=p.ignore_eos,
            extra_processors=p.processors(),
            max_kv_size=p.entry.max_kv_size,
            kv_bits=p.entry.kv_bits,
            prefill_step_size=p.entry.prefill_step_size,
            logprobs=p.logprobs,
            keep_leading_space=p.raw,
        )

    def _log(self, finish: Finish) -> None:
        """One record per request at its end, cancelled or not: the log line, /metrics and the
        status page read it (who, what ran, how fast, why)."""
        self._logged = True
        u = finish.usage
        record = RequestRecord.measure(
            id=self.id, model=self.model, prompt_tokens=u.prompt_tokens,
            cached_tokens=u.cached_tokens, completion_tokens=u.completion_tokens,
            started=self.started_at, first_token=self.first_token_at, end=time.perf_counter(),
            finish=finish.reason, client=self.client, cause=self.cause,
        )  # fmt: skip
        for observe in self._observers:
            observe(record)
        log.info(
            "chat id=%s client=%s model=%s prompt=%d cached=%d completion=%d ttft_ms=%.0f "
            "decode_tok_s=%.1f finish=%s%s",
            self.id, self.client, self.model, u.prompt_tokens, u.cached_tokens,
            u.completion_tokens, (record.ttft_s or 0.0) * 1000, record.decode_tok_s,
            finish.reason, f" cancelled={self.cause}" if self.cause else "",
            extra={REQUEST_FIELD: record.to_log()},
        )  # fmt: skip

    def cancel(self, reason: str = "cancelled", cause: str | None = None) -> None:
        """End the generation within one token; ``reason`` becomes its finish reason."""
        if cause is not None and self.cause is None:
            self.cause = cause
        for generation in self.generations:
            generation.cancel_reason = reason
            generation.cancel.set()

    def end_early(self, detail: str) -> None:
        """The server ends it (memory pressure): ``finish_reason`` "length", ``detail`` why."""
        self.ended_detail = detail
        self.cancel("length", "memory_pressure")

    def on_close(self, callback: Any) -> None:
        """Run ``callback`` when the run is closed (however it ends)."""
        self._stack.callback(callback)

    async def aclose(self) -> None:
        for generation in self.generations:
            generation.cancel.set()
        await self._stack.aclose()

    async def events(self) -> AsyncIterator[Delta | Finish]:
        """Every choice's deltas, interleaved as they come, each choice ending in its Finish.

        The run is recorded (log line, /metrics, status page) once, when the last choice ends
        or when the run is cut short: its usage counts every choice's completion tokens.
        """
        finished: list[Finish] = []
        try:
            async for event in self._choices():
                if isinstance(event, Finish):
                    finished.append(event)
                    if len(finished) == len(self.generations):
                        self._log(dataclasses.replace(event, usage=self._usage()))
                yield event
        except (GeneratorExit, asyncio.CancelledError):
            if not self._logged:  # the client went away mid-answer
                self.cause = self.cause or "client_disconnected"
                self._log(Finish("cancelled", self._usage()))
            raise
        except Exception:
            if not self._logged:
                self._log(Finish("error", self._usage()))
            raise
        finally:
            if not self._logged:  # the consumer stopped early: the client went away
                self.cause = self.cause or "client_disconnected"
                self._log(Finish("cancelled", self._usage()))
            await self.aclose()

    def _usage(self) -> Usage:
        """The run's usage so far: the prompt once, the completion tokens of every choice."""
        first = self._usages[0]
        completion = sum(u.completion_tokens for u in self._usages)
        return Usage(first.prompt_tokens, completion, first.cached_tokens)

    async def _choices(self) -> AsyncIterator[Delta | Finish]:
        if len(self.generations) == 1:
            async for event in self._choice(0):
                yield event
            return
        # n choices run as n generations side by side: n sequences of the engine's batch.
        queue: asyncio.Queue[Delta | Finish | BaseException | None] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for event in self._choice(index):
                    await queue.put(event)
            except BaseException as exc:
                await queue.put(exc)
                raise
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.generations))]
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _choice(self, index: int) -> AsyncIterator[Delta | Finish]:
        p = self.prepared
        generation = self.generations[index]
        stops = StopMatcher(p.stops)
        think = ThinkSplitter(start_in_reasoning=p.starts_in_reasoning) if p.think else None
        tools = p.tool_parser() if p.tool_parser is not None else None

        def parse(text: str, final: bool) -> Delta:
            reasoning = ""
            if think is not None:
                split = think.feed(text)
                reasoning, text = split.reasoning, split.content
                if final:
                    rest = think.finish()
                    reasoning, text = reasoning + rest.reasoning, text + rest.content
            if tools is None:
                return Delta(content=text, reasoning=reasoning, index=index)
            parsed = tools.feed(text)
            content, calls, invalid = parsed.content, list(parsed.calls), list(parsed.invalidated)
            if final:
                tail = tools.finish()
                content += tail.content
                calls += tail.calls
                invalid += tail.invalidated
            return Delta(content, reasoning, calls, invalid, index)

        finish_reason = "stop"
        stop_sequence: str | None = None
        async for chunk in self._engine.generate(generation):
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self._usages[index] = Usage(
                chunk.prompt_tokens, chunk.completion_tokens, chunk.cached_tokens
            )
            matched = stops.feed(chunk.text)
            final = chunk.finish_reason is not None or matched.stopped
            text = matched.text if matched.stopped else matched.text + (
                stops.finish() if final else ""
            )  # fmt: skip
            delta = parse(text, final)
            if p.logprobs is not None and chunk.token is not None and chunk.logprob is not None:
                delta.logprobs.append(token_logprob(p.tokenizer, chunk))
            if delta:
                yield delta
            if matched.stopped:
                generation.cancel_reason = "stop"
                generation.cancel.set()
                finish_reason, stop_sequence = "stop", matched.stop
                break
            if tools is not None and tools.call_count and not p.parallel_tool_calls:
                generation.cancel_reason = "stop"  # parallel_tool_calls=false: one call, then stop
                generation.cancel.set()
                finish_reason = "stop"
                break
            if chunk.finish_reason is not None:
                finish_reason = chunk.finish_reason
                self.peak_bytes = max(self.peak_bytes, chunk.peak_bytes)
                self.tokens_generated = max(self.tokens_generated, chunk.completion_tokens)
                break
        if finish_reason == "cancelled":
            finish_reason = "stop"
        if tools is not None:
            if tools.incomplete_call is not None:
                # Announced but cut off: its arguments are not valid JSON, so a folded
                # response leaves it out; finish_reason says why ("length" for max_tokens).
                yield Delta(invalidated=[tools.incomplete_call], index=index)
            if tools.call_count and finish_reason == "stop" and not tools.truncated:
                finish_reason = "tool_calls"
        yield Finish(
            finish_reason, self._usages[index], stop_sequence, index, detail=self.ended_detail
        )


class ChatService:
    def __init__(
        self,
        registry: Registry,
        manager: ModelManager,
        engine: Engine,
        gate: MemoryGate | None = None,
    ) -> None:
        self.registry = registry
        self.manager = manager
        self.engine = engine
        self.gate = gate
        self.running: set[ChatRun] = set()
        # Called once per finished request (metrics, the status page's recent requests).
        self.observers: list[Callable[[RequestRecord], None]] = []

    def end_running(self, reason: str, cause: str = "memory_pressure") -> int:
        """Finish every running generation early (memory pressure, shutdown); how many."""
        for run in list(self.running):
            run.cancel(reason, cause)
        return len(self.running)

    def _observe(self, run: ChatRun, flight: Flight | None, beside: int) -> None:
        """Online calibration: a sequence that ran alone compares its measured peak (less the
        other chats' cached KV resident beside it) with its estimate."""
        need = run.prepared.need
        if self.gate is None or need is None or flight is None or not flight.alone:
            return
        if run.peak_bytes:
            self.gate.observe(need, run.peak_bytes - beside, run.tokens_generated)

    async def start(
        self,
        request: ChatRequest,
        entry: ModelEntry,
        raw_prompt: list[int] | None = None,
        *,
        cap_max_tokens: bool = False,
    ) -> ChatRun:
        """Validate, render and admit ``request``; errors raise before anything is streamed."""
        prepared = await self.prepare(request, entry, raw_prompt, cap_max_tokens=cap_max_tokens)
        if self.gate is not None and prepared.need is not None:
            self.gate.precheck(prepared.need)  # never fits: refuse now, not after queueing
        stack = contextlib.AsyncExitStack()
        try:
            lease = await stack.enter_async_context(
                self.manager.acquire(entry, need=prepared.need, keep_alive=prepared.keep_alive)
            )
        except BaseException:
            await stack.aclose()
            raise
        run = ChatRun(prepared, self.engine, stack, self.observers)
        self.running.add(run)
        stack.callback(self.running.discard, run)
        if lease.flight is not None:
            lease.flight.stop = run.end_early  # the pressure policy ends runs through it
        beside = self.gate.prefix_cache_bytes() if self.gate is not None else 0
        stack.callback(self._observe, run, lease.flight, beside)  # before the lease ends
        return run

    async def prepare(
        self,
        request: ChatRequest,
        entry: ModelEntry,
        raw_prompt: list[int] | None = None,
        *,
        cap_max_tokens: bool = False,
    ) -> Prepared:
        """``raw_prompt`` (token ids) replaces the chat template: the text-completion APIs send
        the model exactly those tokens and get its raw text back (no reasoning or tool parsing);
        ``request.messages`` is then unused. ``cap_max_tokens``: the request's max_tokens is a
        cap, lowered to what the context has room for (APIs whose clients send one fixed large
        value, like Claude Code's 32000), instead of an error."""
        tokenizer = await self.registry.tokenizer(entry)
        config = await self.registry.config(entry)
        vocab = vocab_size(config, tokenizer)
        check_against_model(request, vocab)
        keep_alive = request_keep_alive(request)
        tools = [t.model_dump(exclude_none=True) for t in request.tools or []] or None
        if raw_prompt is not None:
            tools = None
        choice = request.tool_choice
        render_tools = tools if choice != "none" else None
        context = context_limit(entry, config)

        def render_and_encode() -> tuple[str, list[int], ToolCallFormat | None]:
            if raw_prompt is not None:
                return "", list(raw_prompt), None
            with tokenizer_lock(tokenizer):
                fmt = format_for(tokenizer, entry.tool_call_format) if tools else None
                text = render_prompt(tokenizer, request, entry, render_tools, fmt)
                if len(text) > context * MAX_CHARS_PER_TOKEN:
                    raise ContextLengthExceeded(
                        f"This model's maximum context length is {context} tokens; the messages "
                        f"are {len(text)} characters, far more than that. Shorten the messages.",
                        param="messages",
                    )
                return text, list(tokenizer.encode(text, add_special_tokens=False)), fmt

        # Rendering and tokenizing take time in proportion to the prompt (seconds for a few
        # MB): off the event loop, so running streams and /health are not held up.
        prompt_text, prompt, fmt = await asyncio.to_thread(render_and_encode)
        max_tokens = resolve_max_tokens(request, entry, len(prompt), context, cap_max_tokens)
        starts_in_reasoning = tokenizer.has_thinking and prompt_opens_reasoning(prompt_text)

        def constraints() -> Callable[[], list[Any]]:
            with tokenizer_lock(tokenizer):
                return constraint_processors(
                    tokenizer, request, tools, fmt,
                    starts_in_reasoning=bool(starts_in_reasoning), max_tokens=max_tokens,
                )  # fmt: skip

        # Compiling a grammar (and, once per tokenizer, llguidance's view of the vocabulary)
        # takes milliseconds to a second: off the event loop too.
        processors = await asyncio.to_thread(constraints)
        sampling = sampling_for(request, entry, self.registry.generation_defaults(entry))
        if not 0 < sampling.top_k < vocab:
            # top_k >= the vocabulary keeps every token: the same as no top_k (mlx-lm refuses it).
            sampling = dataclasses.replace(sampling, top_k=0)
        n = request.n or 1
        need = None
        if self.gate is not None:
            need = self.gate.need_for(
                entry, self.registry.model_dir(entry), len(prompt), max_tokens, context,
                sampling=sampling.temperature > 0,
            )  # fmt: skip
            if n > 1:
                need = dataclasses.replace(need, need=times(need.need, n))
        return Prepared(
            entry=entry,
            prompt=prompt,
            max_tokens=max_tokens,
            sampling=sampling,
            stops=request.stop_list,
            tokenizer=tokenizer,
            think=bool(tokenizer.has_thinking) and raw_prompt is None,
            starts_in_reasoning=starts_in_reasoning,
            tool_parser=(
                functools.partial(fmt.parser, render_tools)
                if fmt is not None and render_tools is not None
                else None
            ),
            processors=processors,
            ignore_eos=request.ignore_eos,
            keep_alive=keep_alive,
            need=need,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            raw=raw_prompt is not None,
            n=n,
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        )


def times(need: Need, n: int) -> Need:
    """The memory need of ``n`` sequences of one request (n choices): n KV caches and working
    sets, reserved together so the choices join the batch together."""
    per_sequence = need.request_for

    def request_for(tokens: int) -> int:
        assert per_sequence is not None
        return per_sequence(tokens) * n

    return dataclasses.replace(
        need, request=need.request * n, request_for=request_for if per_sequence else None
    )


_TOKENIZER_LOCKS: dict[int, threading.Lock] = {}


def tokenizer_lock(tokenizer: Any) -> threading.Lock:
    """One lock per tokenizer: HF fast tokenizers are not safe to drive from two threads."""
    return _TOKENIZER_LOCKS.setdefault(id(tokenizer), threading.Lock())


def vocab_size(config: dict[str, Any], tokenizer: Any) -> int:
    """The number of logits the model produces: valid token ids are ``0 <= id < vocab``."""
    for source in (config, config.get("text_config") or {}):
        value = source.get("vocab_size")
        if isinstance(value, int) and value > 0:
            return value
    return len(tokenizer.get_vocab())


def check_against_model(request: ChatRequest, vocab: int) -> None:
    """Token ids must exist in this model's vocabulary (an id past it corrupts memory in MLX)."""
    for key in request.logit_bias or {}:
        if len(key) > 12 or not 0 <= int(key) < vocab:
            raise BadRequest(
                f"logit_bias: token id {key} is not in this model's vocabulary "
                f"(valid ids: 0..{vocab - 1})",
                param="logit_bias",
            )


def request_keep_alive(request: ChatRequest) -> KeepAlive | None:
    if request.keep_alive is None:
        return None
    try:
        seconds = parse_duration(request.keep_alive)
    except ValueError as exc:
        raise BadRequest(f"keep_alive: {exc}", param="keep_alive") from None
    if seconds is not None and seconds > MAX_KEEP_ALIVE:
        raise BadRequest(
            "keep_alive: at most 366 days; use -1 to keep the model loaded", param="keep_alive"
        )
    return KeepAlive(seconds)


def context_limit(entry: ModelEntry, config: dict[str, Any]) -> int:
    if entry.context_length:
        return entry.context_length
    text = config.get("text_config") or {}
    for source in (config, text):
        for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return 4096


def resolve_max_tokens(
    request: ChatRequest, entry: ModelEntry, prompt: int, context: int, cap: bool = False
) -> int:
    room = context - prompt
    if room <= 0:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context} tokens, but the messages "
            f"take {prompt} tokens. Shorten the messages.",
            param="messages",
        )
    asked = request.requested_max_tokens
    if asked is not None:
        if asked > room and cap:
            return room
        if asked > room:
            field_name = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. The messages take "
                f"{prompt} tokens and {field_name} asks for {asked}, {prompt + asked} in total. "
                f"Lower {field_name} to at most {room} or shorten the messages.",
                param=field_name,
            )
        return asked
    default = entry.defaults.max_tokens
    return min(default, room) if default else room


def sampling_for(
    request: ChatRequest, entry: ModelEntry, generation: dict[str, Any]
) -> SamplingParams:
    """Request values, else models.yaml defaults, else the model's generation_config."""

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(request, name)
        if value is not None:
            return value
        value = getattr(entry.defaults, name)
        if value is not None:
            return value
        value = generation.get(name)
        return value if isinstance(value, (int, float)) else fallback

    bias = {int(k): float(v) for k, v in (request.logit_bias or {}).items()} or None
    return SamplingParams(
        temperature=float(pick("temperature", OPENAI_DEFAULTS.temperature)),
        top_p=float(pick("top_p", OPENAI_DEFAULTS.top_p)),
        top_k=int(pick("top_k", 0)),
        min_p=float(pick("min_p", 0.0)),
        seed=request.seed,
        repetition_penalty=pick("repetition_penalty", None),
        presence_penalty=pick("presence_penalty", None),
        frequency_penalty=pick("frequency_penalty", None),
        logit_bias=bias,
    )
