"""A team's API keys as administrators manage them: listed, issued, revoked, rotated.

Keys are shown in clear text once, when issued; each change is audited
(app.services.audit) with the key's public id and prefix, never the key.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.models import AdminKey, ApiKey, Team, now
from app.services import audit, teams
from app.services.team_admin import get_team


def list_keys(session: Session, team_id: str) -> list[ApiKey]:
    team = get_team(session, team_id)
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
    team = get_team(session, team_id)
    record, key = _new_key(session, team)
    audit.record(
        session,
        audit.actor_of(admin),
        "key.issue",
        record.id,
        {"team": team.id, "prefix": record.prefix},
    )
    session.commit()
    return record, key


def revoke_key(session: Session, admin: AdminKey, key_id: str, team: Team | None = None) -> ApiKey:
    """Revoke the key `key_id`; with `team`, only a key of that team (another team's key,
    like an unknown one, is not found)."""
    record = session.scalar(select(ApiKey).where(ApiKey.id == key_id).with_for_update())
    if record is None or (team is not None and record.team_pk != team.pk):
        where = f" in team {team.name}" if team is not None else ""
        raise NotFound(
            f"no API key with id {key_id!r}{where}", code="key_not_found", param="key_id"
        )
    if record.revoked_at is not None:
        raise Conflict(f"API key {key_id} is already revoked", code="key_already_revoked")
    record.revoked_at = now()
    audit.record(
        session,
        audit.actor_of(admin),
        "key.revoke",
        record.id,
        {"team": record.team.id, "prefix": record.prefix},
    )
    session.commit()
    return record


def rotate_keys(session: Session, admin: AdminKey, team_id: str) -> tuple[ApiKey, str]:
    """A new key for the team and every other key of it revoked, in one transaction."""
    team = get_team(session, team_id, lock=True)  # serialises concurrent rotations
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
    audit.record(
        session,
        audit.actor_of(admin),
        "keys.rotate",
        team.id,
        {"key_id": record.id, "prefix": record.prefix, "revoked": revoked},
    )
    session.commit()
    return record, key
