"""Per-team serialisation for limits enforced by counting (webhooks per team, waiting jobs).

A count-then-insert is only a limit if two requests of one team can never both count before
either inserts. `lock_team` makes the caller's transaction the only one of that team past
this point until it commits or rolls back, on both databases:

- PostgreSQL: `SELECT ... FOR UPDATE` on the team's row. Under READ COMMITTED (the default)
  every later statement takes a fresh snapshot, so the count after the lock sees what the
  previous holder committed.
- SQLite ignores FOR UPDATE; there a write takes the database's single write lock, held to
  the end of the transaction. So the lock is an UPDATE of the team row that changes nothing.
  pysqlite (Python's sqlite3, legacy transaction control, as SQLAlchemy uses it) runs
  SELECTs in autocommit and opens its deferred transaction right before the first
  INSERT/UPDATE/DELETE, so this UPDATE is the first statement of the transaction: it waits
  for the lock (busy_timeout) instead of failing on a read snapshot that another writer made
  stale. If the transaction had already written, it holds the lock already.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import Team


def lock_team(session: Session, team: Team) -> None:
    """Serialise this transaction with every other that locks `team`, until it ends.

    Call it before counting what a limit counts; commit or roll back promptly after."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(
            update(Team)
            .where(Team.pk == team.pk)
            .values(weight=Team.weight)
            .execution_options(synchronize_session=False)
        )
    else:
        session.execute(select(Team.pk).where(Team.pk == team.pk).with_for_update())
