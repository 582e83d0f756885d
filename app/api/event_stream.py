"""A job's events as server-sent events: GET /v1/fine_tuning/jobs/{id}/events?stream=true.

First every event already written (past `after` / `Last-Event-ID`, oldest first), then each
new one as it is committed. The stream ends with one last message:

- `end`, carrying the job object, once the job is finished (succeeded, failed, cancelled)
  or paused and its events up to then are out. A paused job's stream ends too: reconnect
  with `Last-Event-ID` after resuming it to follow the rest.
- `error`, carrying an error envelope like the API's (`{"error": {"message", "type",
  "param", "code"}}`), as soon as the key the stream was opened with is revoked
  (`invalid_api_key`) or its team disabled (`team_disabled`); nothing more is sent.

A comment line every 15 s keeps proxies from closing an idle stream.

One poller per API process (EventHub) serves every open stream: each poll
(LATHE_EVENT_STREAM_POLL_SECONDS) is one short session on a thread of its own that reads
the watched jobs, their new events and whether each stream's key is still good, in a few
queries for all streams together. A stream waits on the event loop for its share, so open
streams take neither a worker thread nor a database connection each, and the key is
checked again at every poll.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.api.error_handlers import ErrorDetail, ErrorEnvelope
from app.domain.jobs import JobStatus, is_final
from app.errors import APIError, BadRequest, invalid_api_key, team_disabled
from app.models import ApiKey, Job, JobEvent, Team, now
from app.schemas.jobs import event_object, job_object
from app.services.events import LATE_COMMIT_SECONDS, events_since_each
from app.services.teams import bearer_key, hash_key

log = logging.getLogger(__name__)
EVENT = "fine_tuning.job.event"
KEEPALIVE_SECONDS = 15.0
MAX_BACKOFF_SECONDS = 5.0  # between polls while the database is unreachable


def _compact(obj: BaseModel) -> str:
    """An object as one message's data: compact JSON, non-ASCII escaped (one line)."""
    return json.dumps(obj.model_dump(mode="json"), separators=(",", ":"))


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


@dataclass(frozen=True)
class StreamedEvent:
    pk: int
    created_at: int
    id: str
    body: str  # the event object as JSON


@dataclass(frozen=True)
class Poll:
    """What one poll read, for every watched job and key."""

    events: dict[int, list[StreamedEvent]]  # job pk -> its events past the cursor
    ends: dict[int, str]  # job pk -> the `end` message's data (the job), for jobs that ended
    refusals: dict[str, APIError]  # key digest -> why its streams end


@dataclass(eq=False)
class Watcher:
    """One open stream: its job, its key (by digest), what it sent, what waits to go out."""

    job_pk: int
    team_id: str
    key_digest: str
    after_pk: int  # the stream starts past this event
    cursor: int  # the highest event pk handed to this stream
    sent: dict[int, int] = field(default_factory=dict)  # pk -> created_at, to skip repeats
    outbox: list[bytes] = field(default_factory=list)
    last: bytes | None = None  # the closing `end` or `error` message, once there is one
    ready: anyio.Event = field(default_factory=anyio.Event)

    def take(self, poll: Poll) -> None:
        """Queue what `poll` holds for this stream (called on the event loop)."""
        if self.last is not None:
            return
        refusal = poll.refusals.get(self.key_digest)
        if refusal is not None:  # nothing more for this key, not even events already read
            body = ErrorEnvelope(
                error=ErrorDetail(
                    message=refusal.message, type=refusal.type, param=None, code=refusal.code
                )
            )
            self.last = format_sse_event(data_str=_compact(body), event="error")
        else:
            for event in poll.events.get(self.job_pk, ()):
                if event.pk in self.sent or event.pk <= self.after_pk:
                    continue
                self.sent[event.pk] = event.created_at
                self.cursor = max(self.cursor, event.pk)
                self.outbox.append(format_sse_event(data_str=event.body, event=EVENT, id=event.id))
            horizon = now() - 2 * LATE_COMMIT_SECONDS
            for pk in [pk for pk, created in self.sent.items() if created < horizon]:
                del self.sent[pk]  # older than any late commit: the cursor alone covers it
            if self.job_pk in poll.ends:
                self.last = format_sse_event(data_str=poll.ends[self.job_pk], event="end")
        self.ready.set()


class EventHub:
    """The shared poller behind every event stream of one API process.

    It runs (an asyncio task) while a stream is open. Its reads run on a thread of their own
    (a limiter of one token, not the request thread pool) and use one pooled connection
    for the few milliseconds a poll takes; the pool keeps a connection for it
    (app/db.py API_RESERVED_CONNECTIONS)."""

    def __init__(self, sessions: sessionmaker[Session], poll_seconds: float) -> None:
        self.sessions = sessions
        self.poll_seconds = poll_seconds
        self.watchers: set[Watcher] = set()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: anyio.Event | None = None

    def add(self, watcher: Watcher) -> None:
        self.watchers.add(watcher)
        loop = asyncio.get_running_loop()
        if self._task is None or self._loop is not loop:
            self._loop, self._wake = loop, anyio.Event()
            self._task = loop.create_task(self._run(), name="lathe-event-hub")
        elif self._wake is not None:
            self._wake.set()  # a new stream gets its backlog now, not at the next tick

    def remove(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    async def _run(self) -> None:
        try:
            await self._poll_while_watched()
        finally:  # also if it died: the next stream starts another
            if self._task is asyncio.current_task():
                self._task = None

    async def _poll_while_watched(self) -> None:
        limiter = anyio.CapacityLimiter(1)
        delay = self.poll_seconds
        while True:
            if not self.watchers:  # checked and cleared with no await between: add() sees it
                self._task = None
                return
            watchers = list(self.watchers)
            self._wake = anyio.Event()  # before the read: a stream added during it wakes us
            try:
                poll = await anyio.to_thread.run_sync(self._read, watchers, limiter=limiter)
            except Exception as exc:  # the database is down: the streams wait, then retry
                log.warning("event streams: poll failed (%s); retrying", type(exc).__name__)
                delay = min(max(delay, self.poll_seconds) * 2, MAX_BACKOFF_SECONDS)
            else:
                delay = self.poll_seconds
                for watcher in watchers:
                    watcher.take(poll)
            with anyio.move_on_after(delay):
                await self._wake.wait()

    def _read(self, watchers: list[Watcher]) -> Poll:
        cursors: dict[int, int] = {}
        team_of: dict[int, str] = {}
        for watcher in watchers:
            cursors[watcher.job_pk] = min(
                cursors.get(watcher.job_pk, watcher.cursor), watcher.cursor
            )
            team_of[watcher.job_pk] = watcher.team_id
        digests = {watcher.key_digest for watcher in watchers}
        with self.sessions() as session:
            # Each job's state is read before its events: none can follow a final state.
            jobs = {
                job.pk: job for job in session.scalars(select(Job).where(Job.pk.in_(list(cursors))))
            }
            ends: dict[int, str] = {}
            for pk in cursors:
                job = jobs.get(pk)
                if job is not None and (is_final(job.status) or job.status == JobStatus.PAUSED):
                    ends[pk] = _compact(job_object(job, team_of[pk]))
            events = {
                pk: [
                    StreamedEvent(e.pk, e.created_at, e.id, _compact(event_object(e))) for e in rows
                ]
                for pk, rows in events_since_each(session, cursors).items()
            }
            good = session.execute(
                select(ApiKey.key_hash, Team.name, Team.disabled)
                .join(Team, Team.pk == ApiKey.team_pk)
                .where(ApiKey.key_hash.in_(list(digests)), ApiKey.revoked_at.is_(None))
            ).all()
        refusals: dict[str, APIError] = {digest: invalid_api_key() for digest in digests}
        for digest, team_name, disabled in good:
            if disabled:
                refusals[digest] = team_disabled(team_name)
            else:
                del refusals[digest]
        return Poll(events, ends, refusals)


def stream_events(request: Request, team_id: str, job_pk: int, after_pk: int) -> StreamingResponse:
    hub: EventHub = request.app.state.event_hub  # made with the app (app/main.py)
    # The key that opened the stream (authenticated by the route), re-checked at each poll.
    key_digest = hash_key(bearer_key(request.headers.get("authorization")) or "")

    async def generate() -> AsyncIterator[bytes]:
        yield format_sse_event(retry=2000)
        watcher = Watcher(job_pk, team_id, key_digest, after_pk=after_pk, cursor=after_pk)
        hub.add(watcher)
        try:
            last_write = time.monotonic()
            while True:
                with anyio.move_on_after(KEEPALIVE_SECONDS - (time.monotonic() - last_write)):
                    await watcher.ready.wait()
                watcher.ready = anyio.Event()
                messages, watcher.outbox = watcher.outbox, []
                for message in messages:
                    yield message
                if messages:
                    last_write = time.monotonic()
                if watcher.last is not None:
                    yield watcher.last
                    return
                if time.monotonic() - last_write >= KEEPALIVE_SECONDS:
                    yield format_sse_event(comment="keepalive")
                    last_write = time.monotonic()
                if await request.is_disconnected():
                    return
        finally:
            hub.remove(watcher)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(generate(), media_type="text/event-stream", headers=headers)
