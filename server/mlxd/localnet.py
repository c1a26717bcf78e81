"""Loopback helpers for starting servers: a free port, and waiting until one answers.

Shared by the benchmark (spawned targets) and the tests (spawned and in-thread servers).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NotReady(RuntimeError):
    """The server died or did not answer in time; the message says which."""


def wait_until_ready(
    url: str, timeout: float, failed: Callable[[], str | None], interval: float = 0.1
) -> None:
    """Poll ``url`` until it answers 200.

    ``failed()`` is asked between polls: a message (the process exited, the thread died) ends
    the wait at once with that message.
    """
    deadline = time.monotonic() + timeout
    while True:
        if (why := failed()) is not None:
            raise NotReady(why)
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise NotReady(f"no answer from {url} after {timeout:.0f} s")
        time.sleep(interval)
