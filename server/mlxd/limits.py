"""How much one client may ask for: body size and pace, requests in flight, log volume, files.

- :class:`RequestLimits` (ASGI): headers over ``max_header_bytes`` are a 431 (h11's own limit
  only applies while a head is incomplete, so a big head in one packet passed); a declared
  ``Content-Length`` over the limit is a 413 before any byte is read; a chunked body is counted
  while it streams in and refused as soon as it passes the limit (never read whole first).
  Silence longer than the body timeout between two chunks is a 408, and a request with both
  ``Content-Length`` and ``Transfer-Encoding`` (request smuggling, and a hang in h11) is a 400.
- :class:`InflightLimit`: chat requests running or waiting, beyond which a request gets
  503 + ``Retry-After`` instead of piling up in the engine's job queue.
- :class:`RateLimitFilter`: one log line per distinct warning or error per interval, so a flood of
  identical failures (accept() out of file descriptors, bad requests) cannot fill the disk.
- :func:`raise_open_file_limit`, :func:`connection_cap`, :func:`listen_backlog`: the soft
  RLIMIT_NOFILE raised to the hard limit at start, a connection cap below it that leaves room for
  model files and logs, and a listen backlog that fits in what is left.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxd.errors import (
    BadRequest,
    HeadersTooLarge,
    MlxdError,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    send_error,
)

FILES_RESERVED = 128  # descriptors kept back from connections: weights, tokenizer, logs, pipes
MAX_DEFAULT_CONNECTIONS = 4096


def _size(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n} bytes"


class RequestLimits:
    def __init__(
        self, app: ASGIApp, max_bytes: int, timeout: float, max_header_bytes: int = 64 << 10
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        try:
            size = sum(len(k) + len(v) for k, v in scope["headers"])
            if size > self.max_header_bytes:
                raise HeadersTooLarge(
                    f"the request headers are {size} bytes, more than the limit of "
                    f"{_size(self.max_header_bytes)}"
                )
            if declared is not None and "transfer-encoding" in headers:
                raise BadRequest(
                    "a request must not carry both Content-Length and Transfer-Encoding",
                    param="Content-Length",
                    headers={"Connection": "close"},
                )
            if declared and declared.strip().isdigit() and int(declared) > self.max_bytes:
                raise self._too_large()
        except MlxdError as exc:
            await send_error(send, exc)
            return
        received = 0
        complete = False

        async def limited() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()  # after the body: only http.disconnect, no deadline
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                raise RequestTimeout(
                    f"the request body stalled for more than {self.timeout:g} s"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is larger than the limit of {_size(self.max_bytes)} "
            "(--max-body-size)"
        )


class InflightLimit:
    """At most ``capacity`` requests running or queued; the next ones are refused (503)."""

    def __init__(self, capacity: int, retry_after: int = 5) -> None:
        self.capacity = capacity
        self.retry_after = retry_after
        self.count = 0

    def enter(self) -> Slot:
        if self.count >= self.capacity:
            raise Overloaded(
                f"the server is busy ({self.count} requests running or queued, the limit is "
                f"{self.capacity}); retry shortly",
                retry_after=self.retry_after,
            )
        self.count += 1
        return Slot(self)


class Slot:
    """One request's place in an :class:`InflightLimit`; ``release`` may be called twice."""

    def __init__(self, limit: InflightLimit) -> None:
        self._limit: InflightLimit | None = limit

    def release(self) -> None:
        if self._limit is not None:
            self._limit.count -= 1
            self._limit = None


class RateLimitFilter(logging.Filter):
    """Lets through one record per (logger, level, message template, exception type) per
    ``interval``; the next one that passes says how many were dropped. INFO and below pass."""

    def __init__(self, interval: float = 10.0, min_level: int = logging.WARNING) -> None:
        super().__init__()
        self.interval = interval
        self.min_level = min_level
        self._seen: dict[tuple[str, int, str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return True
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, record.levelno, str(record.msg), exc)
        now = time.monotonic()
        last, dropped = self._seen.get(key, (None, 0))
        if last is not None and now - last < self.interval:
            self._seen[key] = (last, dropped + 1)
            return False
        if len(self._seen) > 1000:  # bounded: forget old keys rather than grow
            self._seen.clear()
        self._seen[key] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} [{dropped} more like this in the last {self.interval:g} s]"
        return True


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit as far as the hard limit allows; returns the soft limit.

    mlx_lm.utils calls ``setrlimit(RLIMIT_NOFILE, (2048, 4096))`` when imported: that lowers a
    higher soft limit back to 2048 (the limit the issue's idle sockets hit), lowers the hard
    limit, and raises ValueError where the hard limit is below 4096. So it is imported first,
    with that call disabled, and the limit is set here once.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return 1024
    setrlimit = resource.setrlimit
    resource.setrlimit = lambda *_: None
    try:
        import mlx_lm.utils  # noqa: F401
    finally:
        resource.setrlimit = setrlimit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if sys.platform == "darwin":
        target = min(target, 10240)  # OPEN_MAX: setrlimit refuses more on macOS
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return int(soft)


def connection_cap(soft_limit: int, requested: int | None) -> int:
    """Connections allowed at once: below the open-file limit, with room for everything else."""
    room = max(8, soft_limit - FILES_RESERVED)
    if requested is not None:
        return max(1, min(requested, room))
    return min(room, MAX_DEFAULT_CONNECTIONS)


def listen_backlog(soft_limit: int, connections: int) -> int:
    """The listen backlog: asyncio accepts up to this many sockets in one go before any of them
    is looked at (so before the connection cap can close one), so it must fit in what the
    connections leave of the open-file limit."""
    return max(16, min(2048, soft_limit - connections - 64))
