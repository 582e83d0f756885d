"""Teams as administrators change them: created with their settings, listed, updated.

Each change is audited (app.services.audit) in its own transaction; the team itself and
its first key are made by app.services.teams, which the CLI uses too.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, true
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.domain.quotas import MAX_WEIGHT, QUOTA_MAXIMA, quota_value_problem
from app.errors import BadRequest, Conflict, NotFound
from app.models import AdminKey, ApiKey, Team
from app.services import audit, teams
from app.services.pagination import newest_first_page

QUOTA_FIELDS = tuple(QUOTA_MAXIMA)
TEAM_FIELDS = ("weight", "disabled", "preemptible", *QUOTA_FIELDS)


def get_team(session: Session, team_id: str, *, lock: bool = False) -> Team:
    """The team, or 404 team_not_found; `lock` holds its row until the commit."""
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
    for flag in ("disabled", "preemptible"):
        if flag in fields and not isinstance(fields[flag], bool):
            raise BadRequest(f"{flag} must be true or false", code="invalid_value", param=flag)
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
    audit.record(
        session,
        audit.actor_of(admin),
        "team.create",
        team.id,
        {"name": name, **fields, "key_id": api_key.id if api_key else None},
    )
    session.commit()
    return team, key


def list_teams(session: Session, limit: int, after: str | None) -> tuple[list[Team], bool]:
    return newest_first_page(session, Team, true(), limit, after)


def update_team(session: Session, admin: AdminKey, team_id: str, fields: dict[str, Any]) -> Team:
    """Set the given fields; a quota set to None goes back to the deployment default."""
    return _update(session, audit.actor_of(admin), team_id, fields)


def set_preemptible(session: Session, team_ref: str, preemptible: bool) -> Team:
    """The CLI's mark (`lathe admin team-preemptible`): the team by name or id, audited
    as the CLI's."""
    team = session.scalar(select(Team).where((Team.name == team_ref) | (Team.id == team_ref)))
    if team is None:
        raise NotFound(f"no team named {team_ref!r}", code="team_not_found", param="team")
    return _update(session, audit.CLI_ACTOR, team.id, {"preemptible": preemptible})


def _update(session: Session, actor: str, team_id: str, fields: dict[str, Any]) -> Team:
    _check_team_fields(fields)
    team = get_team(session, team_id, lock=True)
    if not fields:
        return team  # nothing sent: not a change, not audited
    for field, value in fields.items():
        setattr(team, field, value)
    audit.record(session, actor, "team.update", team.id, dict(fields))
    session.commit()
    return team
