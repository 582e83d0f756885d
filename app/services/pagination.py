"""OpenAI-style cursor pages: newest first, continuing after the object with id `after`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from app.errors import BadRequest


def newest_first_page(
    session: Session, model: Any, scope: ColumnElement[bool], limit: int, after: str | None
) -> tuple[list, bool]:
    """Rows of `model` within `scope` (a team's, a job's), and whether more remain."""
    query = select(model).where(scope)
    if after:
        cursor = session.scalar(select(model.pk).where(scope, model.id == after))
        if cursor is None:
            raise BadRequest(
                f"'after' names no object in this list: {after!r}",
                code="invalid_cursor",
                param="after",
            )
        query = query.where(model.pk < cursor)
    rows = list(session.scalars(query.order_by(model.pk.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
