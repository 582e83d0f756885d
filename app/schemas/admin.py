"""The admin API's bodies (a team created or changed, its quotas, a job's preemption mark)
and its objects as it returns them: teams with their quotas, API keys, audit entries."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints
from pydantic.json_schema import SkipJsonSchema

from app import models
from app.domain.quotas import MAX_WEIGHT, QUOTA_MAXIMA
from app.schemas.common import ApiObject, Strict

TeamName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
Weight = Annotated[float, Field(gt=0, le=MAX_WEIGHT, allow_inf_nan=False)]


def _at_most(name: str) -> Any:
    """0 to the quota's maximum (app.domain.quotas.QUOTA_MAXIMA), finite: in the document
    too, so a client learns the bounds before it sends Infinity or 1e26."""
    return Field(ge=0, le=QUOTA_MAXIMA[name])


class QuotasIn(Strict):
    """A team's own limits; null (or absent on creation) takes the deployment default."""

    max_running_jobs: Annotated[int, _at_most("max_running_jobs")] | None = None
    max_queued_jobs: Annotated[int, _at_most("max_queued_jobs")] | None = None
    max_file_bytes: Annotated[int, _at_most("max_file_bytes")] | None = None
    gpu_hours_per_month: (
        Annotated[float, _at_most("gpu_hours_per_month"), Field(allow_inf_nan=False)] | None
    ) = None


class TeamCreate(Strict):
    name: TeamName
    weight: Weight = 1.0
    quotas: QuotasIn | None = None


def _no_default(schema: dict) -> None:
    schema.pop("default", None)


def not_null():
    """May be absent, but not null, says the document. A null still parses, and the service
    refuses it (400) in the same words as a bad value."""
    return Field(None, json_schema_extra=_no_default)


class TeamUpdate(Strict):
    """Fields sent are set, absent ones kept; a quota sent as null clears it."""

    weight: Weight | SkipJsonSchema[None] = not_null()
    disabled: bool | SkipJsonSchema[None] = not_null()
    # False: the scheduler never preempts the team's jobs (docs/scheduling.md).
    preemptible: bool | SkipJsonSchema[None] = not_null()
    quotas: QuotasIn | None = None

    def changes(self) -> dict:
        # weight, disabled or preemptible sent as null is passed on, for the service to refuse.
        fields = {
            name: getattr(self, name)
            for name in {"weight", "disabled", "preemptible"} & self.model_fields_set
        }
        if self.quotas is not None:
            fields.update(
                {name: getattr(self.quotas, name) for name in self.quotas.model_fields_set}
            )
        return fields


class JobUpdate(Strict):
    """An administrator's mark on any team's job: false, the scheduler never preempts it
    for another team's (its team's own mark applies too)."""

    preemptible: bool


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
    preemptible: bool  # false: its jobs are never preempted
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
        preemptible=team.preemptible is not False,
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
