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


class Forbidden(APIError):
    status_code = 403
    type = "permission_error"


class QuotaError(APIError):
    """A team quota refuses the request: 429 for limits that free up as jobs end (jobs
    waiting or running), 403 for those that do not (GPU hours this month, dataset size)."""

    type = "insufficient_quota"
    TRANSIENT = ("max_queued_jobs", "max_running_jobs")

    def __init__(self, exceeded) -> None:  # app.domain.quotas.QuotaExceeded
        super().__init__(exceeded.message, code="quota_exceeded", param=exceeded.limit)
        self.status_code = 429 if exceeded.limit in self.TRANSIENT else 403


def invalid_api_key() -> Unauthorized:
    """A team key that matches no live key; also how an open event stream ends for it."""
    return Unauthorized("invalid or revoked API key", code="invalid_api_key")


def team_disabled(team_name: str) -> Forbidden:
    """The key's team is disabled; also how an open event stream ends for it."""
    return Forbidden(f"team {team_name} is disabled; ask an administrator", code="team_disabled")
