"""Request log lines: the text line and ``--log-format json`` carry the same request record."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

import httpx
import pytest

from mlxd.logfmt import REQUEST_FIELD, JsonFormatter
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

Client = Callable[..., httpx.AsyncClient]


async def test_one_record_per_request_in_both_formats(
    make_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(FakeEngine())
    with caplog.at_level(logging.INFO, logger="mlxd.chat"):
        r = await client.post("/v1/chat/completions",
                              json={"model": "alpha", "messages": [{"role": "user",
                                                                    "content": "Hi"}]})  # fmt: skip
    body = r.json()
    [record] = [rec for rec in caplog.records if hasattr(rec, REQUEST_FIELD)]
    assert record.getMessage().startswith(f"chat id={body['id']} client=")
    assert " model=alpha " in record.getMessage()
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "request" and line["id"] == body["id"]
    assert line["api"] == "openai" and line["model"] == "alpha"
    assert line["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == 3 and line["cached_tokens"] == 0
    assert line["finish"] == "stop" and line["ttft_ms"] >= 0 and line["tok_s"] >= 0
    assert "message" not in line


def test_other_lines_are_json_objects_too() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("mlxd.x", logging.ERROR, __file__, 1, "failed %s", ("once",),
                                   sys.exc_info())  # fmt: skip
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "error" and line["logger"] == "mlxd.x"
    assert line["message"] == "failed once" and "ValueError: boom" in line["exception"]
