"""``--log-format json``: one JSON object per line, for log shippers and ``jq``.

A finished request is one object with its fields at the top level (``event: "request"``, id,
API, model, tokens, cached tokens, TTFT, tok/s, finish or cancel reason), taken from the
:class:`~server.observe.RequestRecord` the chat service attaches to its log line; every other
log line is ``{"time", "level", "logger", "message"}``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

REQUEST_FIELD = "mlxd_request"  # the ``extra=`` key carrying a request record's fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, timezone.utc)
        data: dict[str, object] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        request = getattr(record, REQUEST_FIELD, None)
        if isinstance(request, dict):
            data["event"] = "request"
            data.update(request)
        else:
            data["message"] = record.getMessage()
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)
