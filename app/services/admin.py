"""Administration: admin keys, teams, their keys and quotas, workers, any team's jobs.

Every change writes an AuditEntry in the same transaction as the change itself: who
(the admin key's name and id), what ("team.update"), on which object, with which values.
Keys never appear in the log, only their public ids and prefixes.
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.domain.ids import new_id
from app.domain.jobs import JobStatus, is_final
from app.domain.quotas import quota_value_problem
from app.errors import BadRequest, Conflict, NotFound
from app.models import AdminKey, ApiKey, AuditEntry, Job, Team, Worker, now
from app.services import lifecycle, teams
from app.services.pagination import newest_first_page

ADMIN_KEY_PREFIX = "lathe-admin-"
QUOTA_FIELDS = ("max_running_jobs", "max_queued_jobs", "max_file_bytes", "gpu_hours_per_month")
TEAM_FIELDS = ("weight", "disabled", *QUOTA_FIELDS)
MAX_WEIGHT = 1_000_000  # a fair-share weight; finite, so shares stay numbers
CLI_ACTOR = "cli"


def actor_of(admin: AdminKey) -> str:
    """ "alice (admin-1f2e...)": the key's name and public id, within the column's 200."""
    return f"{admin.name[:150]} ({admin.id})"


def audit(
    session: Session,
    actor: str,
    action: str,
    target: str | None,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """Add one audit entry to the session; the caller commits it with the change."""
    entry = AuditEntry(
        id=new_id("audit"), actor=actor, action=action, target=target, details=details
    )
    session.add(entry)
    return entry


# --- admin keys ---------------------------------------------------------------------------


def create_admin_key(session: Session, name: str) -> tuple[AdminKey, str]:
    """A new admin key named `name`; returns it in clear text, once. Audited as "cli"."""
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise BadRequest("admin key names are 1 to 100 characters", code="invalid_value")
    key = ADMIN_KEY_PREFIX + secrets.token_urlsafe(32)
    admin = AdminKey(id=new_id("admin"), name=name, key_hash=teams.hash_key(key), prefix=key[:16])
    session.add(admin)
    audit(session, CLI_ACTOR, "admin_key.create", admin.id, {"name": name, "prefix": admin.prefix})
    session.commit()
    return admin, key


def admin_for_key(session: Session, key: str) -> AdminKey | None:
    admin = session.scalar(
        select(AdminKey).where(
            AdminKey.key_hash == teams.hash_key(key), AdminKey.revoked_at.is_(None)
        )
    )
    return admin if admin and teams.digest_matches(admin.key_hash, key) else None


# --- teams --------------------------------------------------------------------------------


def _team(session: Session, team_id: str, *, lock: bool = False) -> Team:
    query = select(Team).where(Team.id == team_id)
    if lock:
        query = query.with_for_update()
    team = session.scalar(query)
    if team is None:
        raise NotFound(f"no team with id {team_id!r}", code="team_not_found", param="team_id")
    return team


def _check_team_fields(fields: dict[str, Any]) -> None:
    unknown = set(fields) - set(TEAM_FIELDS)
    if unknown:
        raise BadRequest(f"unknown team fields: {', '.join(sorted(unknown))}")
    if "weight" in fields:
        weight = fields["weight"]
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not 0 < weight <= MAX_WEIGHT  # False for NaN; Infinity is above the maximum
        ):
            raise BadRequest(
                f"weight must be a number above 0, at most {MAX_WEIGHT}",
                code="invalid_value",
                param="weight",
            )
    if "disabled" in fields and fields["disabled"] is None:
        raise BadRequest("disabled must be true or false", code="invalid_value", param="disabled")
    for name in QUOTA_FIELDS:
        problem = quota_value_problem(name, fields.get(name))
        if problem is not None:
            raise BadRequest(problem, code="invalid_value", param=name)


def create_team(
    session: Session,
    admin: AdminKey,
    name: str,
    weight: float = 1.0,
    quotas: dict[str, Any] | None = None,
) -> tuple[Team, str]:
    """A team, its settings and its first API key (returned in clear text, once)."""
    fields = {"weight": weight, **(quotas or {})}
    _check_team_fields(fields)
    try:
        team, key = teams.create_team(session, name, commit=False)
    except teams.TeamExists as exc:
        raise Conflict(str(exc), code="team_exists", param="name") from None
    except IntegrityError:  # a concurrent create of the same name won the race
        session.rollback()
        raise Conflict(
            f"a team named {name!r} already exists", code="team_exists", param="name"
        ) from None
    for field, value in fields.items():
        setattr(team, field, value)
    api_key = session.scalar(select(ApiKey).where(ApiKey.team_pk == team.pk))
    audit(
        session,
        actor_of(admin),
        "team.create",
        team.id,
        {"name": name, **fields, "key_id": api_key.id if api_key else None},
    )
    session.commit()
    return team, key


def list_teams(session: Session, limit: int, after: str | None) -> tuple[list[Team], bool]:
    return newest_first_page(session, Team, true(), limit, after)


def get_team(session: Session, team_id: str) -> Team:
    return _team(session, team_id)


def update_team(session: Session, admin: AdminKey, team_id: str, fields: dict[str, Any]) -> Team:
    """Set the given fields; a quota set to None goes back to the deployment default."""
    _check_team_fields(fields)
    team = _team(session, team_id, lock=True)
    if not fields:
        return team  # nothing sent: not a change, not audited
    for field, value in fields.items():
        setattr(team, field, value)
    audit(session, actor_of(admin), "team.update", team.id, dict(fields))
    session.commit()
    return team


# --- team API keys ------------------------------------------------------------------------


def list_keys(session: Session, team_id: str) -> list[ApiKey]:
    team = _team(session, team_id)
    return list(
        session.scalars(select(ApiKey).where(ApiKey.team_pk == team.pk).order_by(ApiKey.pk))
    )


def _new_key(session: Session, team: Team) -> tuple[ApiKey, str]:
    key = teams.issue_key(session, team)
    session.flush()
    record = session.scalar(select(ApiKey).where(ApiKey.key_hash == teams.hash_key(key)))
    assert record is not None
    return record, key


def issue_key(session: Session, admin: AdminKey, team_id: str) -> tuple[ApiKey, str]:
    """One more key for the team (the others stay valid); returned in clear text, once."""
    team = _team(session, team_id)
    record, key = _new_key(session, team)
    audit(
        session, actor_of(admin), "key.issue", record.id, {"team": team.id, "prefix": record.prefix}
    )
    session.commit()
    return record, key


def revoke_key(session: Session, admin: AdminKey, key_id: str) -> ApiKey:
    record = session.scalar(select(ApiKey).where(ApiKey.id == key_id).with_for_update())
    if record is None:
        raise NotFound(f"no API key with id {key_id!r}", code="key_not_found", param="key_id")
    if record.revoked_at is not None:
        raise Conflict(f"API key {key_id} is already revoked", code="key_already_revoked")
    record.revoked_at = now()
    audit(
        session,
        actor_of(admin),
        "key.revoke",
        record.id,
        {"team": record.team.id, "prefix": record.prefix},
    )
    session.commit()
    return record


def rotate_keys(session: Session, admin: AdminKey, team_id: str) -> tuple[ApiKey, str]:
    """A new key for the team and every other key of it revoked, in one transaction."""
    team = _team(session, team_id, lock=True)  # serialises concurrent rotations
    record, key = _new_key(session, team)
    revoked = list(
        session.scalars(
            select(ApiKey.id).where(
                ApiKey.team_pk == team.pk, ApiKey.pk != record.pk, ApiKey.revoked_at.is_(None)
            )
        )
    )
    session.execute(
        update(ApiKey)
        .where(ApiKey.team_pk == team.pk, ApiKey.pk != record.pk, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now())
        .execution_options(synchronize_session=False)
    )
    audit(
        session,
        actor_of(admin),
        "keys.rotate",
        team.id,
        {"key_id": record.id, "prefix": record.prefix, "revoked": revoked},
    )
    session.commit()
    return record, key


# --- workers ------------------------------------------------------------------------------


def _worker(session: Session, worker_id: str) -> Worker:
    worker = session.scalar(select(Worker).where(Worker.id == worker_id))
    if worker is None:
        raise NotFound(
            f"no worker with id {worker_id!r}", code="worker_not_found", param="worker_id"
        )
    return worker


def _set_worker_status(
    session: Session,
    admin: AdminKey,
    worker_id: str,
    action: str,
    target: str,
    sources: tuple[str, ...],
    already: tuple[str, ...],
) -> Worker:
    worker = _worker(session, worker_id)
    # Guarded: the heartbeat and the scheduler write this column too.
    result = session.execute(
        update(Worker)
        .where(Worker.pk == worker.pk, Worker.status.in_(sources))
        .values(status=target)
        .execution_options(synchronize_session=False)
    )
    previous = worker.status
    session.expire(worker)
    if result.rowcount == 1:  # type: ignore[attr-defined]
        audit(
            session,
            actor_of(admin),
            action,
            worker.id,
            {"from": previous, "to": target},
        )
        session.commit()
        return worker
    session.rollback()
    worker = _worker(session, worker_id)
    if worker.status in already:
        return worker  # nothing to do: not a change, not audited
    raise Conflict(
        f"worker {worker.id} is {worker.status}; only a live worker can be "
        f"{'drained' if target == 'draining' else 'undrained'}",
        code="worker_not_live",
        param="worker_id",
    )


def drain_worker(session: Session, admin: AdminKey, worker_id: str) -> Worker:
    """active -> draining: it finishes its job, takes no other, then shows drained."""
    return _set_worker_status(
        session, admin, worker_id, "worker.drain", "draining", ("active",), ("draining", "drained")
    )


def undrain_worker(session: Session, admin: AdminKey, worker_id: str) -> Worker:
    return _set_worker_status(
        session, admin, worker_id, "worker.undrain", "active", ("draining", "drained"), ("active",)
    )


# --- jobs ---------------------------------------------------------------------------------


def cancel_job(session: Session, admin: AdminKey, job_id: str) -> Job:
    """Cancel any team's job that has not ended."""
    job = session.scalar(select(Job).where(Job.id == job_id))
    if job is None:
        raise NotFound(
            f"no fine-tuning job with id {job_id!r}", code="job_not_found", param="job_id"
        )
    previous = job.status
    if is_final(JobStatus(previous)) or not lifecycle.cancel(session, job, actor="admin"):
        session.rollback()  # it may have ended between the read and the update
        job = session.scalar(select(Job).where(Job.id == job_id))
        raise Conflict(
            f"job {job_id} has already ended ({job.status if job else previous}); "
            "it cannot be cancelled",
            code="job_not_cancellable",
            param="job_id",
        )
    audit(
        session,
        actor_of(admin),
        "job.cancel",
        job_id,
        {"team": job.team.id, "from": previous},
    )
    session.commit()
    return job


# --- audit log ----------------------------------------------------------------------------


def list_audit(session: Session, limit: int, after: str | None) -> tuple[list[AuditEntry], bool]:
    return newest_first_page(session, AuditEntry, true(), limit, after)
