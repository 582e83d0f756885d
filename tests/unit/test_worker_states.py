"""Worker states: the enum's values are the strings stored in the workers table and sent by
GET /v1/workers and the lathe_workers metric, so renaming a member must not change them."""

from __future__ import annotations

import json

from app.domain.workers import LIVE_STATES, WorkerState


def test_worker_states_keep_their_stored_and_sent_values() -> None:
    assert [s.value for s in WorkerState] == ["active", "draining", "drained", "lost", "stopped"]
    assert json.dumps({"status": WorkerState.DRAINING}) == '{"status": "draining"}'
    assert f"{WorkerState.LOST}" == "lost"


def test_only_heartbeating_states_are_live() -> None:
    assert set(LIVE_STATES) == {WorkerState.ACTIVE, WorkerState.DRAINING, WorkerState.DRAINED}
    assert "draining" in LIVE_STATES and "lost" not in LIVE_STATES
