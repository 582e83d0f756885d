"""/v1/admin: teams, their keys and quotas, workers, any team's jobs, and the audit log.

Admin keys only (AdminDep); a team key gets 403 admin_key_required. Every change is
audited (app.services.audit).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from app import models
from app.api.deps import AdminDep, SessionDep
from app.api.error_handlers import COMMON_ERRORS, error_responses
from app.schemas.admin import (
    ApiKey,
    ApiKeyCreated,
    AuditEntry,
    JobUpdate,
    Team,
    TeamCreate,
    TeamCreated,
    TeamUpdate,
    audit_object,
    created_key_object,
    created_team_object,
    key_object,
    team_object,
)
from app.schemas.common import AuditCursor, ListPage, Period, TeamCursor, list_page
from app.schemas.jobs import FineTuningJob, job_object
from app.schemas.pool import UsageList, Worker, worker_object
from app.services import audit, job_admin, team_admin, team_keys, worker_drain
from app.services.usage import usage_for

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=error_responses(*COMMON_ERRORS))
CONFLICT = error_responses(409)
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("/teams", response_model=TeamCreated, responses=CONFLICT)
def create_team(body: TeamCreate, caller: AdminDep, session: SessionDep) -> TeamCreated:
    quotas = body.quotas.model_dump(include=body.quotas.model_fields_set) if body.quotas else {}
    team, key = team_admin.create_team(session, caller, body.name, body.weight, quotas)
    return created_team_object(team, key)


@router.get("/teams", response_model=ListPage[Team])
def list_teams(
    caller: AdminDep, session: SessionDep, limit: Limit = 20, after: TeamCursor = None
) -> ListPage[Team]:
    rows, has_more = team_admin.list_teams(session, limit, after)
    return list_page([team_object(t) for t in rows], has_more)


@router.get("/teams/{team_id}", response_model=Team)
def retrieve_team(team_id: str, caller: AdminDep, session: SessionDep) -> Team:
    return team_object(team_admin.get_team(session, team_id))


@router.patch("/teams/{team_id}", response_model=Team)
def update_team(team_id: str, body: TeamUpdate, caller: AdminDep, session: SessionDep) -> Team:
    return team_object(team_admin.update_team(session, caller, team_id, body.changes()))


@router.get("/teams/{team_id}/keys", response_model=ListPage[ApiKey])
def list_keys(team_id: str, caller: AdminDep, session: SessionDep) -> ListPage[ApiKey]:
    return list_page([key_object(k) for k in team_keys.list_keys(session, team_id)], False)


@router.post("/teams/{team_id}/keys", response_model=ApiKeyCreated)
def issue_key(team_id: str, caller: AdminDep, session: SessionDep) -> ApiKeyCreated:
    return created_key_object(*team_keys.issue_key(session, caller, team_id))


@router.post("/teams/{team_id}/keys/rotate", response_model=ApiKeyCreated)
def rotate_keys(team_id: str, caller: AdminDep, session: SessionDep) -> ApiKeyCreated:
    return created_key_object(*team_keys.rotate_keys(session, caller, team_id))


@router.delete("/keys/{key_id}", response_model=ApiKey, responses=CONFLICT)
def revoke_key(key_id: str, caller: AdminDep, session: SessionDep) -> ApiKey:
    return key_object(team_keys.revoke_key(session, caller, key_id))


@router.post("/workers/{worker_id}/drain", response_model=Worker, responses=CONFLICT)
def drain_worker(worker_id: str, caller: AdminDep, session: SessionDep) -> Worker:
    return worker_object(worker_drain.drain_worker(session, caller, worker_id))


@router.post("/workers/{worker_id}/undrain", response_model=Worker, responses=CONFLICT)
def undrain_worker(worker_id: str, caller: AdminDep, session: SessionDep) -> Worker:
    return worker_object(worker_drain.undrain_worker(session, caller, worker_id))


@router.post("/jobs/{job_id}/cancel", response_model=FineTuningJob, responses=CONFLICT)
def cancel_job(job_id: str, caller: AdminDep, session: SessionDep) -> FineTuningJob:
    job = job_admin.cancel_job(session, caller, job_id)
    return job_object(job, job.team.id)


@router.patch("/jobs/{job_id}", response_model=FineTuningJob, responses=CONFLICT)
def update_job(
    job_id: str, body: JobUpdate, caller: AdminDep, session: SessionDep
) -> FineTuningJob:
    """Mark any team's job that has not ended preemptible or not (`409` once it ended)."""
    job = job_admin.set_preemptible(session, audit.actor_of(caller), job_id, body.preemptible)
    return job_object(job, job.team.id)


@router.get("/audit", response_model=ListPage[AuditEntry])
def list_audit(
    caller: AdminDep, session: SessionDep, limit: Limit = 20, after: AuditCursor = None
) -> ListPage[AuditEntry]:
    rows, has_more = audit.list_entries(session, limit, after)
    return list_page([audit_object(e) for e in rows], has_more)


@router.get("/usage", response_model=UsageList)
def usage_all_teams(caller: AdminDep, session: SessionDep, period: Period = None) -> UsageList:
    """GPU seconds per team for one month (YYYY-MM, default this month): chargeback."""
    teams = list(session.scalars(select(models.Team).order_by(models.Team.pk)))
    return UsageList(data=usage_for(session, teams, period), has_more=False)
