"""The HTTP listener: uvicorn with a header deadline, a connection cap, and a draining shutdown.

uvicorn has no deadline for a request's headers, so a client sending one byte every few seconds
(slowloris) holds a socket forever, and enough of them exhaust the open-file limit. Here each
connection must deliver a complete request head within ``header_timeout`` (again after every
response on a kept-alive connection), and past ``max_connections`` a new connection evicts the
oldest one still waiting for its headers (or is closed itself if none is).

SIGTERM: uvicorn stops accepting and waits; :class:`DrainingServer` lets running requests finish
for ``drain_timeout`` seconds, then calls ``on_drain_timeout`` (which ends them with a final
chunk and ``[DONE]``); uvicorn's own deadline, a little later, is only the backstop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mlxd.settings import Settings

log = logging.getLogger("mlxd.listener")

SHUTDOWN_BACKSTOP = 10.0  # seconds uvicorn waits beyond the drain timeout before cancelling


class GuardedH11Protocol(H11Protocol):
    """h11 connection with a request-head deadline; configured by :func:`protocol_class`."""

    header_timeout: float = 10.0
    max_connections: int = 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.opened = time.monotonic()
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.waiting_for_head():
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request on this connection gets its own deadline

    def waiting_for_head(self) -> bool:
        """No request is being served and the next one's head is not complete."""
        busy = self.cycle is not None and not self.cycle.response_complete
        return not busy and self.conn.their_state is h11.IDLE

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.waiting_for_head() and not self.transport.is_closing():
            self.transport.close()

    def _make_room(self) -> None:
        idle = [
            c
            for c in self.connections
            if c is not self and isinstance(c, GuardedH11Protocol) and c.waiting_for_head()
        ]
        victim = min(idle, key=lambda c: c.opened) if idle else self
        log.warning(
            "connection limit (%d) reached: closing %s", self.max_connections,
            "the oldest idle connection" if victim is not self else "a new connection",
        )  # fmt: skip
        victim.transport.close()
        self.connections.discard(victim)  # now, not when connection_lost runs on a later tick


def protocol_class(header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    return type(
        "MlxdH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        drain_timeout: float,
        on_drain_start: Callable[[], None],
        on_drain_timeout: Callable[[], None],
    ) -> None:
        super().__init__(config)
        # sse-starlette would cut every stream the moment SIGTERM arrives; streams end here,
        # with a final chunk and [DONE], when they finish or the drain timeout ends them.
        from sse_starlette.sse import AppStatus

        AppStatus.disable_automatic_graceful_drain()
        self.drain_timeout = drain_timeout
        self.on_drain_start = on_drain_start
        self.on_drain_timeout = on_drain_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log.info("shutting down: running requests have %.0f s to finish", self.drain_timeout)
        self.on_drain_start()
        timer = asyncio.get_running_loop().call_later(self.drain_timeout, self.on_drain_timeout)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def config(
    app: Any, settings: Settings, *, log_level: str, max_connections: int, backlog: int
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        backlog=backlog,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        log_config=None,  # mlxd's handler (rate-limited) formats uvicorn's records too
        http=protocol_class(settings.header_timeout, max_connections),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        limit_concurrency=max_connections + 1,  # the cap itself is enforced above
        timeout_graceful_shutdown=int(settings.drain_timeout + SHUTDOWN_BACKSTOP),
    )
