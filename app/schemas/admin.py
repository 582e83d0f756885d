"""The admin API's objects as it returns them: teams with their quotas, API keys, audit
entries (the bodies it takes are beside its routes, app/api/admin.py)."""

from __future__ import annotations

from typing import Any, Literal

from app import models
from app.schemas.common import ApiObject


class TeamQuotas(ApiObject):
    """The team's own limits; null: the deployment's default (docs/admin.md)."""

    max_running_jobs: int | None
    max_queued_jobs: int | None
    max_file_bytes: int | None
    gpu_hours_per_month: float | None


class Team(ApiObject):
    id: str
    object: Literal["team"] = "team"
    name: str
    weight: float
    disabled: bool
    created_at: int
    quotas: TeamQuotas


class TeamCreated(Team):
    key: str  # the team's first API key, shown once


def team_object(team: models.Team) -> Team:
    return Team(
        id=team.id,
        name=team.name,
        weight=team.weight,
        disabled=team.disabled,
        created_at=team.created_at,
        quotas=TeamQuotas.model_validate(team),  # the team's own columns
    )


def created_team_object(team: models.Team, key: str) -> TeamCreated:
    return TeamCreated(**team_object(team).model_dump(), key=key)


class ApiKey(ApiObject):
    id: str | None
    object: Literal["api_key"] = "api_key"
    prefix: str  # the key's first characters, to recognise it by
    created_at: int
    revoked_at: int | None


class ApiKeyCreated(ApiKey):
    key: str  # shown once, at creation or rotation


def key_object(key: models.ApiKey) -> ApiKey:
    return ApiKey.model_validate(key)


def created_key_object(key: models.ApiKey, clear: str) -> ApiKeyCreated:
    return ApiKeyCreated(**key_object(key).model_dump(), key=clear)


class AuditEntry(ApiObject):
    id: str
    object: Literal["audit_entry"] = "audit_entry"
    created_at: int
    actor: str
    action: str  # "team.create", "key.rotate", "worker.drain", ... (docs/admin.md)
    target: str | None
    details: dict[str, Any] | None


def audit_object(entry: models.AuditEntry) -> AuditEntry:
    return AuditEntry.model_validate(entry)
