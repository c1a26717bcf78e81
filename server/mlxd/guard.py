"""Who may call: the Host and Origin checks, CORS, the JSON content type, and API keys.

Pure ASGI middleware in front of every route, so nothing a web page sends reaches a route:

- **Host** (DNS rebinding): a page on ``evil.example`` whose name is re-pointed at 127.0.0.1
  talks to mlxd with ``Host: evil.example``. Allowed are loopback names (``localhost``,
  ``*.localhost``), IP literals (a rebinding attack always uses a name, never an address), the
  bind address, this machine's hostname when bound beyond loopback, and ``--allowed-hosts``.
- **Origin**: browsers send it on cross-origin requests, including "simple" POSTs that need no
  preflight. mlxd serves no pages, so only its own origin and ``--cors-origins`` pass; allowed
  origins get proper CORS answers (preflight included), all others a 403.
- **Content-Type**: a request with a body must be ``application/json`` (415 otherwise): a page
  cannot send that cross-origin without a preflight, which the Origin check then refuses.
- **API keys** (``Authorization: Bearer`` or ``x-api-key``), compared in constant time; 401 in
  the OpenAI error shape. ``/health`` stays open for liveness probes.

The verdict for a request is left in ``scope["mlxd.caller"]`` (:class:`Caller`), for the routes
that decide who may download or unload models.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxd.config import ConfigError
from mlxd.errors import Forbidden, MlxdError, Unauthorized, UnsupportedMediaType, send_error
from mlxd.settings import Settings

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
OPEN_PATHS = frozenset({"/health"})  # liveness probes carry no key
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
CORS_METHODS = "GET, POST, HEAD, OPTIONS, DELETE"
CORS_HEADERS = "authorization, content-type, x-api-key"
EXPOSED_HEADERS = "x-mlxd-model, retry-after"


@dataclass(frozen=True)
class Caller:
    """What the guard found out about a request that it let through."""

    authorized: bool  # presented a configured key (False when no keys are configured)
    browser: bool  # sent an Origin header: a web page, even an allow-listed one
    keys_configured: bool

    @property
    def trusted(self) -> bool:
        """May start model downloads or unloads: a key holder, or a local non-browser client."""
        return self.authorized or (not self.keys_configured and not self.browser)


def caller_of(scope: Scope) -> Caller:
    caller: Caller | None = scope.get("mlxd.caller")
    return caller if caller is not None else Caller(False, False, False)


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def check_exposure(settings: Settings) -> None:
    """Refuse to serve a non-loopback address without keys, unless told ``--insecure-no-auth``."""
    if is_loopback(settings.host) or settings.api_keys or settings.insecure_no_auth:
        return
    raise ConfigError(
        f"refusing to listen on {settings.host} without an API key: anyone who can reach it "
        "could use it. Set --api-key / MLXD_API_KEY / --api-key-file, bind 127.0.0.1, or pass "
        "--insecure-no-auth if another layer authenticates callers."
    )


def split_host(value: str) -> str:
    """``example.com:8080`` → ``example.com``; ``[::1]:8080`` → ``[::1]``."""
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.keys = [key.encode() for key in settings.api_keys]
        hosts = {h.lower() for h in settings.allowed_hosts}
        hosts.add(settings.host.lower())
        if not is_loopback(settings.host):
            name = socket.gethostname().lower()
            hosts |= {name, f"{name}.local"}  # no getfqdn(): it may wait on DNS
        self.any_host = "*" in hosts
        self.hosts = frozenset(hosts)
        origins = {o.rstrip("/").lower() for o in settings.cors_origins}
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        try:
            self._check_host(headers.get("host"))
            allowed_origin = self._check_origin(origin, headers.get("host"), scope)
            if allowed_origin and _is_preflight(scope, headers):
                await self._preflight(send, allowed_origin, headers)
                return
            authorized = self._check_key(scope, headers)
            self._check_content_type(scope, headers)
        except MlxdError as exc:
            cors = _cors_headers(origin) if origin and self._origin_listed(origin) else []
            await send_error(send, exc, cors)
            return
        scope["mlxd.caller"] = Caller(authorized, origin is not None, bool(self.keys))
        if allowed_origin is None:
            await self.app(scope, receive, send)
            return
        cors = _cors_headers(allowed_origin)

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *cors]
            await send(message)

        await self.app(scope, receive, send_with_cors)

    # ---- the checks ---------------------------------------------------------------------

    def _check_host(self, value: str | None) -> None:
        if value is None or self.any_host:
            return  # HTTP/1.0 without Host: not a browser
        host = split_host(value.strip()).lower()
        if is_loopback(host) or _is_ip(host) or host in self.hosts:
            return
        raise Forbidden(
            f"Host {host!r} is not allowed (this protects against DNS rebinding); "
            "add it with --allowed-hosts if this name should reach mlxd",
            param="Host",
        )

    def _origin_listed(self, origin: str) -> bool:
        return self.any_origin or origin.rstrip("/").lower() in self.origins

    def _check_origin(self, origin: str | None, host: str | None, scope: Scope) -> str | None:
        """The origin to answer CORS for (None: not a cross-origin request); 403 if refused."""
        if origin is None:
            return None
        if self._origin_listed(origin):
            return origin
        own = f"{scope.get('scheme', 'http')}://{host}".lower() if host else None
        if own is not None and origin.rstrip("/").lower() == own:
            return None  # same origin: a page mlxd itself served
        raise Forbidden(
            f"cross-origin requests from {origin!r} are not allowed; "
            "start mlxd with --cors-origins to allow a web app",
            param="Origin",
        )

    def _check_key(self, scope: Scope, headers: Headers) -> bool:
        if not self.keys:
            return False
        presented = _presented_key(headers)
        if presented is not None and _matches(presented.encode(), self.keys):
            return True
        if scope["path"] in OPEN_PATHS:
            return False
        if presented is None:
            raise Unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' "
                "or 'x-api-key: KEY'."
            )
        raise Unauthorized("Incorrect API key provided.")

    @staticmethod
    def _check_content_type(scope: Scope, headers: Headers) -> None:
        if scope["method"] not in BODY_METHODS:
            return
        has_body = headers.get("content-length", "0").strip() not in ("", "0") or (
            "transfer-encoding" in headers
        )
        if not has_body:
            return
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media == "application/json" or (
            media.startswith("application/") and media.endswith("+json")
        ):
            return
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {media or 'none'!r}",
            param="Content-Type",
        )

    async def _preflight(self, send: Send, origin: str, headers: Headers) -> None:
        asked = headers.get("access-control-request-headers", "")
        allow = asked if _is_token_list(asked) else CORS_HEADERS
        out = [
            *_cors_headers(origin),
            (b"access-control-allow-methods", CORS_METHODS.encode()),
            (b"access-control-allow-headers", (allow or CORS_HEADERS).encode()),
            (b"access-control-max-age", b"600"),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": out})
        await send({"type": "http.response.body", "body": b""})


def _is_preflight(scope: Scope, headers: Headers) -> bool:
    return scope["method"] == "OPTIONS" and "access-control-request-method" in headers


def _is_token_list(value: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_, ")
    return len(value) <= 1024 and set(value) <= allowed


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"access-control-allow-origin", origin.encode("latin-1", "replace")),
        (b"access-control-expose-headers", EXPOSED_HEADERS.encode()),
        (b"vary", b"Origin"),
    ]


def _presented_key(headers: Headers) -> str | None:
    auth = headers.get("authorization")
    if auth is not None and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key")


def _matches(presented: bytes, keys: Iterable[bytes]) -> bool:
    """Compare against every key in constant time (no early exit on the first match)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found
