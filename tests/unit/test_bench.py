"""The benchmark's parsing, statistics, reports and orchestration, without a model."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mlxd.bench.cli import MLX_LM_COMMAND, MLXD_COMMAND, build_parser, main, make_plan
from mlxd.bench.meta import model_summary, slug, weights_dtype
from mlxd.bench.report import (
    BASELINE,
    JOINER,
    METRICS,
    MemoryRecord,
    Metric,
    RequestRecord,
    StreamResult,
    decode_rate,
    fmt_number,
    percentile,
    plot,
    ratio,
    render_markdown,
    render_table,
    summarize,
    write_jsonl,
)
from mlxd.bench.runner import QUICK, PromptBook, TargetRun, fit, run_target
from mlxd.bench.session import TargetSpec, mlxd_config
from mlxd.bench.targets import (
    BenchError,
    HttpTarget,
    Messages,
    SpawnedServer,
    SSEDecoder,
    answer_text,
    common_prefix,
    parse_event,
    read_stream,
    resolve_model_name,
    server_env,
)
from tests.fakes import tiny_model_dir


def ticking(step: float = 0.01) -> Callable[[], float]:
    """A clock that advances ``step`` seconds per reading."""
    counter = itertools.count(1)
    return lambda: next(counter) * step


def chunk(content: str | None = None, finish: str | None = None, **delta: Any) -> str:
    if content is not None:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {"object": "chat.completion.chunk", "choices": [choice]}
    return "data: " + json.dumps(body)


USAGE = "data: " + json.dumps(
    {
        "choices": [],
        "usage": {
            "prompt_tokens": 40,
            "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 32},
        },
    }
)

# --------------------------------------------------------------------------- SSE

# (id, lines, token count, text, finish, usage completion tokens, cached)
STREAMS = [
    (
        "mlx-lm-style",
        [chunk("Hel"), "", chunk("lo"), "", chunk(" there"), "", chunk("", "length"), "",
         USAGE, "", "data: [DONE]", ""],
        3, "Hello there", "length", 3, 32,
    ),
    (
        "role-first-keepalive-reasoning",
        [chunk(role="assistant"), "", ": ping", "", chunk(reasoning_content="hmm"), "",
         ": keep-alive", chunk("ok"), "", chunk(None, "stop"), "", "data: [DONE]", ""],
        2, "ok", "stop", None, None,
    ),
    (
        "crlf-and-no-space-after-colon",
        ["data:" + chunk("a")[6:] + "\r", "\r", chunk("b", "stop") + "\r", "\r", "data:[DONE]"],
        2, "ab", "stop", None, None,
    ),
    (
        "tool-call-delta-counts",
        [chunk(tool_calls=[{"index": 0, "function": {"arguments": "{}"}}]), "",
         chunk(None, "tool_calls"), "", "data: [DONE]", ""],
        1, "", "tool_calls", None, None,
    ),
    (
        "missing-final-blank-line",
        [chunk("x"), "", chunk("y", "stop")],
        2, "xy", "stop", None, None,
    ),
    (
        "other-fields-ignored",
        ["event: message", "id: 7", "retry: 100", chunk("z", "stop"), "", "data: [DONE]", ""],
        1, "z", "stop", None, None,
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("lines", "tokens", "text", "finish", "usage", "cached"),
    [s[1:] for s in STREAMS],
    ids=[s[0] for s in STREAMS],
)
def test_read_stream(
    lines: list[str], tokens: int, text: str, finish: str, usage: int | None, cached: int | None
) -> None:
    result = read_stream(lines, ticking())
    assert len(result.token_times) == tokens
    assert result.text == text
    assert result.finish_reason == finish
    assert result.usage_completion_tokens == usage
    assert result.cached_tokens == cached
    assert result.token_times == sorted(result.token_times)
    assert result.end_time >= (result.finish_time or 0) >= (result.token_times or [0])[-1]


def test_token_times_are_event_arrivals() -> None:
    """Each event is stamped once, when its dispatching line is read: comments cost nothing."""
    lines = [": ping", chunk(role="assistant"), "", chunk("a"), "", chunk("b", "stop"), ""]
    result = read_stream(lines, ticking(1.0))
    # clock readings: role event 1, "a" 2, "b" 3, end 4
    assert result.token_times == [2.0, 3.0]
    assert result.finish_time == 3.0
    assert result.end_time == 4.0
    assert result.ttft == 2.0


def test_multiline_data_is_joined() -> None:
    decoder = SSEDecoder()
    assert decoder.feed('data: {"a":') is None
    assert decoder.feed("data: 1}") is None
    assert decoder.feed("") == '{"a":\n1}'
    assert decoder.feed("") is None  # a blank line with nothing pending dispatches nothing


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([chunk("a"), "", 'data: {"error": {"message": "out of memory"}}', ""], "out of memory"),
        ([chunk("a"), "", chunk("b"), ""], "ended before"),
        (["data: not json", ""], "not JSON"),
        (["data: [1, 2]", ""], "not an object"),
    ],
    ids=["error-object", "truncated", "not-json", "not-object"],
)
def test_read_stream_failures(lines: list[str], message: str) -> None:
    with pytest.raises(BenchError, match=message):
        read_stream(lines, ticking())


def test_parse_event_done_and_usage() -> None:
    assert parse_event("[DONE]").done
    event = parse_event(USAGE[len("data: ") :])
    assert not event.carries_token
    assert event.usage is not None and event.usage["completion_tokens"] == 3


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0], 50, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        (list(map(float, range(1, 101))), 95, 95.05),
        ([10.0, 20.0], 25, 12.5),
    ],
    ids=["single", "median-even", "min-unsorted", "max", "p95-of-100", "interpolated"],
)
def test_percentile(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], 101), ([1.0], -1)])
def test_percentile_rejects(values: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        percentile(values, q)


@pytest.mark.parametrize(
    ("tokens", "times", "expected"),
    [
        (11, [1.0 + 0.1 * i for i in range(11)], 10.0),  # 10 gaps of 100 ms
        (21, [1.0, 2.0], 20.0),  # the server's count wins over the events (buffered deltas)
        (1, [1.0], None),
        (2, [1.0, 1.0], None),
        (5, [], None),
    ],
    ids=["evenly-spaced", "usage-count", "one-token", "zero-span", "no-events"],
)
def test_decode_rate(tokens: int, times: list[float], expected: float | None) -> None:
    assert decode_rate(tokens, times) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("value", "base", "expected"),
    [(50.0, 100.0, 0.5), (3.0, 1.5, 2.0), (None, 1.0, None), (1.0, None, None), (1.0, 0.0, None)],
    ids=["half", "double", "no-value", "no-base", "zero-base"],
)
def test_ratio(value: float | None, base: float | None, expected: float | None) -> None:
    assert ratio(value, base) == expected


def test_stream_result_falls_back_to_finish_and_event_count() -> None:
    empty = StreamResult(finish_time=0.3, finish_reason="stop", end_time=0.31)
    assert empty.ttft == 0.3
    assert empty.completion_tokens == 0
    counted = StreamResult(token_times=[0.1, 0.2, 0.4])
    assert counted.completion_tokens == 3
    assert counted.inter_token_s == pytest.approx([0.1, 0.2])


def _rec(
    target: str,
    scenario: str,
    times: Sequence[float],
    *,
    param: int | None = None,
    repeat: int = 0,
    prompt: int = 100,
    stream: int = 0,
    offset: float = 0.0,
) -> RequestRecord:
    result = StreamResult(
        token_times=list(times), end_time=times[-1] + 0.01, finish_reason="length"
    )
    return RequestRecord(target, scenario, param, repeat, prompt, result, stream, offset)


def _values(metrics: Sequence[Metric]) -> dict[tuple[str, str, int | None, str], float]:
    return {(m.target, m.scenario, m.param, m.name): m.value for m in metrics}


def test_summarize_single_request_scenarios() -> None:
    decode_a = [0.5 + 0.1 * i for i in range(11)]  # 10 tok/s after a 500 ms TTFT
    decode_b = [0.7 + 0.05 * i for i in range(11)]  # 20 tok/s
    decode_c = [0.6 + 0.2 * i for i in range(11)]  # 5 tok/s
    records = [
        _rec("srv", "decode", decode_a, repeat=0),
        _rec("srv", "decode", decode_b, repeat=1),
        _rec("srv", "decode", decode_c, repeat=2),
        _rec("srv", "prefill", [0.25, 0.3], param=512, prompt=512),
        _rec("srv", "prefill", [0.5, 0.6], param=512, prompt=512, repeat=1),
        _rec("srv", "cold", [2.0, 2.1]),
    ]
    memory = [MemoryRecord("srv", "decode", 3 * 2**20, None)]
    v = _values(summarize(records, memory, {"srv": 4.0}))
    assert v[("srv", "decode", None, "decode_tps")] == pytest.approx(10.0)  # median of 10, 20, 5
    assert v[("srv", "decode", None, "completion_tokens")] == 11
    assert v[("srv", "decode", None, "itl_max_ms")] == pytest.approx(200.0)
    assert v[("srv", "decode", None, "itl_p50_ms")] == pytest.approx(100.0)
    assert v[("srv", "prefill", 512, "ttft_ms")] == pytest.approx(375.0)
    assert v[("srv", "prefill", 512, "prefill_tps")] == pytest.approx((2048 + 1024) / 2)
    assert v[("srv", "cold", None, "ttft_ms")] == pytest.approx(2000.0)
    assert v[("srv", "cold", None, "since_launch_s")] == pytest.approx(6.0)
    assert v[("srv", "startup", None, "startup_s")] == 4.0
    assert v[("srv", "decode", None, "peak_rss_mib")] == 3.0
    assert ("srv", "decode", None, "prefill_tps") not in v  # only what the scenario is about


def test_summarize_concurrency_aggregates_over_wall_time() -> None:
    # Two streams started 0.5 s apart; 10 tokens each; the group spans 0 .. 0.5 + 1.01 s.
    records = [
        _rec("srv", "concurrency", [0.1 * (i + 1) for i in range(10)], param=2, stream=0),
        _rec(
            "srv", "concurrency", [0.1 * (i + 1) for i in range(10)], param=2, stream=1, offset=0.5
        ),
    ]
    v = _values(summarize(records))
    assert v[("srv", "concurrency", 2, "aggregate_tps")] == pytest.approx(20 / 1.51)
    assert v[("srv", "concurrency", 2, "per_stream_tps")] == pytest.approx(10.0)
    assert v[("srv", "concurrency", 2, "ttft_ms")] == pytest.approx(100.0)


def test_summarize_rejects_unknown_scenarios() -> None:
    with pytest.raises(ValueError, match="unknown scenario"):
        summarize([_rec("srv", "bogus", [0.1])])


def test_metrics_are_in_report_order() -> None:
    records = [
        _rec("srv", "chat", [0.3, 0.4], param=2),
        _rec("srv", "chat", [0.2, 0.3], param=1),
        _rec("srv", "cold", [0.5, 0.6]),
    ]
    order = [(m.scenario, m.param) for m in summarize(records)]
    assert order == sorted(order, key=lambda k: (k[0] != "cold", k[1] or 0))


# --------------------------------------------------------------------------- markdown


SAMPLE = [
    Metric(BASELINE, "decode", None, "decode_tps", 100.0),
    Metric("mlxd", "decode", None, "decode_tps", 95.0),
    Metric("peer", "decode", None, "decode_tps", 80.0),
    Metric(BASELINE, "warm", None, "ttft_ms", 40.0),
    Metric("mlxd", "warm", None, "ttft_ms", 50.0),
    Metric(BASELINE, "chat", 5, "prompt_tokens", 2100.0),
    Metric("mlxd", "chat", 5, "prompt_tokens", 2100.0),
    Metric(BASELINE, "decode", None, "peak_rss_mib", 1000.0),
    Metric("mlxd", "decode", None, "peak_rss_mib", 1100.0),
]


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.strip().splitlines()]


def test_table_has_ratio_columns_against_the_baseline() -> None:
    rows = _rows(render_table(SAMPLE, [BASELINE, "mlxd", "peer"]))
    assert rows[0] == [
        "scenario", "metric", "unit", "better",
        BASELINE, "mlxd", f"mlxd ÷ {BASELINE}", "peer", f"peer ÷ {BASELINE}",
    ]  # fmt: skip
    by_label = {(r[0], r[1]): r for r in rows[2:]}
    assert by_label[("decode", "decode")][3:] == ["↑", "100", "95", "0.95×", "80", "0.80×"]
    assert by_label[("warm", "TTFT")][3:] == ["↓", "40", "50", "1.25×", "—", "—"]
    # Counts get no ratio: a ratio of prompt lengths means nothing.
    assert by_label[("chat turn 5", "prompt tokens")][4:7] == ["2,100", "2,100", "—"]
    assert not any("RSS" in r[1] for r in rows)  # memory lives in its own table


def test_memory_table_and_no_ratio_without_baseline() -> None:
    rows = _rows(render_table(SAMPLE, ["mlxd"], memory=True))
    assert rows[0] == ["scenario", "metric", "unit", "better", "mlxd"]
    assert rows[2] == ["decode", "peak RSS", "MiB", "↓", "1,100"]


def test_render_markdown_names_the_setup_and_failures() -> None:
    meta = {
        "date": "2026-01-01T00:00:00+00:00",
        "backend": "metal (gpu)",
        "model": {"name": "qwen3-8b", "layers": 36},
    }
    text = render_markdown(SAMPLE, [BASELINE, "mlxd"], meta, {"peer": "HTTP 500"})
    assert text.startswith("# mlxd benchmark: qwen3-8b\n")
    assert "- backend: metal (gpu)" in text
    assert "- model: name=qwen3-8b, layers=36" in text
    assert "## Memory" in text
    assert "- peer: HTTP 500" in text


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "—"), (1234.5, "1,234"), (12.345, "12.3"), (1.2345, "1.23"), (32.0, "32"), (0.0, "0")],
)
def test_fmt_number(value: float | None, text: str) -> None:
    assert fmt_number(value) == text


# --------------------------------------------------------------------------- files

REQUIRED = {
    "meta": {"schema", "date", "model"},
    "request": {"target", "scenario", "param", "repeat", "prompt_tokens", "token_times",
                "ttft_s", "completion_tokens", "end_time", "finish_reason", "stream",
                "start_offset"},
    "memory": {"target", "scenario", "peak_rss_bytes", "mlx_peak_bytes"},
    "metric": {"target", "scenario", "param", "name", "value", "unit", "better"},
    "error": {"target", "message"},
}  # fmt: skip


def test_jsonl_schema(tmp_path: Path) -> None:
    records = [_rec("srv", "decode", [0.1, 0.2, 0.3]), _rec(BASELINE, "decode", [0.1, 0.15])]
    memory = [MemoryRecord("srv", "decode", 2**30, None)]
    metrics = summarize(records, memory)
    meta = {"date": "2026-01-01", "model": {"name": "m"}}
    path = tmp_path / "results.jsonl"
    write_jsonl(path, meta, records, memory, metrics, {"other": "refused"})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["kind"] == "meta"
    kinds = [r["kind"] for r in rows]
    assert kinds.count("request") == 2 and kinds.count("error") == 1
    for row in rows:
        missing = REQUIRED[row["kind"]] - row.keys()
        assert not missing, (row["kind"], missing)
    for row in rows:
        if row["kind"] == "metric":
            assert row["name"] in METRICS
            assert row["unit"] == METRICS[row["name"]].unit


def test_plot_writes_a_png(tmp_path: Path) -> None:
    metrics = [
        *SAMPLE,
        Metric("mlxd", "chat", 1, "ttft_ms", 30.0),
        Metric("mlxd", "chat", 2, "ttft_ms", 20.0),
    ]
    plot(metrics, [BASELINE, "mlxd", "peer"], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    ("per_item", "overhead", "target", "expected"),
    [(1, 0, 100, 100), (3, 10, 100, 30), (2, 0, 1, 0), (1, 50, 10, 0), (7, 5, 1000, 142)],
    ids=["exact", "overhead", "nothing-fits-but-zero", "overhead-too-big", "odd-size"],
)
def test_fit(per_item: int, overhead: int, target: int, expected: int) -> None:
    assert fit(lambda n: overhead + per_item * n, target) == expected


def test_fit_stops_at_the_limit() -> None:
    assert fit(lambda n: 0, 10, limit=64) == 64


class WordTokenizer:
    """One token per whitespace-separated word; a template adds 3 tokens per message + 2."""

    def __init__(self) -> None:
        self.eos_token_ids = {0}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1] * len(text.split())

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool) -> list[int]:
        return [1] * (sum(3 + len(m["content"].split()) for m in messages) + 2)


@pytest.mark.parametrize("n_tokens", [64, 128, 513, 2048])
def test_sized_prompts_hit_their_length(n_tokens: int) -> None:
    book = PromptBook(WordTokenizer())
    messages = book.sized("prefill-1", n_tokens)
    assert book.count(messages) == n_tokens
    assert messages[0]["content"] != book.sized("prefill-2", n_tokens)[0]["content"]


def test_prompts_are_deterministic_and_chat_turns_differ() -> None:
    a, b = PromptBook(WordTokenizer()), PromptBook(WordTokenizer())
    assert a.sized("x", 300) == b.sized("x", 300)
    # Distinct requests differ from their first word: no shared prefix for a cache to reuse.
    firsts = {PromptBook.system(f"prefill-128-{i}")["content"].split()[0] for i in range(20)}
    assert len(firsts) == 20
    turn1, turn2 = a.chat_user(1, 50), a.chat_user(2, 50)
    assert turn1 != turn2
    assert len(turn1.split()) == 50


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [([1, 2, 3], [1, 2, 4], 2), ([], [1], 0), ([1, 2], [1, 2, 3], 2), ([5], [6], 0)],
)
def test_common_prefix(a: list[int], b: list[int], n: int) -> None:
    assert common_prefix(a, b) == n


# --------------------------------------------------------------------------- orchestration


class FakeTarget:
    """Answers instantly with one token per max_token, recording what it was asked."""

    name = "fake"
    pid = None
    in_process = False

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []  # (kind, messages, max_tokens)
        self.histories: list[Messages] = []
        self.conversations = 0

    def _result(self, max_tokens: int) -> StreamResult:
        times = [0.01 * (i + 1) for i in range(max_tokens)]
        return StreamResult(times, times[-1], times[-1], "length", "ans " * max_tokens)

    def chat(self, messages: Messages, max_tokens: int, conversation: bool = False) -> StreamResult:
        self.calls.append(("chat" if conversation else "single", len(messages), max_tokens))
        if conversation:
            self.histories.append(messages)
        return self._result(max_tokens)

    def chat_many(
        self, conversations: Sequence[Messages], max_tokens: int
    ) -> list[tuple[float, StreamResult]]:
        self.calls.append(("many", len(conversations), max_tokens))
        return [(0.001 * i, self._result(max_tokens)) for i in range(len(conversations))]

    def chat_join(
        self, streams: Sequence[Messages], max_tokens: int, joiner: Messages, joiner_tokens: int
    ) -> list[tuple[float, StreamResult]]:
        self.calls.append(("join", len(streams), max_tokens))
        return [(0.0, self._result(max_tokens)) for _ in streams] + [
            (0.025, self._result(joiner_tokens))
        ]

    def new_conversation(self) -> None:
        self.conversations += 1


def test_run_target_covers_the_plan() -> None:
    plan = dataclasses.replace(QUICK, repeats=2, group_repeats=2, chat_turns=3)
    target = FakeTarget()
    said: list[str] = []
    run = run_target(target, plan, PromptBook(WordTokenizer()), said.append)
    counts: dict[tuple[str, int | None], int] = {}
    for rec in run.records:
        counts[(rec.scenario, rec.param)] = counts.get((rec.scenario, rec.param), 0) + 1
    assert counts == {
        ("cold", None): 1,
        ("warm", None): 2,
        ("decode", None): 2,
        ("prefill", 64): 2,
        ("prefill", 256): 2,
        ("chat", 1): 2,
        ("chat", 2): 2,
        ("chat", 3): 2,
        ("concurrency", 1): 2 * 1,
        ("concurrency", 4): 2 * 4,
        ("join", 256): 2 * (2 + 1),  # two running streams and the joiner, per repeat
    }
    assert run.records[0].scenario == "cold"  # the first request the target sees
    # Each chat turn resends the history with the previous answers: system + 2 per turn - 1.
    assert [len(h) for h in target.histories] == [2, 4, 6, 2, 4, 6]
    assert target.histories[1][2] == {"role": "assistant", "content": "ans " * plan.chat_max_tokens}
    assert target.conversations == 2 + 1  # a fresh one per repeat, and one reset at the end
    assert [m.scenario for m in run.memory] == list(plan.scenarios)
    assert len(said) == 15 + 4 + 2  # one line per single request, per concurrent group, per join
    offsets = [r.start_offset for r in run.records if r.param == 4 and r.repeat == 0]
    assert offsets == pytest.approx([0.0, 0.001, 0.002, 0.003])


def test_warmup_runs_an_unrecorded_round_of_each_concurrent_shape_first() -> None:
    plan = dataclasses.replace(QUICK, scenarios=("concurrency", "join"), warmup=True)
    target = FakeTarget()
    run = run_target(target, plan, PromptBook(WordTokenizer()), lambda _: None)
    # Each shape twice: the warm-up, then the measured round; only the latter is recorded.
    assert target.calls == [
        ("many", 1, plan.concurrency_max_tokens), ("many", 1, plan.concurrency_max_tokens),
        ("many", 4, plan.concurrency_max_tokens), ("many", 4, plan.concurrency_max_tokens),
        ("join", 2, plan.join_max_tokens), ("join", 2, plan.join_max_tokens),
    ]  # fmt: skip
    assert len(run.records) == 1 + 4 + (2 + 1)


class FailingTarget(FakeTarget):
    def chat_many(
        self, conversations: Sequence[Messages], max_tokens: int
    ) -> list[tuple[float, StreamResult]]:
        raise BenchError("connection reset")


def test_a_failing_target_keeps_what_it_measured() -> None:
    run = TargetRun()
    with pytest.raises(BenchError, match="connection reset"):
        run_target(FailingTarget(), QUICK, PromptBook(WordTokenizer()), lambda _: None, run)
    assert {r.scenario for r in run.records} == {"cold", "warm", "decode", "prefill", "chat"}
    assert run.memory[-1].scenario == "concurrency"  # its memory watch was still stopped


@pytest.mark.parametrize(
    ("raw", "answer"),
    [
        ("plain answer", "plain answer"),
        ("<think>\nhmm\n</think>\n\nHi there", "Hi there"),
        ("still thinking</think>Done", "Done"),
        ("a</think>b</think> c", "c"),
    ],
    ids=["no-reasoning", "think-block", "think-opened-by-template", "last-close-wins"],
)
def test_answer_text(raw: str, answer: str) -> None:
    assert answer_text(raw) == answer


# --------------------------------------------------------------------------- CLI and metadata


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["--model-dir", "m", *argv])


def test_targets_keep_their_command_line_order() -> None:
    args = _args(
        "--spawn-mlxd", "--target", "peer=http://127.0.0.1:9/v1", "--spawn-mlx-lm",
        "--spawn", "x=run {port}", "--spawn-mlxd", "custom {port}",
    )  # fmt: skip
    assert args.targets == [
        TargetSpec("mlxd", command=MLXD_COMMAND),
        TargetSpec("peer", url="http://127.0.0.1:9/v1"),
        TargetSpec("mlx_lm.server", command=MLX_LM_COMMAND),
        TargetSpec("x", command="run {port}"),
        TargetSpec("mlxd", command="custom {port}"),
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--target", "no-equals-sign"],
        ["--target", "=http://x"],
        ["--prompt-lengths", "128,abc"],
        ["--concurrency", "0"],
        ["--scenarios", "decode,bogus"],
    ],
    ids=["target-no-eq", "target-no-name", "bad-int", "zero", "bad-scenario"],
)
def test_bad_flags_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _args(*argv)
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("argv", "context", "lengths"),
    [
        ([], 32768, (128, 512, 2048, 8192)),  # --max-prompt 8192 by default
        (["--max-prompt", "100000"], 32768, (128, 512, 2048, 8192)),  # no room left for 32768
        ([], 4096, (128, 512, 2048)),
        ([], None, (128, 512, 2048, 8192)),
        (["--prompt-lengths", "100,300"], 200, (100,)),
        (["--prompt-lengths", "100,300"], 400, (100, 300)),
        (["--quick"], 8192, QUICK.prefill_lengths),
    ],
)
def test_make_plan_caps_prompt_lengths(
    argv: list[str], context: int | None, lengths: tuple[int, ...]
) -> None:
    assert make_plan(_args(*argv), context).prefill_lengths == lengths


def test_make_plan_overrides() -> None:
    plan = make_plan(
        _args("--quick", "--repeats", "5", "--concurrency", "2,3", "--scenarios", "decode",
              "--decode-tokens", "77", "--suppress-eos"),
        8192,
    )  # fmt: skip
    assert (plan.repeats, plan.concurrency, plan.scenarios) == (5, (2, 3), ("decode",))
    assert plan.decode_max_tokens == 77 and plan.suppress_eos
    with pytest.raises(BenchError):
        make_plan(_args("--repeats", "0"), None)


@pytest.mark.parametrize(
    ("config", "dtype", "quantization", "layers"),
    [
        ({"num_hidden_layers": 36, "quantization": {"bits": 4, "group_size": 64}}, None,
         "4-bit (group 64)", 36),
        ({"num_hidden_layers": 30, "torch_dtype": "bfloat16"}, None, "none (bfloat16)", 30),
        ({"num_hidden_layers": 30}, "float16", "none (float16)", 30),
        ({"text_config": {"num_hidden_layers": 64}, "quantization_config": {"bits": 8}}, None,
         "8-bit (group ?)", 64),
    ],
    ids=["quantized", "dtype-in-config", "dtype-from-weights", "nested-text-config"],
)  # fmt: skip
def test_model_summary(
    config: dict[str, Any], dtype: str | None, quantization: str, layers: int
) -> None:
    summary = model_summary(config, 3 * 2**30, "m", dtype)
    assert summary["quantization"] == quantization
    assert summary["layers"] == layers
    assert summary["weights_gib"] == 3.0


def test_weights_dtype_reads_the_safetensors_header(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"format": "mlx"},
        "a.weight": {"dtype": "U32", "shape": [1], "data_offsets": [0, 4]},
        "a.scales": {"dtype": "BF16", "shape": [1], "data_offsets": [4, 6]},
        "b.scales": {"dtype": "BF16", "shape": [1], "data_offsets": [6, 8]},
        "norm": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
    }
    raw = json.dumps(header).encode()
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(12))
    assert weights_dtype(shard) == "bfloat16"
    (tmp_path / "broken.safetensors").write_bytes(b"\x01")
    assert weights_dtype(tmp_path / "broken.safetensors") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Apple M3 Max", "apple-m3-max"),
        ("Intel(R) Xeon(R) CPU @ 2.20GHz", "intel-xeon-cpu"),
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
        ("Qwen3-8B-4bit", "qwen3-8b-4bit"),
        ("@@@", "unknown"),
    ],
)
def test_slug(text: str, expected: str) -> None:
    assert slug(text) == expected


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([], "models/qwen"),  # a server that lists nothing gets the directory as given
        (["only-one"], "only-one"),
        (["other", "qwen"], "qwen"),
    ],
)
def test_resolve_model_name(ids: list[str], expected: str) -> None:
    assert resolve_model_name(ids, Path("models/qwen")) == expected


def test_resolve_model_name_ambiguous() -> None:
    with pytest.raises(BenchError, match="--model-name"):
        resolve_model_name(["a", "b"], Path("models/qwen"))


@pytest.mark.parametrize(
    ("blas", "before", "after"),
    [
        ("/lib/openblas.so", None, "/lib/openblas.so"),
        ("/lib/openblas.so", "/lib/other.so", "/lib/openblas.so /lib/other.so"),
        (None, "/lib/other.so", "/lib/other.so"),
        (None, None, None),
    ],
)
def test_server_env_preloads_our_blas(
    blas: str | None, before: str | None, after: str | None
) -> None:
    base = {"PATH": "/bin"} | ({"LD_PRELOAD": before} if before else {})
    env = server_env(blas, base)
    assert env.get("LD_PRELOAD") == after
    assert env["PATH"] == "/bin"


def test_mlxd_config_serves_the_model_dir(tmp_path: Path) -> None:
    model = tmp_path / "qwen3-8b"
    model.mkdir()
    config = json.loads(mlxd_config(model))
    assert config == {
        "default": "qwen3-8b",
        "models": [{"id": "qwen3-8b", "source": {"path": str(model.resolve())}}],
    }


# --------------------------------------------------------------------------- over HTTP

FAKE_SERVER = textwrap.dedent(
    '''
    """An OpenAI-compatible streaming server that answers 'w0 w1 ...' (one word per token)."""
    import json, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    log = open(sys.argv[2], "a")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "fake-model"}]}).encode()
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions":
                self.send_response(404)
                self.end_headers()
                self.wfile.write(b"no such route")
                return
            log.write(json.dumps(request) + "\\n")
            log.flush()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()

            def send(text):
                self.wfile.write(text.encode())
                self.wfile.flush()

            def chunk(delta, finish=None):
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                send("data: " + json.dumps({"choices": [choice]}) + "\\n\\n")

            chunk({"role": "assistant"})
            send(": keep-alive\\n\\n")
            n = request["max_tokens"]
            for i in range(n):
                time.sleep(0.002)
                chunk({"content": f"w{i} "})
            chunk({}, "length")
            if (request.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 9, "completion_tokens": n}
                send("data: " + json.dumps({"choices": [], "usage": usage}) + "\\n\\n")
            send("data: [DONE]\\n\\n")

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    '''
)


@pytest.fixture
def fake_server(tmp_path: Path) -> Path:
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    return script


@pytest.fixture
def running_fake(fake_server: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    requests = tmp_path / "requests.jsonl"
    argv = [sys.executable, str(fake_server), str(port), str(requests)]
    url = f"http://127.0.0.1:{port}/v1"
    server = SpawnedServer("fake", argv, url, tmp_path / "fake.log")
    server.launch()
    try:
        server.wait_ready(timeout=30)
        yield url, requests
    finally:
        server.stop()
    assert server.proc is not None and server.proc.poll() is not None


def test_http_target_streams_and_times(running_fake: tuple[str, Path]) -> None:
    url, requests = running_fake
    target = HttpTarget(
        "fake", url, "fake-model", timeout=30, extra_body={"logit_bias": {"2": -100}}
    )
    try:
        result = target.chat([{"role": "user", "content": "hi"}], 20)
        many = target.chat_many([[{"role": "user", "content": str(i)}] for i in range(3)], 5)
    finally:
        target.close()
    assert result.text == "".join(f"w{i} " for i in range(20))
    assert len(result.token_times) == 20 and result.usage_completion_tokens == 20
    assert result.decode_tps is not None and result.decode_tps < 1000  # 2 ms sleeps between tokens
    assert [len(r.token_times) for _, r in many] == [5, 5, 5]
    assert min(offset for offset, _ in many) == 0.0
    sent = [json.loads(line) for line in requests.read_text().splitlines()]
    assert sent[0]["temperature"] == 0.0 and sent[0]["stream"] is True
    assert sent[0]["stream_options"] == {"include_usage": True}
    assert sent[0]["logit_bias"] == {"2": -100}
    assert sent[0]["model"] == "fake-model"


def test_http_target_reports_http_errors(running_fake: tuple[str, Path]) -> None:
    url, _ = running_fake
    target = HttpTarget("fake", url.replace("/v1", "/nope"), "m", timeout=10)
    try:
        with pytest.raises(BenchError, match="HTTP 404"):
            target.chat([{"role": "user", "content": "hi"}], 3)
    finally:
        target.close()


def test_spawned_server_that_dies_says_why(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "print('cannot load weights'); raise SystemExit(3)"]
    server = SpawnedServer("broken", argv, "http://127.0.0.1:9/v1", tmp_path / "broken.log")
    server.launch()
    try:
        with pytest.raises(BenchError, match=r"exited with 3[\s\S]*cannot load weights"):
            server.wait_ready(timeout=30)
    finally:
        server.stop()


def test_main_end_to_end_with_a_spawned_fake(fake_server: Path, tmp_path: Path) -> None:
    """The whole CLI: spawn, measure every quick scenario, stop, write the four files."""
    model = tiny_model_dir(tmp_path / "tiny", context=2048)
    out = tmp_path / "results"
    command = f"{{python}} {fake_server} {{port}} {tmp_path / 'requests.jsonl'}"
    code = main(
        ["--model-dir", str(model), "--no-baseline", "--quick", "--spawn", f"fake={command}",
         "--target", "gone=http://127.0.0.1:9/v1", "--out", str(out)]
    )  # fmt: skip
    assert code == 1  # the unreachable target failed; the fake was measured
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    scenarios = {r["scenario"] for r in rows if r["kind"] == "request"}
    assert scenarios == {"cold", "warm", "decode", "prefill", "chat", "concurrency", "join"}
    assert {r["target"] for r in rows if r["kind"] == "error"} == {"gone"}
    assert any(r["kind"] == "metric" and r["name"] == "startup_s" for r in rows)
    markdown = (out / "results.md").read_text()
    assert "| chat turn 5 |" in markdown and "- gone:" in markdown
    assert (out / "plot.png").exists() and (out / "fake.log").exists()
    assert json.loads((out / "meta.json").read_text())["model"]["name"] == "tiny"
    sent = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert len(sent) == sum(1 for r in rows if r["kind"] == "request")


def test_join_metrics_split_gaps_at_the_join() -> None:
    """Gaps before the long prompt was sent are 'idle'; those overlapping its prefill count as
    'joining'; the TTFT p95 of a concurrent group is measured from the group's start."""
    stream_times = [0.1 * i for i in range(1, 11)] + [1.0 + 0.3 * i for i in range(1, 6)]
    streams = [
        RequestRecord("t", "join", 512, 0, 10, StreamResult(stream_times, 2.5, 2.5, "length"), i)
        for i in range(2)
    ]
    joiner = RequestRecord("t", "join", 512, 0, 512, StreamResult([1.5], 1.6, 1.6, "length"),
                           JOINER, start_offset=1.0)  # fmt: skip
    values = {m.name: m.value for m in summarize([*streams, joiner])}
    assert values["itl_p95_idle_ms"] == pytest.approx(100)
    assert values["itl_p95_join_ms"] == pytest.approx(300)
    assert values["join_itl_ratio"] == pytest.approx(3.0)
    assert values["join_ttft_ms"] == pytest.approx(1500)
    late = [RequestRecord("t", "concurrency", 4, 0, 10, StreamResult([0.1 + i], 2, 2, "length"),
                          i, start_offset=0.0) for i in range(4)]  # fmt: skip
    p95 = {m.name: m.value for m in summarize(late)}["ttft_p95_ms"]
    assert 2900 < p95 <= 3100  # the last stream waited 3.1 s: p95 of 0.1, 1.1, 2.1, 3.1
