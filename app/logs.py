"""Logging for `lathe serve`, `lathe worker`, `lathe scheduler` and the job process: text
for a terminal, or JSON (one object a line, python-json-logger) with LATHE_LOG_FORMAT=json.

Every record carries the ids of what it is about, where known, copied onto it by
`ContextFilter` from a context variable:

- `request_id`: the API request (the client's `X-Request-ID` when it sends a sane one, else
  a new one; returned as `X-Request-ID`);
- `team_id`: the authenticated team (set by app.api.deps.current_team);
- `job_id`: the job a request's path names, or the job a worker is running;
- `worker`: the worker's registry id (in `lathe worker` and its job processes).

The context holds one dict per request (or job run). FastAPI runs sync dependencies and
endpoints in threads, each with a *copy* of the request's context: a copy shares the dict,
so the team id that authentication adds in its thread is seen by the endpoint's thread and
by the access log line written when the response is sent.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTEXT_FIELDS = ("request_id", "team_id", "job_id", "worker")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_context: ContextVar[dict[str, str] | None] = ContextVar("lathe_log_context", default=None)
_process: dict[str, str] = {}  # fields of the whole process (the worker id)
access_log = logging.getLogger("lathe.access")


# --- The context ----------------------------------------------------------------------------


def bind(**fields: str | None) -> None:
    """Add fields to the current context (the request's or job's dict, seen by every copy
    of the context); None values are ignored."""
    values = {k: str(v) for k, v in fields.items() if v is not None}
    current = _context.get()
    if current is None:
        _context.set(values)
    else:
        current.update(values)


@contextmanager
def log_context(**fields: str | None) -> Iterator[dict[str, str]]:
    """A new context dict for a block (a request, a job run), on top of the current one."""
    values = {**(_context.get() or {}), **{k: str(v) for k, v in fields.items() if v is not None}}
    token = _context.set(values)
    try:
        yield values
    finally:
        _context.reset(token)


def set_process_fields(**fields: str | None) -> None:
    """Fields every record of this process carries (threads without the context too)."""
    _process.update({k: str(v) for k, v in fields.items() if v is not None})


def current_fields() -> dict[str, str]:
    return {**_process, **(_context.get() or {})}


class ContextFilter(logging.Filter):
    """Copies the context's ids onto each record (a value the call passed in `extra` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in current_fields().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


# --- Formatters and setup -------------------------------------------------------------------


# C0 and C1 controls (CR, LF, ESC for terminal sequences, NUL...), DEL, and the Unicode
# line and paragraph separators that some viewers break lines at.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """ "GET /a\\r\\nforged" for "GET /a\r\nforged": a client's bytes (a URL-encoded CR/LF
    in a path, a job id) can never start a line of their own in a text log."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class TextFormatter(logging.Formatter):
    """The plain format, with the context's ids appended: `... [team_id=... job_id=...]`.

    One record is one line: control characters in every field are escaped. A traceback
    keeps its lines, each indented, so none of them can pass for a record of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        ids = " ".join(
            f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if getattr(record, k, None)
        )
        return escape_controls(f"{line} [{ids}]" if ids else line)

    def format(self, record: logging.LogRecord) -> str:
        # logging.Formatter.format, but the traceback is formatted here each time: its
        # cached copy (record.exc_text) may have been made by another handler's formatter.
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info:
            text += "\n" + _indented(self.formatException(record.exc_info))
        elif record.exc_text:
            text += "\n" + _indented(record.exc_text)
        if record.stack_info:
            text += "\n" + _indented(self.formatStack(record.stack_info))
        return text


def _indented(text: str) -> str:
    return "\n".join("    " + escape_controls(part) for part in text.split("\n"))


def json_formatter() -> JsonFormatter:
    """{"time", "level", "logger", "message", the context's ids, any `extra` fields}."""
    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",  # ISO 8601, UTC
        # uvicorn passes an ANSI-coloured copy of its messages; not for a log pipeline.
        reserved_attrs=[*RESERVED_ATTRS, "color_message", "taskName"],
    )


def make_handler(
    log_format: str, stream: IO[str] | None = None, text_format: str = TEXT_FORMAT
) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(json_formatter() if log_format == "json" else TextFormatter(text_format))
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(
    log_format: str, level: int | str = logging.INFO, text_format: str = TEXT_FORMAT
) -> None:
    """One handler on the root logger, to stderr, in `log_format` ("text" or "json")."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(make_handler(log_format, text_format=text_format))
    root.setLevel(level)


def install_celery_logging(log_format: str) -> None:
    """`lathe worker`: with JSON, Celery's loggers go through `configure_logging` instead of
    Celery's own setup (a `setup_logging` receiver replaces it); text keeps Celery's."""
    if log_format != "json":
        return
    from celery.signals import setup_logging

    def _setup(loglevel: int | None = None, **_: object) -> None:
        configure_logging("json", level=loglevel or logging.INFO)

    setup_logging.connect(_setup, weak=False)


# --- The API: request context and access log -----------------------------------------------

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
QUIET_PATHS = ("/healthz", "/readyz", "/metrics")  # probes and scrapes: DEBUG, not INFO


def route_template(scope: Scope) -> str:
    """The path template the request matched ("/v1/files/{file_id}"), never the raw path:
    read from the route Starlette put in the scope, else (a request answered before routing,
    such as a 429) matched here; "unmatched" for a path no route has."""
    route = scope.get("route")
    if route is None and "app" in scope:
        for candidate in getattr(scope["app"], "routes", ()):
            match, _ = candidate.matches(scope)
            if match is not Match.NONE:
                route = candidate
                break
    return getattr(route, "path", None) or "unmatched"


class RequestContextMiddleware:
    """Pure ASGI: a log context per request (request id; the team id and the path's job id
    join it once known), the `X-Request-ID` response header, and one access log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        with log_context(request_id=request_id) as fields:
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                job_id = (scope.get("path_params") or {}).get("job_id")
                if job_id and "job_id" not in fields:
                    fields["job_id"] = str(job_id)[:64]
                quiet = scope["path"] in QUIET_PATHS and status < 500
                duration_ms = round((time.perf_counter() - started) * 1000, 1)
                access_log.log(
                    logging.DEBUG if quiet else logging.INFO,
                    "%s %s %d %.1f ms",
                    scope["method"],
                    scope["path"],
                    status,
                    duration_ms,
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": route_template(scope),
                        "status": status,
                        "duration_ms": duration_ms,
                    },
                )
