"""Log output: one line per event, as text for people or as JSON objects for log collectors.

Events that operators follow (login, logout, session end, resets, reservation changes, copy
start and end, reloads) are logged at INFO with their subject in `extra` fields (initiator,
target, LUN...). The JSON format carries those fields as keys; the text format carries them in
the message. A filter masks anything that looks like a CHAP secret or response, in case a
message ever quotes login keys.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
# `extra` keys copied into JSON records, in this order.
FIELDS = ("event", "initiator", "target", "lun", "tsih", "isid", "portal", "peer", "list_id",
          "operation", "outcome", "bytes", "reason", "changes", "uid")
_SECRET = re.compile(r"\b(CHAP_[CRN]|[A-Za-z_]*secret|[A-Za-z_]*password)"
                     r"(\s*[=:]\s*)(\"[^\"]*\"|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the values of CHAP_C/CHAP_R/CHAP_N, *secret and *password keys masked."""
    return _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}<redacted>", text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, RFC 3339), level, logger, message, event fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(doc, default=str)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send the log to stderr at `level` in `fmt` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
