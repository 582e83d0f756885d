"""Idempotency-Key for POST /v1/files and POST /v1/fine_tuning/jobs: a retried request
with the same key returns the first result and creates nothing new.

The key is recorded (pending) before the work, in its own committed transaction, so two
concurrent requests with one key cannot both create: the second sees the pending row and
gets a 409 until the first finishes. A request that fails releases its key, so a retry is
judged afresh. Keys are per team and endpoint and expire after KEY_TTL_SECONDS.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import APIError, BadRequest, Conflict
from app.models import IdempotencyKey, Team

KEY_TTL_SECONDS = 24 * 3600
STALE_PENDING_SECONDS = 600  # a pending key this old belonged to a request that died
KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")


def check_key(key: str) -> None:
    """400 for an Idempotency-Key outside KEY_PATTERN (before any work on the request)."""
    if not KEY_PATTERN.match(key):
        raise BadRequest(
            "Idempotency-Key must be 1-255 printable ASCII characters",
            code="invalid_idempotency_key",
            param="Idempotency-Key",
        )


class KeyReused(APIError):
    status_code = 422


def fingerprint(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def idempotent(
    session: Session,
    team: Team,
    endpoint: str,
    key: str | None,
    request_hash: str | None,
    produce: Callable[[], dict],
) -> dict:
    """Run `produce` once per (team, endpoint, key); replay its response afterwards."""
    if key is None:
        return produce()
    check_key(key)
    replay = _claim(session, team, endpoint, key, request_hash)
    if replay is not None:
        return replay
    try:
        response = produce()
    except BaseException:
        session.rollback()
        _release(session, team, endpoint, key)
        raise
    row = session.scalar(_row(team, endpoint, key))
    row.status, row.response = "done", response
    session.commit()
    return response


def _row(team: Team, endpoint: str, key: str):
    return select(IdempotencyKey).where(
        IdempotencyKey.team_pk == team.pk,
        IdempotencyKey.endpoint == endpoint,
        IdempotencyKey.key == key,
    )


def _claim(
    session: Session, team: Team, endpoint: str, key: str, request_hash: str | None
) -> dict | None:
    now = time.time()
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.team_pk == team.pk,
            IdempotencyKey.endpoint == endpoint,
            IdempotencyKey.key == key,
            (IdempotencyKey.created_at < now - KEY_TTL_SECONDS)
            | (
                (IdempotencyKey.status == "pending")
                & (IdempotencyKey.created_at < now - STALE_PENDING_SECONDS)
            ),
        )
    )
    session.add(
        IdempotencyKey(
            team_pk=team.pk,
            endpoint=endpoint,
            key=key,
            request_hash=request_hash,
            status="pending",
            created_at=now,
        )
    )
    try:
        session.commit()
        return None
    except IntegrityError:
        session.rollback()
    existing = session.scalar(_row(team, endpoint, key))
    if existing is None:  # released between our insert and read: the caller may retry
        raise Conflict(
            "a request with this Idempotency-Key just failed; retry", code="idempotency_key_in_use"
        )
    if request_hash and existing.request_hash and existing.request_hash != request_hash:
        raise KeyReused(
            "this Idempotency-Key was used with a different request body",
            code="idempotency_key_reused",
            param="Idempotency-Key",
        )
    if existing.status != "done":
        raise Conflict(
            "a request with this Idempotency-Key is still in progress",
            code="idempotency_key_in_use",
            param="Idempotency-Key",
        )
    return existing.response


def _release(session: Session, team: Team, endpoint: str, key: str) -> None:
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.team_pk == team.pk,
            IdempotencyKey.endpoint == endpoint,
            IdempotencyKey.key == key,
            IdempotencyKey.status == "pending",
        )
    )
    session.commit()


def purge_expired(session: Session, at: float | None = None) -> int:
    at = time.time() if at is None else at
    result = session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.created_at < at - KEY_TTL_SECONDS)
    )
    return result.rowcount or 0  # type: ignore[attr-defined]
