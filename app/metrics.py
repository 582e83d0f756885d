"""GET /metrics: Prometheus metrics of the API process and of the pool (read from Postgres).

Two kinds of series, in one registry per app (tests build several apps in one process):

- **This process's HTTP traffic**: `lathe_http_request_duration_seconds{method, route,
  status}`, recorded by `HTTPMetricsMiddleware`. `route` is the path template
  ("/v1/fine_tuning/jobs/{job_id}"), never the raw path, so ids cannot multiply series.
  Each API replica counts its own requests; Prometheus scrapes each replica.
- **The pool, as the database holds it**, read by `DatabaseCollector` at scrape time:
  jobs by status, queue depth per GPU class, workers by state, metered GPU seconds per
  team, and histograms of job durations and queue waits built from the jobs' timestamps.
  Every replica reads the same rows, so these are right whichever replica (or how many) is
  scraped, and whatever worker process did the work; dashboards take `max` across
  replicas. When the database cannot be read, the scrape still answers, with
  `lathe_database_up 0` and the HTTP series.

docs/operations.md#monitoring lists every series and what it means.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterable, Iterator

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, GCCollector, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from sqlalchemy import case, func, select, text
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.domain.jobs import FINAL_STATES, JobStatus
from app.domain.memory import eligible_classes
from app.domain.workers import LIVE_STATES, WorkerState
from app.errors import Unauthorized
from app.logs import route_template
from app.models import Job, Team, Worker
from app.services.pool import pending_dispatches, pool_classes, shown_state

log = logging.getLogger(__name__)

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Job timestamps are whole seconds; jobs run for minutes to a day.
DURATION_BUCKETS = (10, 30, 60, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)
WAIT_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 7200, 21600, 86400)
STATEMENT_TIMEOUT_MS = 2000  # a scrape never waits on a slow or locked database for long
NO_CLASS = "none"  # queue depth of waiting jobs that fit no class the pool has now


# --- HTTP latency ---------------------------------------------------------------------------


class HTTPMetricsMiddleware:
    """Pure ASGI: one histogram observation per HTTP request (no BaseHTTPMiddleware task)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # an exception escaping the app is answered 500 outside this middleware
        streaming = False
        started = time.perf_counter()

        async def record_status(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers") or [])
                streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            # An event stream lasts as long as its job: not a request latency.
            if not streaming:
                self.histogram.labels(scope["method"], route_template(scope), str(status)).observe(
                    time.perf_counter() - started
                )


# --- The pool, from the database --------------------------------------------------------------


def _histogram(
    family: HistogramMetricFamily,
    labels: list[str],
    bounds: Iterable[float],
    counts: list[int],
    total: int,
    seconds: float,
) -> None:
    """`counts` are cumulative (count of values <= each bound)."""
    buckets = [(str(float(b)), n) for b, n in zip(bounds, counts, strict=True)]
    family.add_metric(labels, [*buckets, ("+Inf", total)], seconds)


class DatabaseCollector:
    """Reads the pool's state in one short read-only transaction per scrape: a few
    aggregate queries over the jobs, teams and workers tables."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration; collect() reads the database

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        try:
            with self.sessions() as session:
                if session.get_bind().dialect.name == "postgresql":
                    session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
                families = [
                    *self._jobs(session),
                    *self._queue(session),
                    *self._workers(session),
                    self._team_usage(session),
                    self._preemptions(session),
                ]
            up = 1.0
        except Exception as exc:  # the database is away: say so, keep the scrape
            log.warning("metrics: cannot read the database: %s", str(exc).splitlines()[0])
            families, up = [], 0.0
        yield from families
        yield GaugeMetricFamily(
            "lathe_database_up", "1 if /metrics could read the database, else 0", value=up
        )
        yield GaugeMetricFamily(
            "lathe_metrics_collect_seconds",
            "Time this scrape spent reading the database",
            value=time.perf_counter() - started,
        )

    def _jobs(self, session: Session) -> list[Metric]:
        """Jobs by status, and the duration and queue-wait histograms of finished jobs, in
        one aggregate query (grouped by status and the class the job ran on)."""
        ran = Job.status.in_([s.value for s in FINAL_STATES]) & Job.started_at.is_not(None)
        ran = ran & Job.finished_at.is_not(None)
        duration = Job.finished_at - Job.started_at
        wait = Job.started_at - Job.created_at

        def histogram_columns(value, bounds):
            return [
                *(func.sum(case((ran & (value <= b), 1), else_=0)) for b in bounds),
                func.sum(case((ran, 1), else_=0)),
                func.sum(case((ran, value), else_=0)),
            ]

        rows = session.execute(
            select(
                Job.status,
                Job.dispatched_class,
                func.count(),
                *histogram_columns(duration, DURATION_BUCKETS),
                *histogram_columns(wait, WAIT_BUCKETS),
            ).group_by(Job.status, Job.dispatched_class)
        ).all()

        def add(into: dict[str, list[float]], key: str, values: list[float]) -> None:
            old = into.get(key, [0.0] * len(values))
            into[key] = [a + b for a, b in zip(old, values, strict=True)]

        by_status = {s.value: 0 for s in JobStatus}
        nd, nw = len(DURATION_BUCKETS), len(WAIT_BUCKETS)
        # Per label: cumulative bucket counts, then the count and the sum.
        durations = {s.value: [0.0] * (nd + 2) for s in FINAL_STATES}
        waits: dict[str, list[float]] = {}
        for status, gpu_class, count, *sums in rows:
            by_status[status] = by_status.get(status, 0) + count
            if status in durations:
                values = [float(v or 0) for v in sums]
                add(durations, status, values[: nd + 2])
                add(waits, gpu_class or "unknown", values[nd + 2 :])

        jobs = GaugeMetricFamily("lathe_jobs", "Jobs by status", labels=["status"])
        for status, count in sorted(by_status.items()):
            jobs.add_metric([status], count)
        duration_family = HistogramMetricFamily(
            "lathe_job_duration_seconds",
            "Started to finished (last claim to end) of jobs that ran, by final status",
            labels=["status"],
        )
        for status, sums in sorted(durations.items()):
            counts = [int(n) for n in sums[:nd]]
            _histogram(duration_family, [status], DURATION_BUCKETS, counts, int(sums[nd]), sums[-1])
        wait_family = HistogramMetricFamily(
            "lathe_dispatch_latency_seconds",
            "Created (queued) to started (claimed by a worker) of finished jobs that ran, "
            "by the GPU class they ran on",
            labels=["gpu_class"],
        )
        for gpu_class, sums in sorted(waits.items()):
            counts = [int(n) for n in sums[:nw]]
            _histogram(wait_family, [gpu_class], WAIT_BUCKETS, counts, int(sums[nw]), sums[-1])
        return [jobs, duration_family, wait_family]

    def _queue(self, session: Session) -> list[Metric]:
        """Waiting jobs per class they may run on, by the rule the scheduler and GET
        /v1/queue use (app.domain.memory.eligible_classes over the pool's classes): a job
        that fits several classes counts under each. Disabled teams' jobs are left out, as
        the scheduler leaves them."""
        classes = pool_classes(session, self.settings)
        depth = dict.fromkeys(classes, 0)
        rows = session.execute(
            select(Job.gpu_class, Job.memory_gb, func.count())
            .join(Team, Team.pk == Job.team_pk)
            .where(Job.status == JobStatus.QUEUED.value, Team.disabled.is_(False))
            .group_by(Job.gpu_class, Job.memory_gb)
        ).all()
        for gpu_class, memory_gb, count in rows:
            for name in eligible_classes(gpu_class, memory_gb, classes) or (NO_CLASS,):
                depth[name] = depth.get(name, 0) + count
        queue = GaugeMetricFamily(
            "lathe_queue_depth",
            "Queued jobs that may run on each GPU class (a job fitting several counts in each; "
            f"'{NO_CLASS}': fits no class the pool has now)",
            labels=["gpu_class"],
        )
        for name, count in sorted(depth.items()):
            queue.add_metric([name], count)
        pending = GaugeMetricFamily(
            "lathe_dispatches_pending",
            "Jobs sent to a class queue that no worker has claimed yet",
            labels=["gpu_class"],
        )
        sent = pending_dispatches(session)
        for name in sorted(set(classes) | set(sent)):
            pending.add_metric([name], sent.get(name, 0))
        return [queue, pending]

    def _workers(self, session: Session) -> list[Metric]:
        """Registered workers by state and class; a live-status worker silent past its
        lease counts as lost (as GET /v1/workers shows it), busy ones by `busy`."""
        at = time.time()
        family = GaugeMetricFamily(
            "lathe_workers",
            "GPU workers by state (active, draining, drained, lost, stopped) and class",
            labels=["state", "gpu_class"],
        )
        busy_family = GaugeMetricFamily(
            "lathe_workers_busy", "Live GPU workers running a job, by class", labels=["gpu_class"]
        )
        counts: dict[tuple[str, str], int] = {}
        busy: dict[str, int] = {}
        live = session.execute(
            select(Worker.status, Worker.gpu_class, Worker.last_seen, Worker.current_job).where(
                Worker.status.in_(LIVE_STATES)
            )
        ).all()  # one row per live worker: as many as GPUs
        for status, gpu_class, last_seen, current_job in live:
            state = shown_state(status, last_seen, at, self.settings)
            counts[(state, gpu_class)] = counts.get((state, gpu_class), 0) + 1
            busy.setdefault(gpu_class, 0)
            if state != WorkerState.LOST and current_job is not None:
                busy[gpu_class] += 1
        gone = session.execute(
            select(Worker.status, Worker.gpu_class, func.count())
            .where(Worker.status.not_in(LIVE_STATES))
            .group_by(Worker.status, Worker.gpu_class)
        ).all()
        for status, gpu_class, count in gone:
            counts[(status, gpu_class)] = counts.get((status, gpu_class), 0) + count
        for (state, gpu_class), count in sorted(counts.items()):
            family.add_metric([state, gpu_class], count)
        for gpu_class, count in sorted(busy.items()):
            busy_family.add_metric([gpu_class], count)
        return [family, busy_family]

    def _team_usage(self, session: Session) -> Metric:
        rows = session.execute(
            select(Team.id, Team.name, func.coalesce(func.sum(Job.gpu_seconds), 0.0))
            .select_from(Team)
            .outerjoin(Job, Job.team_pk == Team.pk)
            .group_by(Team.pk, Team.id, Team.name)
        ).all()
        family = CounterMetricFamily(
            "lathe_team_gpu_seconds",
            "GPU seconds metered on each team's jobs (added when a run on a GPU ends)",
            labels=["team", "team_id"],
        )
        for team_id, name, seconds in sorted(rows, key=lambda r: r[1]):
            family.add_metric([name, team_id], float(seconds))
        return family

    def _preemptions(self, session: Session) -> Metric:
        """Jobs paused by the scheduler for another team (app.services.preemptions), per
        team of the preempted job: the sum of the jobs' own counts, which only grow."""
        rows = session.execute(
            select(Team.id, Team.name, func.coalesce(func.sum(Job.preemptions), 0))
            .select_from(Team)
            .outerjoin(Job, Job.team_pk == Team.pk)
            .group_by(Team.pk, Team.id, Team.name)
        ).all()
        family = CounterMetricFamily(
            "lathe_preemptions",
            "Times the scheduler preempted a team's jobs for fair share",
            labels=["team", "team_id"],
        )
        for team_id, name, count in sorted(rows, key=lambda r: r[1]):
            family.add_metric([name, team_id], float(count))
        return family


# --- Wiring ----------------------------------------------------------------------------------


def metrics_response(request: Request) -> Response:
    """GET /metrics (not in the OpenAPI document). With LATHE_METRICS_TOKEN set, only
    `Authorization: Bearer <token>` may read it."""
    token = request.app.state.settings.metrics_token
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            raise Unauthorized(
                "/metrics needs 'Authorization: Bearer <LATHE_METRICS_TOKEN>'",
                code="invalid_metrics_token",
            )
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(request.app.state.metrics_registry), media_type=content_type)


def install_metrics(app: FastAPI) -> None:
    """The registry, the HTTP middleware, the database collector and GET /metrics; call
    after app.state.settings and app.state.sessionmaker are set."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    histogram = Histogram(
        "lathe_http_request_duration_seconds",
        "HTTP requests to this API process: method, route template, status code",
        ["method", "route", "status"],
        buckets=HTTP_BUCKETS,
        registry=registry,
    )
    registry.register(DatabaseCollector(app.state.sessionmaker, app.state.settings))
    app.state.metrics_registry = registry
    app.add_middleware(HTTPMetricsMiddleware, histogram=histogram)
    app.add_api_route("/metrics", metrics_response, methods=["GET"], include_in_schema=False)
