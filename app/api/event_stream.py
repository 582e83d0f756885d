"""A job's events as server-sent events: GET /v1/fine_tuning/jobs/{id}/events?stream=true.

First every event already written (past `after` / `Last-Event-ID`, oldest first), then each
new one as it is committed; once the job is finished and its last events are out, an `end`
event carries the job object and the stream closes. A comment line every 15 s keeps
proxies from closing an idle stream. The database is polled (LATHE_EVENT_STREAM_POLL_SECONDS)
with a short session per poll: a watcher holds no connection while it waits.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import anyio
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.sse import format_sse_event
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.domain.jobs import is_final
from app.errors import BadRequest
from app.models import Job, JobEvent, now
from app.schemas import event_object, job_object
from app.services.events import LATE_COMMIT_SECONDS, events_since

EVENT = "fine_tuning.job.event"
KEEPALIVE_SECONDS = 15.0


def event_cursor(session: Session, job: Job, event_id: str | None) -> int:
    """The pk after which to stream: 0 for all, else that of the named event."""
    if not event_id:
        return 0
    pk = session.scalar(
        select(JobEvent.pk).where(JobEvent.job_pk == job.pk, JobEvent.id == event_id)
    )
    if pk is None:
        raise BadRequest(
            f"'after' names no event of this job: {event_id!r}",
            code="invalid_cursor",
            param="after",
        )
    return pk


def stream_events(
    request: Request, sessions: sessionmaker[Session], team_id: str, job_pk: int, after_pk: int
) -> StreamingResponse:
    poll = request.app.state.settings.event_stream_poll_seconds
    sent: dict[int, int] = {}  # pk -> created_at of what went out lately, to skip repeats

    def read(cursor: int) -> tuple[list[bytes], int, dict | None]:
        with sessions() as session:
            current = session.get_one(Job, job_pk)
            final = is_final(current.status)  # read before the events: none can follow it
            messages = []
            for event in events_since(session, job_pk, cursor):
                if event.pk in sent or event.pk <= after_pk:
                    continue
                sent[event.pk] = event.created_at
                cursor = max(cursor, event.pk)
                body = json.dumps(event_object(event), separators=(",", ":"))
                messages.append(format_sse_event(data_str=body, event=EVENT, id=event.id))
            horizon = now() - 2 * LATE_COMMIT_SECONDS
            for pk in [pk for pk, created in sent.items() if created < horizon]:
                del sent[pk]  # older than any late commit: the cursor alone covers it
            return messages, cursor, job_object(current, team_id) if final else None

    async def generate() -> AsyncIterator[bytes]:
        yield format_sse_event(retry=2000)
        cursor = after_pk
        last_write = time.monotonic()
        while True:
            messages, cursor, finished = await run_in_threadpool(read, cursor)
            for message in messages:
                yield message
            if messages:
                last_write = time.monotonic()
            if finished is not None:
                body = json.dumps(finished, separators=(",", ":"))
                yield format_sse_event(data_str=body, event="end")
                return
            if time.monotonic() - last_write >= KEEPALIVE_SECONDS:
                yield format_sse_event(comment="keepalive")
                last_write = time.monotonic()
            if await request.is_disconnected():
                return
            await anyio.sleep(poll)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(generate(), media_type="text/event-stream", headers=headers)
