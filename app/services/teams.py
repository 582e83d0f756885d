"""Teams and their API keys: created by admins, keys stored hashed and shown once."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.domain.ids import new_id
from app.models import ApiKey, Team

KEY_PREFIX = "lathe-"
# RFC 9110 credentials: the scheme in any case, then spaces or tabs, then a token68.
_BEARER = re.compile(r"[ \t]*bearer[ \t]+([A-Za-z0-9._~+/-]+=*)[ \t]*", re.IGNORECASE)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header; None when there is none or it is
    not one. The one reading of the header, for authentication (app/api/deps.py) and the
    rate limiter (app/ratelimit.py): `bEaReR   KEY` is the same key, so the same bucket."""
    match = _BEARER.fullmatch(authorization or "")
    return match.group(1) if match else None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TeamExists(Exception):
    pass


def create_team(session: Session, name: str, *, commit: bool = True) -> tuple[Team, str]:
    """Create a team and its first API key; returns the key in clear text, once.

    `commit=False` leaves the transaction open so a caller can add settings and an audit
    entry that land with the team, or not at all."""
    if session.scalar(select(Team).where(Team.name == name)) is not None:
        raise TeamExists(f"a team named {name!r} already exists")
    team = Team(id=new_id("team"), name=name)
    session.add(team)
    session.flush()
    key = issue_key(session, team)
    if commit:
        session.commit()
    return team, key


def issue_key(session: Session, team: Team) -> str:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(id=new_id("key"), team_pk=team.pk, key_hash=hash_key(key), prefix=key[:12]))
    return key


def digest_matches(stored: str, key: str) -> bool:
    """Constant-time comparison of a stored digest with a presented key's."""
    return hmac.compare_digest(stored, hash_key(key))


def team_for_key(session: Session, key: str) -> Team | None:
    # Found by its SHA-256 (an index lookup on a digest the caller cannot steer), then
    # compared in constant time.
    api_key = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
    return api_key.team if api_key and digest_matches(api_key.key_hash, key) else None
