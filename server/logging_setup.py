"""Process-wide logging for `ggserve`: one handler on stderr, text or JSON lines.

Owns: `configure_logging(verbose, log_format)` and the two formatters. Every logger (ggserve's
own, the access log, uvicorn's, warnings) propagates to the root handler, so with
`--log-format json` every line is one JSON object: {"ts", "level", "logger", "msg", ...fields}.
Structured fields ride on a record as `extra={"fields": {...}}`; the text format shows the
message alone (the access log puts its fields in the message), the JSON format adds the fields
as top-level keys.
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import TextIO

# numba logs bytecode and IR at DEBUG: megabytes per compiled kernel, useless in a server log
QUIET_LOGGERS = ("numba",)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; the record's `fields` dict is merged in at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=timezone.utc)
        entry = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`2026-01-02 03:04:05.678 INFO ggserve.server: message` (UTC, milliseconds)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, tz=timezone.utc).strftime(datefmt or "%Y-%m-%d %H:%M:%S")


def configure_logging(verbose: bool = False, log_format: str = "text", stream: TextIO | None = None) -> None:
    """Route every logger to one stderr handler; INFO by default, DEBUG with --verbose."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', got {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # uvicorn's loggers: no handlers of their own (log_config=None), so they reach ours
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    logging.captureWarnings(True)
