"""Typed API errors, raised by services; app/api/error_handlers.py renders them."""

from __future__ import annotations


class APIError(Exception):
    status_code = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class BadRequest(APIError):
    pass


class Unauthorized(APIError):
    status_code = 401
    type = "authentication_error"


class NotFound(APIError):
    status_code = 404


class Conflict(APIError):
    status_code = 409


class PayloadTooLarge(APIError):
    status_code = 413
