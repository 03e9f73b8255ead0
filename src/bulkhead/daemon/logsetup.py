"""The daemon's structured logs: the standard `logging` module, one line per event, to stderr.

Under systemd, stderr is the journal (bulkhead.service sets StandardError=journal), so nothing here
talks to journald directly. Each line is logfmt (`key=value`, values with spaces or quotes quoted), or one
JSON object with `--log-format json`:

    ts=2026-12-03T12:00:00.123Z level=info logger=bulkhead.request event=request principal=admin
      method=GET route=/v1/vms/{vm_id} status=200 latency_ms=1.42 request_id=...

Loggers: `bulkhead.request` (one line per API request: docs/API.md "Logs and metrics"; this replaces
uvicorn's access log, which stays off) and `bulkhead.lifecycle` (daemon start/ready/stop, VM state
changes). Log lines are diagnostics; the audit log (docs/AUDIT.md) stays the record of what happened.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, TextIO

__all__ = ["LOG_FORMATS", "JsonFormatter", "LogfmtFormatter", "configure", "lifecycle", "request_logger"]

LOG_FORMATS = ("logfmt", "json")
_ROOT = "bulkhead"
_HANDLER_MARK = "_bulkhead_handler"


def _ts(record: logging.LogRecord) -> str:
    t = dt.datetime.fromtimestamp(record.created, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"ts": _ts(record), "level": record.levelname.lower(), "logger": record.name,
                           "event": record.getMessage()}
    extra = getattr(record, "fields", None)
    if isinstance(extra, dict):
        out.update(extra)
    if record.exc_info and record.exc_info[0] is not None:
        out["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
    return out


def _logfmt_value(v: Any) -> str:
    if v is None:
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.3f}"
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(",", ":"))
    s = s.replace("\n", "\\n").replace("\r", "\\r")
    if s == "" or any(c in s for c in ' "=\\'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


class LogfmtFormatter(logging.Formatter):
    """One `key=value` line per record (no newline inside a line: a guest-chosen name cannot forge one)."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), sort_keys=False, default=str)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """To whatever sys.stderr is when a record is written (not the stream of the moment of configure)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure(fmt: str = "logfmt", level: str = "info", stream: TextIO | None = None) -> logging.Logger:
    """Install one handler on the `bulkhead` logger (idempotent: a second call replaces it). Returns it."""
    if fmt not in LOG_FORMATS:
        from bulkhead.errors import ConfigError

        raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
    root = logging.getLogger(_ROOT)
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.propagate = False
    return root


def request_logger() -> logging.Logger:
    return logging.getLogger(f"{_ROOT}.request")


def lifecycle(event: str, **fields: Any) -> None:
    """One lifecycle line (`bulkhead.lifecycle`): daemon start/ready/stop, VM state changes."""
    logging.getLogger(f"{_ROOT}.lifecycle").info(event, extra={"fields": fields})
