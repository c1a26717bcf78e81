"""Hostile input against the real server and the real SmolLM2 over real HTTP (issue 9).

One server for the module, started with an API key, a 1 s header deadline, a batch of 2, a queue
of 2 and an open-file limit of 256 (so the connection cap is 128): every finding of the issue is
a test here, plus a hypothesis fuzz over every request field with a fixed greedy probe before
and after each batch. The SIGTERM drain has its own server (it ends it).
"""

from __future__ import annotations

import contextlib
import json
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxd.config import REPO_ROOT
from mlxd.localnet import free_port
from tests.conftest import RunningServer, run_server

pytestmark = pytest.mark.e2e

KEY = "test-key-9"
AUTH = {"authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "Hi"}]
PROBE = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
    "max_tokens": 8,
}
POST_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Authorization: Bearer " + KEY.encode() + b"\r\n"
)
# The target is 50 ms; this machine runs several test suites on 2 cores (load average
# ~12 measured), where any request can take a few hundred ms. What is tested is that /health
# no longer waits behind MLX work (10-80 s before), so the bound is generous.
HEALTH_BOUND = 1.0
FIGURES: dict[str, Any] = {
    "requests": 0,
    "status_5xx": 0,
    "in_stream_errors": 0,
    "crashes": 0,
    "by_status": {},
}


def _low_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("hostile") / "mlxd.log"
    args = ["--config", str(REPO_ROOT / "models.yaml"), "--api-key", KEY, "--header-timeout", "1"]
    env = {"MLXD_QUEUE_SIZE": "2", "MLXD_MAX_CONCURRENCY": "2"}
    with run_server(args, log, env=env, preexec_fn=_low_file_limit) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.root, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def baseline(http: httpx.Client) -> str:
    return probe(http)


def probe(http: httpx.Client) -> str:
    r = http.post("/v1/chat/completions", json=PROBE)
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["message"]["content"]
    return text


def chat(http: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return http.post("/v1/chat/completions", json=body)


def raw(server: RunningServer, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh socket; what came back until the server closed, and how long."""
    port = int(server.root.rsplit(":", 1)[1])
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(timeout)
        with contextlib.suppress(OSError):
            sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out, time.monotonic() - start


def status_of(reply: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3})", reply)
    assert match, reply[:200]
    return int(match.group(1))


# ---- the findings ---------------------------------------------------------------------------


def test_crash_and_poison_requests(
    server: RunningServer, http: httpx.Client, baseline: str
) -> None:
    """The two requests that killed the process / broke sampling until restart."""
    for token in ("49152", "50000", "100000000"):
        r = chat(http, {"model": "smollm2", "messages": HI, "max_tokens": 4,
                        "logit_bias": {token: 5}})  # fmt: skip
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "logit_bias"
    assert server.process.poll() is None
    poison = chat(http, {"model": "smollm2", "messages": HI, "max_tokens": 2,
                         "temperature": 0.7, "top_k": 1000000})  # fmt: skip
    assert poison.status_code == 200, poison.text  # top_k >= vocab: no top_k
    for _ in range(3):
        sampled = chat(http, {"model": "smollm2", "messages": HI, "max_tokens": 2,
                              "temperature": 0.7})  # fmt: skip
        assert sampled.status_code == 200, sampled.text
    seeded = [
        chat(http, {"model": "smollm2", "messages": HI, "max_tokens": 6, "temperature": 1.0,
                    "seed": 7}).json()["choices"][0]["message"]["content"]
        for _ in range(2)
    ]  # fmt: skip
    assert seeded[0] == seeded[1]  # a seed reproduces whatever ran in between
    assert probe(http) == baseline


BAD = [
    ({"seed": 2**64}, "seed"),
    ({"logit_bias": {str(2**70): 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     "tools[0].function.parameters"),
]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_client_errors_are_4xx_before_streaming(http: httpx.Client, stream: bool) -> None:
    for extra, param in BAD:
        r = chat(http, {"model": "smollm2", "messages": HI, "max_tokens": 1, "stream": stream,
                        **extra})  # fmt: skip
        assert r.status_code == 400, (extra, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["param"] == param
    texts = [
        b'{"model":"smollm2","messages":[{"role":"user","content":"\\ud800"}],"max_tokens":1,'
        b'"stream":%s}',
        b'{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":1,'
        b'"logit_bias":{"5":NaN},"stream":%s}',
        b'{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":1,'
        b'"repetition_penalty":Infinity,"stream":%s}',
        b"[" * 10000 + b"]" * 10000,
    ]
    for text in texts:
        body = text % (b"true" if stream else b"false") if b"%s" in text else text
        r = http.post("/v1/chat/completions", content=body,
                      headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 400, (body[:80], r.text)
    for ok in ({"seed": -1, "temperature": 0.5}, {"top_k": 49152, "temperature": 0.5}):
        r = chat(http, {"model": "smollm2", "messages": HI, "max_tokens": 1, "stream": stream,
                        **ok})  # fmt: skip
        assert r.status_code == 200, r.text


def test_api_keys_through_the_openai_sdk(server: RunningServer) -> None:
    good = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)
    r = good.chat.completions.create(model="smollm2", messages=HI, max_tokens=1)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason in ("length", "stop")
    bad = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="smollm2", messages=HI, max_tokens=1)  # type: ignore[arg-type]
    assert info.value.status_code == 401
    assert httpx.post(f"{server.url}/chat/completions", json=PROBE).status_code == 401
    assert httpx.get(f"{server.root}/health").status_code == 200


def test_web_pages_cannot_reach_it(server: RunningServer, http: httpx.Client) -> None:
    body = json.dumps({"model": "smollm2", "messages": HI, "max_tokens": 1})
    simple = http.post("/v1/chat/completions", content=body,
                       headers={"content-type": "text/plain"})  # fmt: skip
    assert simple.status_code == 415
    cross = http.post("/v1/chat/completions", content=body,
                      headers={"content-type": "application/json",
                               "origin": "https://evil.example"})  # fmt: skip
    assert cross.status_code == 403
    port = server.root.rsplit(":", 1)[1]
    rebound = http.post("/v1/chat/completions", content=body,
                        headers={"content-type": "application/json",
                                 "host": f"evil.example:{port}"})  # fmt: skip
    assert rebound.status_code == 403


def test_non_loopback_bind_without_key_refuses_to_start(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "mlxd", "serve", "--host", "0.0.0.0", "--port",
           str(free_port()), "--config", str(REPO_ROOT / "models.yaml")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 2
    assert "without an API key" in done.stderr


def test_body_over_the_limit_is_413_before_it_is_read(server: RunningServer) -> None:
    head = POST_HEAD + b"Content-Type: application/json\r\n"
    declared, _ = raw(server, head + b"Content-Length: 40000000\r\n\r\n")
    assert status_of(declared) == 413
    # Chunked: counted while it arrives; the server answers and stops reading past 32 MiB.
    port = int(server.root.rsplit(":", 1)[1])
    chunk = b"100000\r\n" + b" " * 0x100000 + b"\r\n"  # 1 MiB
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(30)
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(64):
                sock.sendall(chunk)
                sent += 1
        except OSError:
            pass
        reply = sock.recv(4096)
    assert status_of(reply) == 413
    assert sent < 64


def test_slow_headers_are_cut_off(server: RunningServer) -> None:
    """Slowloris: a byte every 0.3 s never completes a request head; 1 s deadline."""
    port = int(server.root.rsplit(":", 1)[1])
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    start = time.monotonic()
    open_ = set(range(len(socks)))
    for sock in socks:
        sock.settimeout(0.05)
    while open_ and time.monotonic() - start < 8:
        for i in list(open_):
            try:
                socks[i].sendall(b"G")
                if socks[i].recv(1) == b"":
                    open_.discard(i)
            except TimeoutError:
                pass
            except OSError:
                open_.discard(i)
        time.sleep(0.3)
    elapsed = time.monotonic() - start
    for sock in socks:
        sock.close()
    assert not open_, f"{len(open_)} slow connections still open after {elapsed:.1f}s"


def test_oversized_headers_and_conflicting_lengths(server: RunningServer) -> None:
    big, took = raw(server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
                    + b"a" * 100_000 + b"\r\n\r\n")  # fmt: skip
    assert status_of(big) == 431
    both, took = raw(server, POST_HEAD + b"Content-Type: application/json\r\n"
                     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n{}")  # fmt: skip
    assert status_of(both) in (400, 408)
    assert took < 8  # refused, not a 60 s hang


def test_open_file_pressure(server: RunningServer, http: httpx.Client) -> None:
    """300 idle sockets against a 256-file limit (cap 128): the server keeps serving."""
    port = int(server.root.rsplit(":", 1)[1])
    before = server.log.stat().st_size
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        r = httpx.get(f"{server.root}/health", timeout=10)
        assert r.status_code == 200
        assert chat(http, {"model": "smollm2", "messages": HI, "max_tokens": 1}).status_code == 200
    finally:
        for sock in idle:
            sock.close()
    grown = server.log.stat().st_size - before
    assert grown < 20_000, server.log_text()[-3000:]  # rate-limited: no flood of tracebacks
    assert "Too many open files" not in server.log_text()  # the cap held below the limit
    assert server.process.poll() is None


def test_queue_full_is_503_with_retry_after(http: httpx.Client) -> None:
    """A batch of 2 + a queue of 2: of 8 concurrent requests, the rest are refused now."""
    results: list[httpx.Response] = []

    def one() -> None:
        body = {"model": "smollm2", "messages": HI, "max_tokens": 12, "ignore_eos": True}
        results.append(chat(http, body))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    codes = [r.status_code for r in results]
    assert len(codes) == 8 and set(codes) <= {200, 503}, codes
    assert 1 <= codes.count(200) <= 4 and codes.count(503) >= 4
    refused = next(r for r in results if r.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1
    assert http.get("/health").json()["in_flight"] == 0


def _wait_for_log(server: RunningServer, pattern: str, timeout: float = 60) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, server.log_text())
        if match:
            return match
        time.sleep(0.2)
    raise AssertionError(f"no log line matching {pattern!r}:\n{server.log_text()[-2000:]}")


def test_non_streaming_disconnect_cancels(server: RunningServer, http: httpx.Client) -> None:
    body = {"model": "smollm2", "messages": HI, "max_tokens": 2000, "ignore_eos": True,
            "user": "gone-client"}  # fmt: skip
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/chat/completions", json=body, headers=AUTH, timeout=3)
    line = _wait_for_log(server, r"chat id=\S+ client=\S+ .*completion=(\d+) .*"
                                 r"cancelled=client_disconnected")  # fmt: skip
    assert int(line.group(1)) < 2000
    assert probe(http)  # the engine is free again


def test_health_is_fast_during_a_long_generation(server: RunningServer) -> None:
    body = {"model": "smollm2", "messages": HI, "max_tokens": 400, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body, headers=AUTH,
                      timeout=60) as stream:  # fmt: skip
        lines = stream.iter_lines()
        tokens = 0
        for line in lines:
            if line.startswith("data: ") and '"content"' in line:
                tokens += 1
                if tokens >= 3:
                    break
        slowest = 0.0
        for method in ("GET", "HEAD") * 5:
            start = time.monotonic()
            r = httpx.request(method, f"{server.root}/health", timeout=5)
            slowest = max(slowest, time.monotonic() - start)
            assert r.status_code == 200
        assert slowest < HEALTH_BOUND, f"/health took {slowest:.3f}s during generation"
    # The stream was abandoned: its end is logged as a cancellation too.
    _wait_for_log(server, r"completion=\d+ .*finish=cancelled cancelled=client_disconnected")


def test_huge_prompt_is_refused_without_stalling(server: RunningServer, http: httpx.Client) -> None:
    """20 MB of prompt: refused as too long for the context, and /health answers meanwhile."""
    body = {"model": "smollm2", "max_tokens": 1,
            "messages": [{"role": "user", "content": "word " * 4_000_000}]}  # fmt: skip
    result: dict[str, httpx.Response] = {}
    worker = threading.Thread(target=lambda: result.update(r=chat(http, body)))
    worker.start()
    slowest = 0.0
    while worker.is_alive():
        start = time.monotonic()
        assert httpx.get(f"{server.root}/health", timeout=5).status_code == 200
        slowest = max(slowest, time.monotonic() - start)
        time.sleep(0.05)
    worker.join()
    assert result["r"].status_code == 400
    assert result["r"].json()["error"]["code"] == "context_length_exceeded"
    assert slowest < HEALTH_BOUND, f"/health took {slowest:.3f}s while a 20 MB prompt was handled"


# ---- fuzzing ----------------------------------------------------------------------------------

NUMBER = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.5, 2, 2**63, 2**64, 1e308, -1e-308]),
    st.none(),
    st.booleans(),
    st.text(max_size=3),
)
TEXT = st.one_of(
    st.text(max_size=16),
    st.sampled_from(["\ud800", "a\udfffb", "<|im_end|>", "<tool_call>", "{{ x }}", "\x00", ""]),
)
JSONISH = st.recursive(
    st.none() | st.booleans() | NUMBER | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "input_text", "image_url"]), "text": TEXT}
)
CALL = st.fixed_dictionaries(
    {"type": st.just("function"),
     "function": st.fixed_dictionaries({"name": TEXT, "arguments": st.one_of(TEXT, JSONISH)})}
)  # fmt: skip
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "bogus"]),
     "content": st.one_of(TEXT, st.none(), st.lists(PART, max_size=2), NUMBER)},
    optional={"name": TEXT, "tool_call_id": TEXT, "tool_calls": st.lists(CALL, max_size=2)},
)  # fmt: skip
SCHEMA = st.one_of(
    st.just({"type": "object", "properties": {"city": {"type": "string"}}}),
    st.dictionaries(st.sampled_from(["type", "properties", "required", "items", "enum", "$ref"]),
                    JSONISH, max_size=3),
)  # fmt: skip
TOOL = st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "other"]),
     "function": st.fixed_dictionaries({"name": st.sampled_from(["get_weather", "f", ""]),
                                        "parameters": SCHEMA})}
)  # fmt: skip
FIELDS = {
    "temperature": NUMBER, "top_p": NUMBER, "top_k": NUMBER, "min_p": NUMBER, "seed": NUMBER,
    "presence_penalty": NUMBER, "frequency_penalty": NUMBER, "repetition_penalty": NUMBER,
    "logit_bias": st.dictionaries(st.one_of(st.integers(-10, 2**70).map(str), TEXT), NUMBER,
                                  max_size=3),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=20), NUMBER),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), JSONISH),
    "tools": st.lists(TOOL, max_size=2),
    "tool_choice": st.one_of(
        st.sampled_from(["auto", "none", "required", "bogus"]),
        st.fixed_dictionaries({"type": st.just("function"),
                               "function": st.fixed_dictionaries(
                                   {"name": st.sampled_from(["get_weather", "nope"])})}),
    ),
    "parallel_tool_calls": st.one_of(st.booleans(), NUMBER),
    "chat_template_kwargs": st.dictionaries(TEXT, JSONISH, max_size=2),
    "reasoning_effort": st.one_of(st.sampled_from(["none", "low", "high"]), TEXT),
    "keep_alive": st.sampled_from(["5m", -1, "x", 10**30, "1e5", "-5m", 3.5, None, 2**64, "1h"]),
    "n": NUMBER, "logprobs": st.one_of(st.booleans(), NUMBER), "top_logprobs": NUMBER,
    "response_format": st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}), JSONISH),
    "user": TEXT, "metadata": JSONISH, "ignore_eos": st.booleans(),
    "max_completion_tokens": st.sampled_from([1, 2, 0, -1, 2**64, "2", 1.5]),
}  # fmt: skip
REQUEST = st.fixed_dictionaries(
    {
        # Never "auto": it may pick (and start loading) another configured model.
        "model": st.sampled_from(["smollm2", "smollm2-135m", "nope", ""]),
        "messages": st.lists(MESSAGE, max_size=3),
        # Always bounded: the default (1024 tokens) would make the fuzz minutes long.
        "max_tokens": st.sampled_from([1, 2, 0, -1, 2**70, "1", 1.5]),
    },
    optional=FIELDS,
)
# Valid requests with extreme but legal values: these reach the model and the sampler.
VALID_TOOL = st.fixed_dictionaries(
    {"type": st.just("function"),
     "function": st.fixed_dictionaries({"name": st.sampled_from(["get_weather", "lookup"]),
                                        "parameters": SCHEMA.filter(lambda s: "$ref" not in s)})}
)  # fmt: skip
VALID = st.fixed_dictionaries(
    {
        "model": st.just("smollm2"),
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                   "content": st.text(max_size=40)}),
            min_size=1, max_size=3,
        ),
        "max_tokens": st.sampled_from([1, 2]),
    },
    optional={
        "temperature": st.floats(0, 2), "top_p": st.floats(1e-9, 1), "min_p": st.floats(0, 1),
        "top_k": st.integers(-1, 2**40), "seed": st.integers(-1, 2**64 - 1),
        "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(1e-9, 1e9),
        "logit_bias": st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100),
                                      max_size=5),
        "stop": st.lists(st.text(min_size=1, max_size=8), max_size=4),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "ignore_eos": st.booleans(),
        "tools": st.lists(VALID_TOOL, min_size=1, max_size=2),
        "tool_choice": st.sampled_from(["auto", "none", "required"]),
        "chat_template_kwargs": st.dictionaries(st.sampled_from(["enable_thinking", "x"]),
                                                st.booleans(), max_size=2),
        "keep_alive": st.sampled_from(["5m", -1, "1h"]),
    },
)  # fmt: skip
BODY = st.one_of(VALID, VALID, REQUEST, REQUEST, st.binary(max_size=40), JSONISH)


def send(http: httpx.Client, body: Any) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post("/v1/chat/completions", content=data,
                  headers={"content-type": "application/json"})  # fmt: skip
    FIGURES["requests"] += 1
    by = FIGURES["by_status"]
    by[r.status_code] = by.get(r.status_code, 0) + 1
    if r.status_code >= 500:
        FIGURES["status_5xx"] += 1
    broken_stream = False
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        payloads = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        broken_stream = payloads[-1:] != ["[DONE]"] or any('"error"' in p[:20] for p in payloads)
        FIGURES["in_stream_errors"] += broken_stream
    assert r.status_code < 500, (body, r.text)
    assert not broken_stream, (body, r.text)


@pytest.mark.parametrize("batch", range(3))
def test_fuzz_every_field(
    server: RunningServer, http: httpx.Client, baseline: str, batch: int
) -> None:
    """No input gives a 5xx, an in-stream error, a crash, a hang (60 s client timeout), or a
    change in the greedy probe's output."""
    assert probe(http) == baseline

    @settings(max_examples=70, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(BODY)
    def one(body: Any) -> None:
        send(http, body)

    one()
    if server.process.poll() is not None:
        FIGURES["crashes"] += 1
    assert server.process.poll() is None
    assert probe(http) == baseline
    print(f"\nfuzz figures after batch {batch}: {json.dumps(FIGURES)}")


# ---- SIGTERM ------------------------------------------------------------------------------------


def test_sigterm_drains_then_ends_streams_with_done(smollm2_dir: Path, tmp_path: Path) -> None:
    """A short stream finishes in full; a long one is ended at the drain timeout with a final
    chunk and [DONE]; a non-streaming one queued behind it gets a JSON error; the process exits."""
    args = ["--config", str(REPO_ROOT / "models.yaml"), "--drain-timeout", "8"]
    with run_server(args, tmp_path / "mlxd.log") as srv:
        url = f"{srv.url}/chat/completions"
        out: dict[str, Any] = {}

        def stream(name: str, max_tokens: int, started: threading.Event) -> None:
            body = {"model": "smollm2", "messages": HI, "max_tokens": max_tokens,
                    "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            payloads = []
            with httpx.stream("POST", url, json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        payloads.append(line[6:])
                        if '"content":"' in line and '"content":""' not in line:
                            started.set()  # a token arrived, not just the role chunk
            out[name] = payloads

        def plain() -> None:
            body = {"model": "smollm2", "messages": HI, "max_tokens": 3000, "ignore_eos": True}
            out["plain"] = httpx.post(url, json=body, timeout=120)

        short_started, long_started = threading.Event(), threading.Event()
        threads = [threading.Thread(target=stream, args=("short", 6, short_started))]
        threads[0].start()
        # The first request loads the model: /health must not wait for that either.
        states, slowest = set(), 0.0
        while not short_started.is_set():
            start = time.monotonic()
            assert httpx.get(f"{srv.root}/health", timeout=5).status_code == 200
            slowest = max(slowest, time.monotonic() - start)
            models = httpx.get(f"{srv.url}/models", timeout=5).json()["data"]
            states |= {m["status"] for m in models if m["id"] == "smollm2"}
            time.sleep(0.05)
        assert "loading" in states
        assert slowest < HEALTH_BOUND, f"/health took {slowest:.3f}s during a model load"
        threads.append(threading.Thread(target=stream, args=("long", 3000, long_started)))
        threads.append(threading.Thread(target=plain))
        threads[1].start()
        time.sleep(0.3)
        threads[2].start()
        time.sleep(0.5)
        signal_at = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=90)
        srv.process.wait(timeout=60)
        took = time.monotonic() - signal_at

    short = [json.loads(p) for p in out["short"][:-1]]
    assert out["short"][-1] == "[DONE]"
    assert short[-1]["usage"]["completion_tokens"] == 6  # finished in full during the drain
    long = out["long"]
    assert long[-1] == "[DONE]"
    finals = [json.loads(p) for p in long[:-1]]
    ends = [c["choices"][0]["finish_reason"] for c in finals if c["choices"]]
    assert ends[-1] == "length"
    assert finals[-1]["usage"]["completion_tokens"] < 3000
    plain_reply = out["plain"]
    assert plain_reply.status_code == 503
    assert plain_reply.json()["error"]["code"] == "server_shutdown"
    assert took < 8 + 30
