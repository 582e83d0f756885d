"""Typed FastAPI dependencies of the API: the caller's team or admin key from its Bearer
header, the Idempotency-Key header; the session, settings and store come from app.http_deps."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import Forbidden, Unauthorized, invalid_api_key, team_disabled
from app.http_deps import SessionDep, SettingsDep, StoreDep  # noqa: F401 (the routes' import)
from app.logs import bind
from app.models import AdminKey, Team
from app.services.admin_keys import admin_for_key
from app.services.idempotency import KEY_PATTERN
from app.services.teams import bearer_key, team_for_key

# Retries of a POST with the same key return the first result (app.services.idempotency).
# The pattern is documented here and checked there (400 invalid_idempotency_key).
IdempotencyKeyDep = Annotated[
    str | None,
    Header(alias="Idempotency-Key", json_schema_extra={"pattern": KEY_PATTERN.pattern}),
]


# The schemes put the keys in the OpenAPI document (and the docs' Authorize button); they
# never refuse a request themselves: current_team and current_admin read and check the key.
TeamBearer = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(
        HTTPBearer(
            scheme_name="TeamKey",
            description="A team's API key: `Authorization: Bearer <key>`",
            auto_error=False,
        )
    ),
]
AdminBearer = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(
        HTTPBearer(
            scheme_name="AdminKey",
            description="An admin key (`lathe admin create-admin-key NAME`)",
            auto_error=False,
        )
    ),
]


def current_team(request: Request, session: SessionDep, _bearer: TeamBearer) -> Team:
    key = bearer_key(request.headers.get("authorization"))
    if key is None:
        raise Unauthorized(
            "missing or malformed API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
        )
    team = team_for_key(session, key)
    if team is None:
        raise invalid_api_key()
    bind(team_id=team.id)  # on this request's log lines from here on (app/logs.py)
    if team.disabled:
        raise team_disabled(team.name)
    session.commit()  # the lookup's transaction ends here: its connection goes back at once
    return team


TeamDep = Annotated[Team, Depends(current_team)]


def current_admin(request: Request, session: SessionDep, _bearer: AdminBearer) -> AdminKey:
    """The caller's admin key; a team key is refused (403), a missing or unknown one 401."""
    key = bearer_key(request.headers.get("authorization"))
    if key is None:
        raise Unauthorized(
            "missing or malformed admin key: send 'Authorization: Bearer <admin key>'",
            code="missing_api_key",
        )
    admin = admin_for_key(session, key)
    if admin is not None:
        session.commit()  # as in current_team: the connection goes back at once
        return admin
    if team_for_key(session, key) is not None:
        raise Forbidden(
            "this is a team API key; the admin API needs an admin key "
            "(lathe admin create-admin-key NAME)",
            code="admin_key_required",
        )
    raise Unauthorized("invalid or revoked admin key", code="invalid_api_key")


AdminDep = Annotated[AdminKey, Depends(current_admin)]
