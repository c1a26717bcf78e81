"""What a benchmark measures: targets that answer chat requests and time every token.

Two kinds of target, one protocol:

* `HttpTarget`: any OpenAI-compatible base URL, streamed over SSE with httpx. Arrival times are
  taken as each event's line is read, so they include everything a client would wait for.
* `InProcessTarget`: the same model driven directly with mlx-lm in this process. It is the
  baseline every server is compared against: what the hardware gives without a server.

Plus what surrounds a server under test: starting and stopping it (`SpawnedServer`) and
watching its memory (`MemoryWatch`).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import httpx
import psutil

from mlxd.bench.report import BASELINE, StreamResult
from mlxd.localnet import NotReady, wait_until_ready

Messages = list[dict[str, str]]


class BenchError(Exception):
    """The benchmark cannot go on as asked (bad input, a target failing or unreachable)."""


# --------------------------------------------------------------------------- SSE


class SSEDecoder:
    """Server-sent events, one line at a time (the subset of the WHATWG rules streams use).

    ``data:`` lines accumulate until a blank line completes the event; ``:`` lines are comments
    (keep-alives) and other fields (``event``, ``id``, ``retry``) carry nothing we need.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """The data of the event this line completes, if it completes one."""
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """Dispatch what is pending (also used at the end of a stream missing its blank line)."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data


@dataclass(frozen=True)
class StreamEvent:
    done: bool = False
    content: str = ""  # the answer's text, without reasoning
    carries_token: bool = False
    finish_reason: str | None = None
    usage: Mapping[str, Any] | None = None


def parse_event(data: str) -> StreamEvent:
    """One chat-completion chunk (or ``[DONE]``); an error object in the stream raises."""
    if data.strip() == "[DONE]":
        return StreamEvent(done=True)
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise BenchError(f"stream event is not JSON: {data[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise BenchError(f"stream event is not an object: {data[:200]!r}")
    if obj.get("error"):
        error = obj["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise BenchError(f"server reported an error mid-stream: {message}")
    content, other, finish = "", False, None
    for choice in obj.get("choices") or []:
        delta = choice.get("delta") or {}
        if isinstance(delta.get("content"), str):
            content += delta["content"]
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        other = other or bool(reasoning) or bool(delta.get("tool_calls"))
        finish = choice.get("finish_reason") or finish
    usage = obj.get("usage")
    return StreamEvent(
        content=content,
        carries_token=bool(content) or other,
        finish_reason=finish,
        usage=usage if isinstance(usage, dict) else None,
    )


def read_stream(
    lines: Iterable[str], clock: Callable[[], float], into: StreamResult | None = None
) -> StreamResult:
    """Fold an SSE chat-completion stream into a `StreamResult`, timing events with ``clock``.

    ``into`` is filled as events arrive, so another thread can watch a stream's progress."""
    result = into if into is not None else StreamResult()
    decoder = SSEDecoder()
    parts: list[str] = []
    done = False

    def handle(data: str, now: float) -> bool:
        event = parse_event(data)
        if event.carries_token:
            result.token_times.append(now)
            parts.append(event.content)
        if event.finish_reason is not None:
            result.finish_reason = event.finish_reason
            result.finish_time = now
        if event.usage is not None:
            result.usage_prompt_tokens = event.usage.get("prompt_tokens")
            result.usage_completion_tokens = event.usage.get("completion_tokens")
            details = event.usage.get("prompt_tokens_details") or {}
            result.cached_tokens = details.get("cached_tokens")
        return event.done

    for line in lines:
        data = decoder.feed(line)
        if data is not None and handle(data, clock()):
            done = True
            break
    if not done and (data := decoder.flush()) is not None:
        done = handle(data, clock())
    result.end_time = clock()
    result.text = "".join(parts)
    if not done and result.finish_reason is None:
        raise BenchError("stream ended before a finish_reason or [DONE]")
    return result


# --------------------------------------------------------------------------- targets


class Target(Protocol):
    name: str

    @property
    def pid(self) -> int | None:
        """The process whose memory to watch, when known."""

    @property
    def in_process(self) -> bool: ...

    def chat(self, messages: Messages, max_tokens: int, conversation: bool = False) -> StreamResult:
        """One streamed completion. ``conversation``: part of a chat that resends its history."""

    def chat_many(
        self, conversations: Sequence[Messages], max_tokens: int
    ) -> list[tuple[float, StreamResult]]:
        """Concurrent completions: (start offset in seconds, result) per conversation."""

    def chat_join(
        self, streams: Sequence[Messages], max_tokens: int, joiner: Messages, joiner_tokens: int
    ) -> list[tuple[float, StreamResult]]:
        """Running streams, then a long prompt joining them; the joiner's result last."""

    def new_conversation(self) -> None: ...


# The join scenario sends its long prompt once every running stream has this many tokens.
JOIN_AFTER_TOKENS = 4


class HttpTarget:
    """An OpenAI-compatible server at ``base_url`` (ending in ``/v1``)."""

    in_process = False

    def __init__(
        self,
        name: str,
        base_url: str,
        model: str,
        *,
        timeout: float,
        extra_body: Mapping[str, Any] | None = None,
        pid: int | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.extra_body = dict(extra_body or {})
        self._pid = pid
        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    @property
    def pid(self) -> int | None:
        return self._pid

    def _stream(
        self, messages: Messages, max_tokens: int, into: StreamResult | None = None
    ) -> tuple[float, StreamResult]:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.extra_body,
        }
        url = f"{self.base_url}/chat/completions"
        start = time.perf_counter()
        with self.client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                response.read()
                raise BenchError(f"HTTP {response.status_code} from {url}: {response.text[:300]}")
            clock = lambda: time.perf_counter() - start  # noqa: E731
            return start, read_stream(response.iter_lines(), clock, into)

    def chat(self, messages: Messages, max_tokens: int, conversation: bool = False) -> StreamResult:
        return self._stream(messages, max_tokens)[1]

    def chat_many(
        self, conversations: Sequence[Messages], max_tokens: int
    ) -> list[tuple[float, StreamResult]]:
        barrier = threading.Barrier(len(conversations))

        def one(messages: Messages) -> tuple[float, StreamResult]:
            barrier.wait(timeout=60)
            return self._stream(messages, max_tokens)

        with ThreadPoolExecutor(len(conversations)) as pool:
            outs = [f.result() for f in [pool.submit(one, m) for m in conversations]]
        first = min(start for start, _ in outs)
        return [(start - first, result) for start, result in outs]

    def chat_join(
        self, streams: Sequence[Messages], max_tokens: int, joiner: Messages, joiner_tokens: int
    ) -> list[tuple[float, StreamResult]]:
        """``streams`` decode together; once each has its first tokens, ``joiner`` (a long
        prompt) is sent. The joiner's (offset, result) comes last."""
        live = [StreamResult() for _ in streams]
        with ThreadPoolExecutor(len(streams) + 1) as pool:
            running = [
                pool.submit(self._stream, m, max_tokens, r)
                for m, r in zip(streams, live, strict=True)
            ]
            while not all(len(r.token_times) >= JOIN_AFTER_TOKENS for r in live):
                if any(f.done() for f in running):
                    break  # a stream ended early: join now rather than never
                time.sleep(0.005)
            joined = pool.submit(self._stream, joiner, joiner_tokens)
            outs = [f.result() for f in running] + [joined.result()]
        first = min(start for start, _ in outs)
        return [(start - first, result) for start, result in outs]

    def new_conversation(self) -> None:
        """Nothing to do: whether history is reused is the server's business, and measured."""

    def close(self) -> None:
        self.client.close()


def list_models(base_url: str, timeout: float = 10.0) -> list[str]:
    """The model ids a server lists; empty when it lists none or its answer is not a list."""
    response = httpx.get(f"{base_url.rstrip('/')}/models", timeout=timeout)
    response.raise_for_status()
    try:
        data = response.json().get("data", [])
    except (ValueError, AttributeError):
        return []
    return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]


def resolve_model_name(ids: Sequence[str], model_dir: Path) -> str:
    """Which of a server's model ids is ``model_dir``: its path, its name, or the only one.

    A server that lists nothing gets the directory as given, which is what a server started
    with ``--model DIR`` knows it by.
    """
    if not ids:
        return str(model_dir)
    wanted = {str(model_dir), str(model_dir.resolve()), model_dir.name}
    for model_id in ids:
        if model_id in wanted:
            return model_id
    if len(ids) == 1:
        return ids[0]
    raise BenchError(
        f"cannot tell which model is {model_dir.name}; pass --model-name (one of {', '.join(ids)})"
    )


class InProcessTarget:
    """The model driven with mlx-lm in this process: the baseline."""

    name = BASELINE
    in_process = True

    def __init__(self, model_dir: Path, *, suppress_eos: bool) -> None:
        self.model_dir = model_dir
        self.suppress_eos = suppress_eos
        self.model: Any = None
        self.tokenizer: Any = None
        self._conv_cache: list[Any] | None = None
        self._conv_tokens: list[int] = []

    @property
    def pid(self) -> int | None:
        return os.getpid()

    def load(self) -> float:
        """Load weights and tokenizer; returns the seconds it took."""
        from mlx_lm import load

        start = time.perf_counter()
        self.model, self.tokenizer = load(str(self.model_dir))[:2]
        return time.perf_counter() - start

    def close(self) -> None:
        import mlx.core as mx

        self.model = self.tokenizer = self._conv_cache = None
        # MLX keeps freed buffers in its own pool; hand them back before a server loads.
        gc.collect()
        mx.clear_cache()

    def _generation_kwargs(self) -> dict[str, Any]:
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        kwargs: dict[str, Any] = {"sampler": make_sampler(temp=0.0)}
        if self.suppress_eos:
            bias = {int(t): -100.0 for t in self.tokenizer.eos_token_ids}
            kwargs["logits_processors"] = make_logits_processors(logit_bias=bias)
        return kwargs

    def _tokens(self, messages: Messages) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def new_conversation(self) -> None:
        self._conv_cache, self._conv_tokens = None, []

    def _reuse(self, tokens: list[int]) -> tuple[list[Any], int]:
        """The conversation's cache trimmed to what ``tokens`` shares with it, and that length.

        This is the best an application embedding mlx-lm can do for a chat: keep the KV cache
        of the previous turn and prefill only the new suffix.
        """
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

        common = min(common_prefix(self._conv_tokens, tokens), len(tokens) - 1)
        cache = self._conv_cache
        if cache is None or (common < len(self._conv_tokens) and not can_trim_prompt_cache(cache)):
            cache, common = make_prompt_cache(self.model), 0
        elif common < len(self._conv_tokens):
            trim_prompt_cache(cache, len(self._conv_tokens) - common)
        return cache, common

    def _remember(self, cache: list[Any], known: list[int]) -> None:
        offset = getattr(cache[0], "offset", None) if cache else None
        if not isinstance(offset, int):
            self.new_conversation()
            return
        self._conv_cache, self._conv_tokens = cache, known[:offset]

    def chat(self, messages: Messages, max_tokens: int, conversation: bool = False) -> StreamResult:
        from mlx_lm import stream_generate

        start = time.perf_counter()
        tokens = self._tokens(messages)
        kwargs = self._generation_kwargs()
        result, cached, generated, parts = StreamResult(), 0, [], []
        if conversation:
            kwargs["prompt_cache"], cached = self._reuse(tokens)
            result.cached_tokens = cached
        for response in stream_generate(
            self.model, self.tokenizer, tokens[cached:], max_tokens=max_tokens, **kwargs
        ):
            now = time.perf_counter() - start
            generated.append(int(response.token))
            if response.finish_reason == "stop":  # the end-of-sequence token, not content
                result.finish_time = now
            else:
                result.token_times.append(now)
                parts.append(response.text)
            if response.finish_reason is not None:
                result.finish_reason = response.finish_reason
                result.finish_time = now
        result.end_time = time.perf_counter() - start
        result.text = answer_text("".join(parts))
        result.usage_prompt_tokens = len(tokens)
        if conversation:
            self._remember(kwargs["prompt_cache"], tokens + generated)
        return result

    def chat_many(
        self, conversations: Sequence[Messages], max_tokens: int
    ) -> list[tuple[float, StreamResult]]:
        """All conversations at once through mlx-lm's batch generator (batched decode)."""
        from mlx_lm.generate import BatchGenerator

        kwargs = self._generation_kwargs()
        gen = BatchGenerator(
            self.model,
            max_tokens=max_tokens,
            stop_tokens=[[int(t)] for t in self.tokenizer.eos_token_ids],
            sampler=kwargs["sampler"],
            logits_processors=kwargs.get("logits_processors"),
        )
        start = time.perf_counter()
        try:
            prompts = [self._tokens(m) for m in conversations]
            uids = gen.insert(prompts, [max_tokens] * len(prompts))
            results = {
                uid: StreamResult(usage_prompt_tokens=len(p))
                for uid, p in zip(uids, prompts, strict=True)
            }
            while responses := gen.next_generated():
                now = time.perf_counter() - start
                for r in responses:
                    res = results[r.uid]
                    if r.finish_reason != "stop":
                        res.token_times.append(now)
                    if r.finish_reason is not None:
                        res.finish_reason, res.finish_time, res.end_time = r.finish_reason, now, now
        finally:
            gen.close()
        return [(0.0, results[uid]) for uid in uids]

    def chat_join(
        self, streams: Sequence[Messages], max_tokens: int, joiner: Messages, joiner_tokens: int
    ) -> list[tuple[float, StreamResult]]:
        """The join scenario on mlx-lm's own ``BatchGenerator`` (its default prefill chunk):
        what an application embedding mlx-lm gets."""
        from mlx_lm.generate import BatchGenerator

        kwargs = self._generation_kwargs()
        gen = BatchGenerator(
            self.model,
            stop_tokens=[[int(t)] for t in self.tokenizer.eos_token_ids],
            sampler=kwargs["sampler"],
            logits_processors=kwargs.get("logits_processors"),
        )
        start = time.perf_counter()
        results: dict[int, StreamResult] = {}
        offsets: dict[int, float] = {}
        try:
            prompts = [self._tokens(m) for m in streams]
            uids = gen.insert(prompts, [max_tokens] * len(prompts))
            for uid in uids:
                results[uid], offsets[uid] = StreamResult(), 0.0
            joiner_uid: int | None = None
            while responses := gen.next_generated():
                now = time.perf_counter() - start
                for r in responses:
                    res = results[r.uid]
                    t = now - offsets[r.uid]
                    if r.finish_reason != "stop":
                        res.token_times.append(t)
                    if r.finish_reason is not None:
                        res.finish_reason, res.finish_time, res.end_time = r.finish_reason, t, t
                ready = all(len(results[u].token_times) >= JOIN_AFTER_TOKENS for u in uids)
                if joiner_uid is None and (ready or any(results[u].finish_reason for u in uids)):
                    (joiner_uid,) = gen.insert([self._tokens(joiner)], [joiner_tokens])
                    results[joiner_uid] = StreamResult()
                    offsets[joiner_uid] = time.perf_counter() - start
        finally:
            gen.close()
        order = [*uids, joiner_uid] if joiner_uid is not None else uids
        return [(offsets[u], results[u]) for u in order]


def answer_text(text: str) -> str:
    """What a client keeps of raw model output: the answer after any ``</think>``.

    Servers send reasoning apart from content; chat history carries only the content.
    """
    return text.rsplit("</think>", 1)[-1].lstrip() if "</think>" in text else text


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------- spawned servers


class SpawnedServer:
    """A server process this benchmark starts, waits for, and stops (one at a time)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        base_url: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.base_url = base_url
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def launch(self) -> int:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        return self.proc.pid

    def wait_ready(self, timeout: float) -> None:
        """Poll ``/models`` until it answers 200; fail early if the process dies."""
        assert self.proc is not None, "launch() first"
        proc = self.proc

        def failed() -> str | None:
            code = proc.poll()
            return None if code is None else f"exited with {code} before it was ready"

        try:
            wait_until_ready(f"{self.base_url}/models", timeout, failed)
        except NotReady as exc:
            raise BenchError(f"{self.name} {exc}\n{self.tail()}") from None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


def server_env(blas: str | None, base: Mapping[str, str]) -> dict[str, str]:
    """The environment for a spawned server: ours, plus the BLAS this process computes with.

    On Linux CPU this process runs MLX on OpenBLAS (see `server.backend`); a peer server
    started without it would fall back to the reference BLAS and look several times slower
    for a reason that has nothing to do with the server. ``LD_PRELOAD`` gives every spawned
    server the same library.
    """
    env = dict(base)
    if blas:
        env["LD_PRELOAD"] = " ".join(p for p in (blas, env.get("LD_PRELOAD", "")) if p)
    return env


def listening_pid(port: int) -> int | None:
    """The process listening on a local TCP port, when the OS lets us see it."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, PermissionError):
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid
    return None


# --------------------------------------------------------------------------- memory


class MemoryWatch:
    """Peak RSS of a process and its children, sampled in a background thread; MLX's peak too."""

    def __init__(self, pid: int | None, mlx: bool, interval: float = 0.05) -> None:
        self.pid = pid
        self.mlx = mlx
        self.interval = interval
        self.peak_rss: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        assert self.pid is not None
        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        while True:
            try:
                rss = proc.memory_info().rss
                rss += sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                return
            self.peak_rss = max(rss, self.peak_rss or 0)
            if self._stop.wait(self.interval):
                return

    def start(self) -> MemoryWatch:
        if self.mlx:
            import mlx.core as mx

            mx.reset_peak_memory()
        if self.pid is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> tuple[int | None, int | None]:
        """(peak RSS, MLX peak) in bytes, each None when not measurable."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        mlx_peak = None
        if self.mlx:
            import mlx.core as mx

            mlx_peak = int(mx.get_peak_memory())
        return self.peak_rss, mlx_peak
