"""The operator's log: one line per record on stderr, JSON for a cluster's log collector or text for a person.

kopf sets up logging only in its own CLI (`kopf run`), which `kleinstyle operator` does not use: without this, the
operator writes nothing at all. kopf hands each handler a per-object logger (`kopf.ObjectLogger`, an adapter on
`kopf.objects`) whose records carry `k8s_ref` (the object's apiVersion, kind, name, uid, namespace); both formats
name that object, so a line about a resource says which one, whether kleinstyle or kopf wrote it. The records go
to the root logger, so kopf's, aiohttp's and kleinstyle's lines all come out in the same format.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

LEVEL_ENV = "KLEINSTYLE_LOG_LEVEL"
FORMAT_ENV = "KLEINSTYLE_LOG_FORMAT"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("json", "text")
# One line per liveness probe at INFO: shown only when debugging.
QUIETER = ("aiohttp.access",)


def routine(record: logging.LogRecord) -> bool:
    """kopf's INFO line for every handler that succeeded: with a wake-up handler per watch event, one line per
    change of every child, which says nothing a failure line would not. Shown only when debugging."""
    return record.name == "kopf.objects" and record.levelno == logging.INFO and str(record.msg).endswith(" succeeded.")


def object_of(record: logging.LogRecord) -> dict[str, str]:
    """The namespace, kind and name of the object a record is about (from kopf's per-object logger), if any."""
    ref = getattr(record, "k8s_ref", None) or {}
    return {key: str(ref[key]) for key in ("namespace", "kind", "name") if ref.get(key)}


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the object's namespace, kind and name when the
    record is about one, and the traceback (`exception`) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": _time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **object_of(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [namespace/kind/name] message`, then the traceback on the lines below."""

    def format(self, record: logging.LogRecord) -> str:
        where = "/".join(object_of(record).values())
        about = f" [{where}]" if where else ""
        text = f"{_time(record)} {record.levelname} {record.name}{about}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


FORMATTERS: dict[str, type[logging.Formatter]] = {"json": JsonFormatter, "text": TextFormatter}


class _Handler(logging.StreamHandler[TextIO]):
    """The handler `setup` installs, told apart from others' so that a second call replaces it."""


def setup(level: str = "INFO", fmt: str = "json", stream: TextIO | None = None) -> logging.Handler:
    """Write every record at `level` or above to `stream` (default: stderr at the time of writing) in `fmt`;
    replaces the handler an earlier call installed, so no line is ever written twice. Returns the handler."""
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(FORMATTERS[fmt]())
    if level != "DEBUG":
        handler.addFilter(lambda record: not routine(record))
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _Handler)]
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIETER:
        logging.getLogger(name).setLevel(logging.NOTSET if level == "DEBUG" else logging.WARNING)
    return handler
