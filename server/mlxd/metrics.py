"""Prometheus metrics for ``GET /metrics`` (text exposition format, prometheus-client).

Two kinds, each fed from one place:

- **Events**, counted as they happen: every HTTP request once, when its response ends
  (:class:`MetricsMiddleware`: API, endpoint template, status), and every generation once, when it
  finishes (:meth:`Metrics.observe_request`, fed the :class:`~server.observe.RequestRecord` the
  chat service builds for its log line): TTFT, inter-token latency, tokens, prefix-cache reuse,
  finish reasons.
- **State**, read from the running server at scrape time by :class:`StateCollector` (queue,
  running requests, memory budget and use, pressure, swaps, load time, estimate error), so a
  gauge can never drift from what ``/health`` reports.

The registry is per app (no process-global default registry), so several apps in one process
(tests) never share counters.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mlxd import __version__
from mlxd.memory.pressure import PressureLevel
from mlxd.observe import RequestRecord, api_of, current_api

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from mlxd.state import AppState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RECENT_REQUESTS = 50  # kept for the status page

# Local models answer their first token in tens of ms (warm, short prompt) to minutes (cold
# load, long prompt); decode gaps range from ~2 ms (small model on a GPU) to ~1 s.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
INTER_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_PRESSURE_VALUE = {PressureLevel.GREEN: 0, PressureLevel.YELLOW: 1, PressureLevel.RED: 2}


class Metrics:
    """The app's metric registry, the per-request observations and the recent requests."""

    def __init__(self, state: AppState) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "mlxd_http_requests", "HTTP requests by API, endpoint and status code",
            ["api", "endpoint", "status"], registry=r,
        )  # fmt: skip
        self.http_duration = Histogram(
            "mlxd_http_request_duration_seconds",
            "Time from request to the end of the response (a whole stream for SSE)",
            ["api", "endpoint"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        labels = ["api", "model"]
        self.generations = Counter(
            "mlxd_generations", "Finished generations by finish reason "
            "(stop, length, tool_calls; cancelled = the client went away; error)",
            [*labels, "finish"], registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "mlxd_time_to_first_token_seconds",
            "Time from admission (model resident) to the first generated token",
            labels, buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token = Histogram(
            "mlxd_inter_token_latency_seconds",
            "Mean gap between output tokens after the first, one observation per request",
            labels, buckets=INTER_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "mlxd_prompt_tokens", "Prompt tokens of finished requests", labels, registry=r
        )
        self.completion_tokens = Counter(
            "mlxd_completion_tokens", "Generated tokens of finished requests", labels, registry=r
        )
        self.prefix_hits = Counter(
            "mlxd_prefix_cache_hits", "Requests that reused a cached prompt prefix", ["model"],
            registry=r,
        )  # fmt: skip
        self.prefix_reused = Counter(
            "mlxd_prefix_cache_reused_tokens",
            "Prompt tokens served from the prefix cache instead of being prefilled", ["model"],
            registry=r,
        )  # fmt: skip
        r.register(StateCollector(state))
        self.recent: deque[RequestRecord] = deque(maxlen=RECENT_REQUESTS)

    def observe_request(self, record: RequestRecord) -> None:
        """The one place a finished generation is counted."""
        api, model = record.api, record.model
        self.generations.labels(api, model, record.finish).inc()
        self.prompt_tokens.labels(api, model).inc(record.prompt_tokens)
        self.completion_tokens.labels(api, model).inc(record.completion_tokens)
        if record.ttft_s is not None:
            self.ttft.labels(api, model).observe(record.ttft_s)
        if record.inter_token_s is not None:
            self.inter_token.labels(api, model).observe(record.inter_token_s)
        if record.cached_tokens:
            self.prefix_hits.labels(model).inc()
            self.prefix_reused.labels(model).inc(record.cached_tokens)
        self.recent.append(record)

    def observe_http(self, api: str, endpoint: str, status: int, seconds: float) -> None:
        self.http_requests.labels(api, endpoint, str(status)).inc()
        self.http_duration.labels(api, endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StateCollector(Collector):
    """Gauges (and the server's own counters) read from the running server at scrape time."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def describe(self) -> list[Metric]:
        return []  # families depend on the configuration; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        s = self.state
        manager, gate = s.manager, s.gate
        yield _gauge("mlxd_build_info", "mlxd version", 1, version=__version__)
        yield _gauge("mlxd_queue_depth", "Requests waiting for admission", manager.queue_depth)
        yield _gauge("mlxd_requests_running", "Requests admitted and not finished", manager.active)
        batch = s.engine.stats().get("batch_size")
        yield _gauge(
            "mlxd_batch_size",
            "Sequences the engine decodes together (the engine generates one at a time "
            "unless it reports a batch)",
            batch if batch is not None else min(1, len(s.chat.running)),
        )
        reading, snap = gate.last_reading, gate.last_snapshot
        memory = {
            "budget": ("Memory budget mlxd plans within", gate.budget.limit),
            "in_use": ("mlxd's share of the budget in use (measured)", reading.in_use),
            "reserved": ("Memory reserved by running sequences", manager.residency.reserved),
            "prefix_cache": ("KV cache kept for prefix reuse", gate.prefix_cache_bytes()),
            "weights": ("Weights of the resident model", manager.residency.weights),
            "available": ("Memory the OS can hand out now", snap.available),
            "total": ("Total memory (the cgroup limit inside a container)", snap.total),
            "swap_growth": ("Swap used beyond what was in use at start", reading.swap_growth),
        }
        for name, (doc, value) in memory.items():
            yield _gauge(f"mlxd_memory_{name}_bytes", doc, value)
        level = PressureLevel.RED if gate.paused_by_pressure else reading.level
        yield _gauge(
            "mlxd_memory_pressure_level", "Memory pressure: 0 green, 1 yellow, 2 red",
            _PRESSURE_VALUE[level],
        )  # fmt: skip
        yield _gauge(
            "mlxd_admission_paused", "1 while red pressure pauses admission",
            int(gate.paused_by_pressure),
        )  # fmt: skip
        yield _counter("mlxd_model_swaps", "Models loaded since start", manager.swaps)
        yield _counter(
            "mlxd_prefix_cache_evictions", "Prefix-cache evictions to make room", gate.evictions
        )
        states = GaugeMetricFamily(
            "mlxd_model_state", "1 for each configured model's current state",
            labels=["model", "state"],
        )  # fmt: skip
        for entry in s.registry.entries:
            states.add_metric([entry.id, manager.state_of(entry).value], 1)
        yield states
        resident, loaded = manager.resident, manager.loaded
        if resident is not None and loaded is not None:
            yield _gauge(
                "mlxd_model_load_seconds", "How long the resident model took to load",
                loaded.load_seconds, model=resident.id,
            )  # fmt: skip
            estimate = gate.profiles.get(resident.id)
            if estimate is not None and loaded.active_bytes > 0:
                yield _gauge(
                    "mlxd_weights_estimate_error_ratio",
                    "(estimated − measured) / measured weight memory of the resident model "
                    "(estimate from safetensors headers, measured by MLX after loading)",
                    (estimate.weights - loaded.active_bytes) / loaded.active_bytes,
                    model=resident.id,
                )  # fmt: skip


def _gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class MetricsMiddleware:
    """Counts every HTTP request once, when its response has been sent (streams included).

    The endpoint label is the route's template (``/v1/models/{model_id:path}``), never the raw
    path, so unknown paths (404s) cannot grow the label set; they count as ``other``. Sets
    :data:`server.observe.current_api` while the request runs.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = api_of(scope["path"])
        token = current_api.set(api)
        status = 500
        started = time.perf_counter()

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            current_api.reset(token)
            route: Any = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.observe_http(api, endpoint, status, time.perf_counter() - started)
