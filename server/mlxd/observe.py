"""What one finished request looked like, for the request log, /metrics and the status page.

A request is summarised once, when it ends (``ChatRun`` builds a :class:`RequestRecord`), and
every consumer reads that one record, so the log line, the Prometheus counters and the page can
never disagree. Which API a request came through (OpenAI, Anthropic, Ollama…) is known from its
path; the HTTP middleware in :mod:`server.metrics` puts it in :data:`current_api` for the
duration of the request so the chat service does not need to be told.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field

current_api: contextvars.ContextVar[str] = contextvars.ContextVar("mlxd_api", default="openai")

# Path prefixes of the APIs mlxd speaks, most specific first.
_API_PREFIXES = (
    ("/v1/messages", "anthropic"),
    ("/api/", "ollama"),
    ("/v1/", "openai"),
)


def api_of(path: str) -> str:
    """The API family a request path belongs to: ``openai``, ``anthropic``, ``ollama`` or
    ``mlxd`` (the server's own routes: /health, /metrics, the status page)."""
    for prefix, api in _API_PREFIXES:
        if path.startswith(prefix):
            return api
    return "mlxd"


@dataclass(frozen=True)
class RequestRecord:
    """One finished generation request (completed, cut off, cancelled or failed)."""

    id: str
    api: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float | None  # request admitted → first token; None when none came
    decode_tok_s: float  # completion tokens after the first, per second
    inter_token_s: float | None  # mean gap between output tokens; None with < 2 tokens
    duration_s: float
    finish: str  # stop | length | tool_calls | cancelled (client gone) | error
    client: str = "-"  # address:port of the caller
    cause: str | None = None  # why it was ended early: client_disconnected, shutdown, …
    at: float = field(default_factory=time.time)

    @classmethod
    def measure(
        cls,
        *,
        id: str,
        model: str,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        started: float,
        first_token: float | None,
        end: float,
        finish: str,
        client: str = "-",
        cause: str | None = None,
    ) -> RequestRecord:
        """A record from ``time.perf_counter()`` readings taken while the request ran."""
        ttft = first_token - started if first_token is not None else None
        decode = end - first_token if first_token is not None else 0.0
        gaps = completion_tokens - 1
        return cls(
            id=id,
            api=current_api.get(),
            model=model,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            completion_tokens=completion_tokens,
            ttft_s=ttft,
            decode_tok_s=gaps / decode if gaps > 0 and decode > 0 else 0.0,
            inter_token_s=decode / gaps if gaps > 0 else None,
            duration_s=end - started,
            finish=finish,
            client=client,
            cause=cause,
        )

    def to_log(self) -> dict[str, object]:
        """The fields of a JSON request log line (milliseconds and rates rounded for people)."""
        return {
            "id": self.id,
            "api": self.api,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": round(self.ttft_s * 1000, 1) if self.ttft_s is not None else None,
            "tok_s": round(self.decode_tok_s, 2),
            "duration_ms": round(self.duration_s * 1000, 1),
            "finish": self.finish,
            "client": self.client,
            "cancel_reason": self.cause,
        }
