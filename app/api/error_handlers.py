"""Exception handlers: every error leaves the API in OpenAI's one JSON envelope; and the
OpenAPI document says so (error_responses, declared on the routers)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import APIError

log = logging.getLogger(__name__)


def envelope(status: int, message: str, type_: str, code: str | None, param: str | None):
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": type_, "param": param, "code": code}},
    )


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """Every error the API returns: OpenAI's envelope."""

    error: ErrorDetail


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer"},
    }
}
_ERRORS: dict[int, dict[str, Any]] = {
    400: {"description": "Invalid request: a parameter, header or body field is malformed"},
    401: {"description": "Missing, invalid or revoked API key"},
    403: {
        "description": "Disabled team, admin key required, or a quota that does not free "
        "up by itself (GPU hours this month, file size)"
    },
    404: {"description": "No such object (for this team)"},
    409: {
        "description": "The object's state forbids it, or a request with the same "
        "Idempotency-Key is still in progress"
    },
    413: {"description": "The upload is larger than the deployment's limit"},
    422: {"description": "Idempotency-Key reused with a different request"},
    429: {
        "description": "Rate limit, or a job quota that frees up as jobs end",
        "headers": _RETRY_AFTER,
    },
    503: {"description": "The database is unavailable; retry", "headers": _RETRY_AFTER},
}
# What any /v1 route may answer: a bad parameter or key, a refusal, an unknown id, the rate
# limit, the database down. Routes add the others they can give (409, 413, 422).
COMMON_ERRORS = (400, 401, 403, 404, 429, 503)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a router or route: these statuses, with the error envelope."""
    return {status: {"model": ErrorEnvelope, **_ERRORS[status]} for status in statuses}


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


def _document_validation_as_400(app: FastAPI) -> None:
    """Drop the 422 "Validation Error" FastAPI adds to every route with parameters: request
    validation answers 400 with the envelope (below), which the routes declare."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                responses = operation.get("responses", {})
                ref = responses.get("422", {}).get("content", {}).get("application/json", {})
                if ref.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                    del responses["422"]
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            if f'"#/components/schemas/{name}"' not in json.dumps(schema):
                components.pop(name, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    _document_validation_as_400(app)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return envelope(exc.status_code, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":  # loc is ("body", <offset>): no parameter
            reason = (first.get("ctx") or {}).get("error", "")
            message = f"the request body is not valid JSON: {reason}".rstrip(": ")
            return envelope(400, message, "invalid_request_error", "invalid_json", None)
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
