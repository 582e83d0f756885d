"""A GPU worker's states, as its row in the workers table records them.

A StrEnum, so that the values stored in the database and sent as JSON are the plain strings
they always were.
"""

from __future__ import annotations

from enum import StrEnum


class WorkerState(StrEnum):
    ACTIVE = "active"  # takes jobs
    DRAINING = "draining"  # an operator drained it: finishes its job, takes no new one
    DRAINED = "drained"  # drained and idle
    LOST = "lost"  # silent past its lease; its job goes back in line
    STOPPED = "stopped"  # shut down on purpose; its job is requeued without counting against it


# States in which a worker still heartbeats: the pool counts it while its lease is fresh.
LIVE_STATES = (WorkerState.ACTIVE, WorkerState.DRAINING, WorkerState.DRAINED)
