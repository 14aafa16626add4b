"""Logging set-up for every taskloom process: text for people, JSON for machines.

Code that works on one task or one attempt binds it (``bind(task_id=...)``,
``bind_attempt(ref)``); every record logged inside carries those ids, and the
current OpenTelemetry span's trace and span ids, in the JSON output as fields,
in the text output as a ``[task/subtask#attempt]`` prefix. Records carry no
secrets: settings never log keys or passwords and Redis URLs are logged
without their password.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any

from opentelemetry import trace

from taskloom.core.model import AttemptRef

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(where)s%(message)s"
CONTEXT_FIELDS = ("task_id", "subtask_id", "attempt", "worker", "trace_id", "span_id")

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "taskloom_log_context", default=None
)


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (task_id, subtask_id, ...) to every record logged inside."""
    token = _context.set({**(_context.get() or {}), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


def bind_attempt(ref: AttemptRef) -> contextlib.AbstractContextManager[None]:
    return bind(task_id=ref.task_id, subtask_id=ref.subtask_id, attempt=ref.attempt)


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record (and a text prefix as ``where``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = dict(_context.get() or {})
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            context.setdefault("trace_id", f"{span.trace_id:032x}")
            context.setdefault("span_id", f"{span.span_id:016x}")
        for name in CONTEXT_FIELDS:
            setattr(record, name, context.get(name, getattr(record, name, "")))
        where = ""
        if context.get("task_id"):
            where = str(context["task_id"])
            if context.get("subtask_id"):
                where += f"/{context['subtask_id']}"
                if context.get("attempt"):
                    where += f"#{context['attempt']}"
            where = f"[{where}] "
        record.where = where
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the bound ids."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, "")
            if value:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(
    level: str = "INFO", log_format: str = "text", stream: IO[str] | None = None
) -> None:
    """Log to ``stream`` (stderr) at ``level`` as ``text`` or ``json``; quiet the
    chattiest libraries."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JSONFormatter() if log_format == "json" else logging.Formatter(FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for noisy in ("httpx", "httpcore", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


class _GrpcMetadataFilter(logging.Filter):
    """grpc logs a metadata value that is not UTF-8 at ERROR, value and all:
    a mistyped token is still someone's secret, and anyone can send such
    values, as often as they like. Each such record becomes one line without
    the value, at most once per ``every`` seconds (with a count)."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every = every
        self._last = -every
        self._hidden = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Invalid encoding"):
            return True
        now = record.created
        if now - self._last < self.every:
            self._hidden += 1
            return False
        record.msg = (
            "a call's metadata held a value that is not UTF-8 (not shown: it may be a "
            f"secret); {self._hidden} more since the last report"
        )
        record.args = ()
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self._last, self._hidden = now, 0
        return True


def hide_grpc_metadata() -> None:
    """Install the filter above on grpc's logger (once per process)."""
    grpc_logger = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _GrpcMetadataFilter) for f in grpc_logger.filters):
        grpc_logger.addFilter(_GrpcMetadataFilter())
