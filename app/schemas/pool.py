"""The shared pool as the API shows it: workers, the queue, a job's place in line, and GPU
usage (Lathe's own objects, docs/scheduling.md)."""

from __future__ import annotations

from collections.abc import Container
from typing import TYPE_CHECKING, Literal

from app import models
from app.domain.jobs import JobStatus
from app.domain.workers import WorkerState
from app.schemas.common import ApiObject

if TYPE_CHECKING:
    from app.services.queue_view import Position


class Worker(ApiObject):
    id: str  # Celery's node name, NAME@HOST
    object: Literal["worker"] = "worker"
    host: str
    gpu_name: str
    gpu_class: str
    memory_gb: float  # of each of its GPUs
    gpus: int  # the host's GPUs, all of its class
    status: WorkerState
    busy: bool  # it has a job, whether or not `current_job` may be shown
    gpus_busy: int  # of its GPUs, those a run holds
    current_job: str | None  # the latest job it started that still runs there
    jobs_done: int
    started_at: int
    last_seen: int  # the last heartbeat, epoch seconds


def worker_object(
    worker: models.Worker,
    *,
    status: str | None = None,
    shown_jobs: Container[str] | None = None,
    gpus_busy: int | None = None,
) -> Worker:
    """A worker, for the pool's listing or an admin. `status`: the state shown, when not the
    stored one (a silent worker shows `lost` before the scheduler marks it so:
    app.services.pool.shown_state). `shown_jobs`: the job ids the caller may see (a team's
    own); another team's job shows only as `busy`. None: every job (an admin).
    `gpus_busy`: its GPUs a run holds (app.services.pool.busy_gpus); None: one per job
    shown on it."""
    job = worker.current_job
    held = (1 if job is not None else 0) if gpus_busy is None else gpus_busy
    return Worker(
        id=worker.id,
        host=worker.host,
        gpu_name=worker.gpu_name,
        gpu_class=worker.gpu_class,
        memory_gb=worker.memory_gb,
        gpus=worker.gpus or 1,
        status=worker.status if status is None else status,
        busy=held > 0 or job is not None,
        gpus_busy=held,
        current_job=job if shown_jobs is None or job in shown_jobs else None,
        jobs_done=worker.jobs_done,
        started_at=worker.started_at,
        last_seen=int(worker.last_seen),
    )


class QueueClass(ApiObject):
    gpu_class: str
    memory_gb: float | None  # null: a class only queued jobs ask for, no worker announced
    workers: int  # live workers
    busy: int  # live workers with a job
    draining: int  # live workers draining or drained
    queued: int  # queued jobs that could run on the class
    queued_by_team: dict[str, int]


class QueueTeam(ApiObject):
    team_id: str
    name: str
    weight: float
    queued: int
    running: int
    recent_gpu_seconds: float  # the decayed usage fair share weighs, without running jobs


class QueueSummary(ApiObject):
    object: Literal["queue"] = "queue"
    classes: list[QueueClass]
    teams: list[QueueTeam]  # teams with jobs queued or running


class JobQueuePosition(ApiObject):
    """One of the team's jobs and its place in line; the place fields are null unless the
    job waits."""

    object: Literal["fine_tuning.job.queue"] = "fine_tuning.job.queue"
    job_id: str
    status: JobStatus
    priority: str
    gpu_class: str | None
    memory_gb: float
    eligible_gpu_classes: list[str] | None
    position: int | None
    estimated_start: int | None
    # Set while no worker of a class the job fits is online: it waits for one.
    waiting_for: str | None
    estimated_finish: int | None
    worker: str | None  # while running


def queue_position(job: models.Job, place: Position | None) -> JobQueuePosition:
    """`place`: the job's place among the waiting (app.services.queue_view.job_position),
    None when it does not wait."""
    return JobQueuePosition(
        job_id=job.id,
        status=job.status,
        priority=job.priority,
        gpu_class=job.gpu_class,
        memory_gb=job.memory_gb,
        eligible_gpu_classes=sorted(place.eligible) if place else None,
        position=place.position if place else None,
        estimated_start=place.estimated_start if place else None,
        waiting_for=place.waiting_for if place else None,
        estimated_finish=job.estimated_finish,
        worker=job.worker if job.status == JobStatus.RUNNING else None,
    )


class Usage(ApiObject):
    """A team's GPU time in one calendar month (app.services.usage)."""

    object: Literal["usage"] = "usage"
    team_id: str
    team: str  # its name
    period: str  # YYYY-MM
    gpu_seconds: float
    jobs: int
    by_gpu_class: dict[str, float]
    gpu_hours: float


class TeamUsage(Usage):
    gpu_hours_quota: float | None  # the team's limit; null: none


class UsageList(ApiObject):
    """Every team's usage for one month (GET /v1/admin/usage), on one page."""

    object: Literal["list"] = "list"
    data: list[Usage]
    has_more: bool
