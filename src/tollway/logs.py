"""Log output for ``tollway serve``: readable text (default) or one JSON object per line
(``TOLLWAY_LOG_FORMAT=json``) for log collectors.

Every record goes through one formatter per format, uvicorn's own included. The access log
(``tollway.access``, see ``runtime.observe``) carries the request id, route, status, duration,
account, product and cost as fields; nothing the gateway logs contains a header, a body, a key
or a token, so secrets cannot leak through the log.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

#: The attributes every LogRecord has; anything else on a record came in ``extra``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime",
                                                             "color_message", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and v is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage(), **_extras(record)}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``LEVEL:    message key=value …`` (uvicorn's layout, with the record's fields)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _extras(record)
        for shown in ("method", "route", "status", "duration_ms"):  # already in the message
            fields.pop(shown, None)
        line = f"{record.levelname + ':':<9} {record.getMessage()}"
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def log_config(fmt: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn (applied in every worker process)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"TOLLWAY_LOG_FORMAT must be text or json, got {fmt!r}")
    formatter = f"{__name__}.{'JsonFormatter' if fmt == 'json' else 'TextFormatter'}"
    handler = {"class": "logging.StreamHandler", "formatter": "default",
               "stream": "ext://sys.stderr"}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"default": {"()": formatter}},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "tollway": {"handlers": ["default"], "level": "INFO", "propagate": False},
        },
    }
