"""Draining a worker and undoing it, as an administrator asks (audited).

A drained worker finishes the job it runs, takes no other, then shows drained; undrain
puts it back in the pool. The change is a guarded update of the status column, which the
worker's heartbeat and the scheduler's reconciler write too.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.domain.workers import WorkerState
from app.errors import Conflict, NotFound
from app.models import AdminKey, Worker
from app.services import audit


def _worker(session: Session, worker_id: str) -> Worker:
    worker = session.scalar(select(Worker).where(Worker.id == worker_id))
    if worker is None:
        raise NotFound(
            f"no worker with id {worker_id!r}", code="worker_not_found", param="worker_id"
        )
    return worker


@dataclass(frozen=True)
class _Move:
    action: str  # the audit entry's
    target: WorkerState
    sources: tuple[WorkerState, ...]  # the states it moves from
    already: tuple[WorkerState, ...]  # the states in which there is nothing to do
    done: str  # "drained": the conflict's message says what a live worker can be


DRAIN = _Move(
    "worker.drain",
    WorkerState.DRAINING,
    (WorkerState.ACTIVE,),
    (WorkerState.DRAINING, WorkerState.DRAINED),
    "drained",
)
UNDRAIN = _Move(
    "worker.undrain",
    WorkerState.ACTIVE,
    (WorkerState.DRAINING, WorkerState.DRAINED),
    (WorkerState.ACTIVE,),
    "undrained",
)


def _move(session: Session, admin: AdminKey, worker_id: str, move: _Move) -> Worker:
    worker = _worker(session, worker_id)
    # Guarded: the heartbeat and the scheduler write this column too.
    result = session.execute(
        update(Worker)
        .where(Worker.pk == worker.pk, Worker.status.in_(move.sources))
        .values(status=move.target)
        .execution_options(synchronize_session=False)
    )
    previous = worker.status
    session.expire(worker)
    if result.rowcount == 1:  # type: ignore[attr-defined]
        audit.record(
            session,
            audit.actor_of(admin),
            move.action,
            worker.id,
            {"from": previous, "to": move.target.value},
        )
        session.commit()
        return worker
    session.rollback()
    worker = _worker(session, worker_id)
    if worker.status in move.already:
        return worker  # nothing to do: not a change, not audited
    raise Conflict(
        f"worker {worker.id} is {worker.status}; only a live worker can be {move.done}",
        code="worker_not_live",
        param="worker_id",
    )


def drain_worker(session: Session, admin: AdminKey, worker_id: str) -> Worker:
    """active -> draining: it finishes its job, takes no other, then shows drained."""
    return _move(session, admin, worker_id, DRAIN)


def undrain_worker(session: Session, admin: AdminKey, worker_id: str) -> Worker:
    """draining or drained -> active: the worker takes jobs again."""
    return _move(session, admin, worker_id, UNDRAIN)
