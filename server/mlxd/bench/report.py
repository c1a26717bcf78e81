"""Benchmark records, the statistics drawn from them, and the files a run writes.

Everything here is pure data and arithmetic (no MLX, no HTTP), so the numbers a report shows
can be checked on synthetic timings.

A run produces three kinds of raw rows and one derived kind, all in ``results.jsonl``:

* ``meta``: one row, what ran where (machine, backend, versions, model shape, command line);
* ``request``: one row per request: its target, scenario, parameter, repeat and the arrival
  time of every token-carrying stream event, relative to when the request was sent;
* ``memory``: one row per (target, scenario): peak process RSS and, in process, MLX's peak;
* ``metric``: the summary numbers the table and the plot show, one per (target, scenario,
  parameter, metric), each the median over repeats;
* ``error``: a target that could not be measured, with the reason.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
BASELINE = "in-process"

# Scenario order in tables and plots.
SCENARIOS = ("startup", "cold", "warm", "decode", "prefill", "chat", "concurrency", "join")

JOINER = -1  # ``RequestRecord.stream`` of the long prompt that joins running streams


@dataclass(frozen=True)
class MetricSpec:
    label: str
    unit: str
    better: str | None  # "higher", "lower", or None when a ratio means nothing (a count)


METRICS: dict[str, MetricSpec] = {
    "startup_s": MetricSpec("startup (load until ready)", "s", "lower"),
    "ttft_ms": MetricSpec("TTFT", "ms", "lower"),
    "since_launch_s": MetricSpec("first token since launch (startup + cold TTFT)", "s", "lower"),
    "prefill_tps": MetricSpec("prefill (prompt tokens / TTFT)", "tok/s", "higher"),
    "decode_tps": MetricSpec("decode", "tok/s", "higher"),
    "itl_p50_ms": MetricSpec("inter-token p50", "ms", "lower"),
    "itl_p95_ms": MetricSpec("inter-token p95", "ms", "lower"),
    "itl_max_ms": MetricSpec("inter-token max", "ms", "lower"),
    "aggregate_tps": MetricSpec("aggregate output (all tokens / wall time)", "tok/s", "higher"),
    "per_stream_tps": MetricSpec("per-stream decode", "tok/s", "higher"),
    "ttft_p95_ms": MetricSpec("TTFT p95 over the streams", "ms", "lower"),
    "itl_p95_idle_ms": MetricSpec(
        "running streams' inter-token p95 before the join", "ms", "lower"
    ),
    "itl_p95_join_ms": MetricSpec(
        "running streams' inter-token p95 while the prompt joins", "ms", "lower"
    ),
    "join_itl_ratio": MetricSpec("joining ÷ before (inter-token p95)", "×", "lower"),
    "join_ttft_ms": MetricSpec("TTFT of the joining prompt", "ms", "lower"),
    "prompt_tokens": MetricSpec("prompt tokens", "tok", None),
    "completion_tokens": MetricSpec("completion tokens", "tok", None),
    "cached_tokens": MetricSpec("cached prompt tokens (server-reported)", "tok", None),
    "peak_rss_mib": MetricSpec("peak RSS", "MiB", "lower"),
    "mlx_peak_mib": MetricSpec("MLX peak memory", "MiB", "lower"),
}
MEMORY_METRICS = ("peak_rss_mib", "mlx_peak_mib")


# --------------------------------------------------------------------------- records


@dataclass
class StreamResult:
    """What one streamed completion looked like from the client's side.

    Times are seconds since the request was sent. ``token_times`` has one entry per
    token-carrying event (a delta with content, reasoning or tool-call text); ``finish_time``
    is when the event carrying ``finish_reason`` arrived.
    """

    token_times: list[float] = field(default_factory=list)
    end_time: float = 0.0
    finish_time: float | None = None
    finish_reason: str | None = None
    text: str = ""  # the answer (content, no reasoning), as a client would keep it
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    cached_tokens: int | None = None

    @property
    def ttft(self) -> float | None:
        """Time to the first token, or to the finish event when no token came at all."""
        if self.token_times:
            return self.token_times[0]
        return self.finish_time

    @property
    def completion_tokens(self) -> int:
        """Tokens generated: the server's own count when it reported one, else the events."""
        if self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return len(self.token_times)

    @property
    def decode_tps(self) -> float | None:
        """(tokens − 1) / (last token time − first token time): decode speed without prefill."""
        return decode_rate(self.completion_tokens, self.token_times)

    @property
    def inter_token_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass
class RequestRecord:
    target: str
    scenario: str
    param: int | None  # prompt length (prefill), turn (chat), streams (concurrency)
    repeat: int
    prompt_tokens: int  # as the bench renders the prompt with the model's chat template
    result: StreamResult
    stream: int = 0  # index within a concurrent group
    start_offset: float = 0.0  # seconds after the concurrent group started

    def to_row(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k != "result"}
        row.update(asdict(self.result))
        row.pop("text")
        row["kind"] = "request"
        row["ttft_s"] = self.result.ttft
        row["completion_tokens"] = self.result.completion_tokens
        return row


@dataclass(frozen=True)
class MemoryRecord:
    target: str
    scenario: str
    peak_rss_bytes: int | None
    mlx_peak_bytes: int | None

    def to_row(self) -> dict[str, Any]:
        return {"kind": "memory", **asdict(self)}


@dataclass(frozen=True)
class Metric:
    target: str
    scenario: str
    param: int | None
    name: str
    value: float

    def to_row(self) -> dict[str, Any]:
        spec = METRICS[self.name]
        return {"kind": "metric", **asdict(self), "unit": spec.unit, "better": spec.better}


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def decode_rate(tokens: int, token_times: Sequence[float]) -> float | None:
    """Tokens per second after the first token; None when fewer than two tokens arrived apart."""
    if tokens < 2 or len(token_times) < 2:
        return None
    span = token_times[-1] - token_times[0]
    if span <= 0:
        return None
    return (tokens - 1) / span


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, or None when either is missing or the base is zero."""
    if value is None or base is None or base == 0:
        return None
    return value / base


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _single(records: Sequence[RequestRecord]) -> dict[str, float | None]:
    """Metrics of sequential requests: medians over repeats, inter-token gaps pooled."""
    results = [r.result for r in records]
    gaps = [g for res in results for g in res.inter_token_s]
    out: dict[str, float | None] = {
        "ttft_ms": _ms(_median(res.ttft for res in results)),
        "decode_tps": _median(res.decode_tps for res in results),
        "prompt_tokens": _median(r.prompt_tokens for r in records),
        "completion_tokens": _median(res.completion_tokens for res in results),
        "cached_tokens": _median(res.cached_tokens for res in results),
    }
    if gaps:
        out["itl_p50_ms"] = percentile(gaps, 50) * 1000
        out["itl_p95_ms"] = percentile(gaps, 95) * 1000
        out["itl_max_ms"] = max(gaps) * 1000
    rates = [r.prompt_tokens / ttft for r in records if (ttft := r.result.ttft)]
    out["prefill_tps"] = _median(rates)
    return out


def _concurrent(records: Sequence[RequestRecord]) -> dict[str, float | None]:
    """Metrics of concurrent groups: per group, then the median over repeats."""
    groups: dict[int, list[RequestRecord]] = defaultdict(list)
    for r in records:
        groups[r.repeat].append(r)
    aggregate, per_stream, ttft, ttft_p95 = [], [], [], []
    for group in groups.values():
        start = min(r.start_offset for r in group)
        end = max(r.start_offset + r.result.end_time for r in group)
        tokens = sum(r.result.completion_tokens for r in group)
        if end > start:
            aggregate.append(tokens / (end - start))
        per_stream.append(_median(r.result.decode_tps for r in group))
        ttft.append(_median(r.result.ttft for r in group))
        firsts = [r.start_offset + t for r in group if (t := r.result.ttft) is not None]
        if firsts:  # from the group's start, so a stream that waited its turn counts in full
            ttft_p95.append(percentile(firsts, 95) - start)
    return {
        "aggregate_tps": _median(aggregate),
        "per_stream_tps": _median(per_stream),
        "ttft_ms": _ms(_median(ttft)),
        "ttft_p95_ms": _ms(_median(ttft_p95)),
        "completion_tokens": _median(r.result.completion_tokens for r in records),
    }


def _join(records: Sequence[RequestRecord]) -> dict[str, float | None]:
    """Inter-token gaps of the running streams before the long prompt was sent, and while it
    was being prefilled (a gap counts when it overlaps [sent, its first token])."""
    groups: dict[int, list[RequestRecord]] = defaultdict(list)
    for r in records:
        groups[r.repeat].append(r)
    idle_p95, join_p95, join_ttft = [], [], []
    for group in groups.values():
        joiners = [r for r in group if r.stream == JOINER]
        if not joiners or joiners[0].result.ttft is None:
            continue
        joiner = joiners[0]
        sent = joiner.start_offset
        first = sent + (joiner.result.ttft or 0.0)
        idle: list[float] = []
        during: list[float] = []
        for r in group:
            if r.stream == JOINER:
                continue
            times = [r.start_offset + t for t in r.result.token_times]
            for a, b in itertools.pairwise(times):
                if b <= sent:
                    idle.append(b - a)
                elif a < first:
                    during.append(b - a)
        if idle and during:
            idle_p95.append(percentile(idle, 95))
            join_p95.append(percentile(during, 95))
        join_ttft.append(first - sent)
    idle_v, join_v = _median(idle_p95), _median(join_p95)
    return {
        "itl_p95_idle_ms": _ms(idle_v),
        "itl_p95_join_ms": _ms(join_v),
        "join_itl_ratio": join_v / idle_v if idle_v and join_v is not None else None,
        "join_ttft_ms": _ms(_median(join_ttft)),
    }


# Which metrics each scenario reports (the rest of what _single computes is noise there).
_SCENARIO_METRICS: dict[str, tuple[str, ...]] = {
    "cold": ("ttft_ms",),
    "warm": ("ttft_ms",),
    "decode": ("decode_tps", "itl_p50_ms", "itl_p95_ms", "itl_max_ms", "completion_tokens"),
    "prefill": ("ttft_ms", "prefill_tps"),
    "chat": ("ttft_ms", "prompt_tokens", "cached_tokens", "completion_tokens"),
    "concurrency": (
        "aggregate_tps",
        "per_stream_tps",
        "ttft_ms",
        "ttft_p95_ms",
        "completion_tokens",
    ),
    "join": ("itl_p95_idle_ms", "itl_p95_join_ms", "join_itl_ratio", "join_ttft_ms"),
}


def summarize(
    records: Sequence[RequestRecord],
    memory: Sequence[MemoryRecord] = (),
    startup: Mapping[str, float] | None = None,
) -> list[Metric]:
    """The summary metrics of a run, in report order."""
    groups: dict[tuple[str, str, int | None], list[RequestRecord]] = defaultdict(list)
    for rec in records:
        groups[(rec.target, rec.scenario, rec.param)].append(rec)
    metrics: list[Metric] = []
    for target, seconds in (startup or {}).items():
        metrics.append(Metric(target, "startup", None, "startup_s", seconds))
    for (target, scenario, param), recs in groups.items():
        wanted = _SCENARIO_METRICS.get(scenario)
        if wanted is None:
            raise ValueError(f"unknown scenario {scenario!r}")
        summary = {"concurrency": _concurrent, "join": _join}.get(scenario, _single)
        values = summary(recs)
        for name in wanted:
            value = values.get(name)
            if value is not None:
                metrics.append(Metric(target, scenario, param, name, float(value)))
    for target, seconds in (startup or {}).items():
        cold = [m for m in metrics if (m.target, m.scenario, m.name) == (target, "cold", "ttft_ms")]
        if cold:
            since = seconds + cold[0].value / 1000
            metrics.append(Metric(target, "cold", None, "since_launch_s", since))
    for mem in memory:
        for name, raw in (
            ("peak_rss_mib", mem.peak_rss_bytes),
            ("mlx_peak_mib", mem.mlx_peak_bytes),
        ):
            if raw is not None:
                metrics.append(Metric(mem.target, mem.scenario, None, name, raw / 2**20))
    return sorted(metrics, key=_sort_key)


def _sort_key(m: Metric) -> tuple[int, int, int, str]:
    scenario = SCENARIOS.index(m.scenario) if m.scenario in SCENARIOS else len(SCENARIOS)
    return (scenario, -1 if m.param is None else m.param, list(METRICS).index(m.name), m.target)


# --------------------------------------------------------------------------- markdown


def fmt_number(value: float | None) -> str:
    if value is None:
        return "—"
    magnitude = abs(value)
    if value.is_integer() and magnitude < 1e6:
        return f"{int(value):,}"
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def scenario_label(scenario: str, param: int | None) -> str:
    if param is None:
        return scenario
    if scenario == "prefill":
        return f"prefill {param} tok"
    if scenario == "chat":
        return f"chat turn {param}"
    if scenario == "concurrency":
        return f"{param} stream{'s' if param != 1 else ''}"
    if scenario == "join":
        return f"join {param} tok"
    return f"{scenario} {param}"


def render_table(metrics: Sequence[Metric], targets: Sequence[str], memory: bool = False) -> str:
    """One markdown table: a row per (scenario, param, metric), a column per target.

    When the in-process baseline is among the targets, every other target gets a ratio column
    (target / in-process); whether higher or lower is better is in the ``better`` column.
    """
    values: dict[tuple[str, int | None, str], dict[str, float]] = defaultdict(dict)
    for m in metrics:
        if (m.name in MEMORY_METRICS) == memory:
            values[(m.scenario, m.param, m.name)][m.target] = m.value
    has_base = BASELINE in targets
    header = ["scenario", "metric", "unit", "better"]
    for t in targets:
        header.append(t)
        if has_base and t != BASELINE:
            header.append(f"{t} ÷ {BASELINE}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    seen: list[tuple[str, int | None, str]] = []
    for m in metrics:
        key = (m.scenario, m.param, m.name)
        if key in values and key not in seen:
            seen.append(key)
    for key in seen:
        scenario, param, name = key
        spec = METRICS[name]
        arrow = {"higher": "↑", "lower": "↓"}.get(spec.better or "", "")
        row = [scenario_label(scenario, param), spec.label, spec.unit, arrow]
        base = values[key].get(BASELINE)
        for t in targets:
            row.append(fmt_number(values[key].get(t)))
            if has_base and t != BASELINE:
                r = ratio(values[key].get(t), base) if spec.better else None
                row.append(fmt_ratio(r))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(
    metrics: Sequence[Metric],
    targets: Sequence[str],
    meta: Mapping[str, Any],
    errors: Mapping[str, str] | None = None,
) -> str:
    """The whole results.md: what ran where, then latency/throughput, then memory."""
    model = meta.get("model", {})
    parts = [f"# mlxd benchmark: {model.get('name', '?')}", ""]
    parts += [f"- {key}: {value}" for key, value in _meta_lines(meta)]
    parts += [
        "",
        "Greedy decoding, one request at a time unless the scenario says streams. Values are",
        "medians over repeats; ratios are target ÷ in-process (↑: higher is better, ↓: lower is",
        "better). TTFT is measured from sending the request to the first token's arrival.",
        "",
        "## Latency and throughput",
        "",
        render_table(metrics, targets),
        "## Memory (peak during each scenario)",
        "",
        render_table(metrics, targets, memory=True),
    ]
    if errors:
        parts += ["## Targets that failed", ""]
        parts += [f"- {name}: {message}" for name, message in errors.items()]
        parts.append("")
    return "\n".join(parts)


def _meta_lines(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    keys = ("date", "machine", "backend", "spawned_servers_preload", "versions", "model")
    for key in (*keys, "targets", "plan", "command"):
        if key not in meta:
            continue
        value = meta[key]
        if isinstance(value, Mapping):
            text = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None)
        else:
            text = str(value)
        lines.append((key, text))
    return lines


# --------------------------------------------------------------------------- files


def write_jsonl(
    path: Path,
    meta: Mapping[str, Any],
    records: Sequence[RequestRecord],
    memory: Sequence[MemoryRecord],
    metrics: Sequence[Metric],
    errors: Mapping[str, str] | None = None,
) -> None:
    rows: list[dict[str, Any]] = [{"kind": "meta", "schema": SCHEMA_VERSION, **meta}]
    rows += [r.to_row() for r in records]
    rows += [m.to_row() for m in memory]
    rows += [m.to_row() for m in metrics]
    rows += [{"kind": "error", "target": t, "message": msg} for t, msg in (errors or {}).items()]
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def plot(metrics: Sequence[Metric], targets: Sequence[str], path: Path) -> None:
    """TTFT per chat turn, and tok/s per scenario, side by side per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_chat, ax_rate) = plt.subplots(1, 2, figsize=(14, 5))
    for target in targets:
        turns = sorted(
            (m.param, m.value)
            for m in metrics
            if m.target == target and m.scenario == "chat" and m.name == "ttft_ms"
        )
        if turns:
            ax_chat.plot([p for p, _ in turns], [v for _, v in turns], marker="o", label=target)
    ax_chat.set_title("Accumulated chat: TTFT per turn (lower is better)")
    ax_chat.set_xlabel("turn")
    ax_chat.set_ylabel("TTFT (ms)")
    if ax_chat.get_lines():
        ax_chat.set_ylim(bottom=0)
        ax_chat.xaxis.get_major_locator().set_params(integer=True)
        ax_chat.legend()

    rate_names = {"decode_tps", "prefill_tps", "aggregate_tps"}
    categories: list[tuple[str, int | None, str]] = []
    for m in metrics:
        key = (m.scenario, m.param, m.name)
        if m.name in rate_names and key not in categories:
            categories.append(key)
    width = 0.8 / max(1, len(targets))
    for i, target in enumerate(targets):
        by_key = {(m.scenario, m.param, m.name): m.value for m in metrics if m.target == target}
        xs = [j + i * width for j in range(len(categories))]
        ax_rate.bar(xs, [by_key.get(c, 0.0) for c in categories], width, label=target)
    ax_rate.set_xticks([j + width * (len(targets) - 1) / 2 for j in range(len(categories))])
    labels = [
        scenario_label(s, p) + (" (aggregate)" if name == "aggregate_tps" else "")
        for s, p, name in categories
    ]
    ax_rate.set_xticklabels(labels, rotation=30, ha="right")
    ax_rate.set_title("Throughput per scenario (tok/s, log scale; higher is better)")
    if categories:
        ax_rate.set_yscale("log")
        ax_rate.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
