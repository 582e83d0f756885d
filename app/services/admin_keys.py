"""Admin keys: the credentials of /v1/admin, created from the CLI, stored hashed."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.domain.ids import new_id
from app.errors import BadRequest
from app.models import AdminKey
from app.services import audit, teams

ADMIN_KEY_PREFIX = "lathe-admin-"


def create_admin_key(session: Session, name: str) -> tuple[AdminKey, str]:
    """A new admin key named `name`; returns it in clear text, once. Audited as "cli"."""
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise BadRequest("admin key names are 1 to 100 characters", code="invalid_value")
    key = ADMIN_KEY_PREFIX + secrets.token_urlsafe(32)
    admin = AdminKey(id=new_id("admin"), name=name, key_hash=teams.hash_key(key), prefix=key[:16])
    session.add(admin)
    audit.record(
        session,
        audit.CLI_ACTOR,
        "admin_key.create",
        admin.id,
        {"name": name, "prefix": admin.prefix},
    )
    session.commit()
    return admin, key


def admin_for_key(session: Session, key: str) -> AdminKey | None:
    """The unrevoked admin key presented, found by digest and compared in constant time."""
    admin = session.scalar(
        select(AdminKey).where(
            AdminKey.key_hash == teams.hash_key(key), AdminKey.revoked_at.is_(None)
        )
    )
    return admin if admin and teams.digest_matches(admin.key_hash, key) else None
