"""The audit log: one AuditEntry per administrative change, in the change's transaction.

Who (the admin key's name and id, or "cli"), what ("team.update"), on which object, with
which values. Keys never appear in the log, only their public ids and prefixes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import true
from sqlalchemy.orm import Session

from app.domain.ids import new_id
from app.models import AdminKey, AuditEntry
from app.services.pagination import newest_first_page

CLI_ACTOR = "cli"


def actor_of(admin: AdminKey) -> str:
    """ "alice (admin-1f2e...)": the key's name and public id, within the column's 200."""
    return f"{admin.name[:150]} ({admin.id})"


def record(
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


def list_entries(session: Session, limit: int, after: str | None) -> tuple[list[AuditEntry], bool]:
    return newest_first_page(session, AuditEntry, true(), limit, after)
