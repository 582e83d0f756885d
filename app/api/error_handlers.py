"""Exception handlers: every error leaves the API in OpenAI's one JSON envelope."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import APIError

log = logging.getLogger(__name__)


def envelope(status: int, message: str, type_: str, code: str | None, param: str | None):
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": type_, "param": param, "code": code}},
    )


IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _loc_to_param(loc: tuple) -> str | None:
    """("body", "hyperparameters", "n_epochs", "constrained-int") -> "hyperparameters.n_epochs".

    Union members (constrained-int, literal['auto']) and the request part are dropped.
    """
    parts = [
        str(p)
        for p in loc[1:]
        if isinstance(p, int) or (isinstance(p, str) and IDENTIFIER.match(p))
    ]
    return ".".join(parts) or (str(loc[-1]) if loc else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return envelope(exc.status_code, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = _loc_to_param(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        return envelope(400, message, "invalid_request_error", "invalid_value", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return envelope(exc.status_code, str(exc.detail), "invalid_request_error", code, None)

    @app.exception_handler(DataError)
    async def _data_error(_: Request, exc: DataError):
        # The database refused a value the client sent (a NUL byte in an id, say).
        reason = str(exc.orig).splitlines()[0] if exc.orig else "invalid value"
        return envelope(
            400,
            f"invalid value in request: {reason}",
            "invalid_request_error",
            "invalid_value",
            None,
        )

    async def _database_unavailable(_: Request, exc: Exception):
        # Postgres restarting or unreachable: a 503 the client can retry, not a 500. The
        # pool's pre-ping replaces dead connections, so the API recovers by itself.
        log.warning("database unavailable: %s", str(exc).splitlines()[0])
        response = envelope(
            503,
            "the database is unavailable; retry shortly",
            "server_error",
            "database_unavailable",
            None,
        )
        response.headers["Retry-After"] = "2"
        return response

    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(InterfaceError, _database_unavailable)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        return envelope(500, "internal server error", "server_error", None, None)
