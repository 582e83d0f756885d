"""The Celery app's configuration, shared by the API (which sends tasks by name) and the
worker (which runs them). Nothing here imports torch or the worker's code."""

from __future__ import annotations

import ast
import json
import re

from celery import Celery

from app.config import Settings

TRAIN_TASK = "lathe.train_job"
QUEUE_PREFIX = "lathe.gpu."
WORKER_QUEUE_PREFIX = "lathe.worker."


def class_queue(gpu_class: str) -> str:
    """Each GPU class has its own queue; every worker of the class consumes it (tasks sent
    before dispatches named a worker, and by hand)."""
    return QUEUE_PREFIX + gpu_class


def worker_queue(worker_id: str) -> str:
    """Each worker host's own queue: the scheduler places a job on one host (all of a
    multi-GPU job's GPUs on the same one) and sends it there. Characters a transport may
    refuse or read specially ("@", dots, slashes: the embedded file-system queue takes
    only letters, digits, "_", "-" and ".") become underscores."""
    return WORKER_QUEUE_PREFIX + re.sub(r"[^A-Za-z0-9_-]", "_", worker_id)


def make_celery(settings: Settings) -> Celery:
    celery = Celery("lathe", broker=settings.resolved_broker_url)
    conf: dict = dict(
        task_acks_late=True,  # a job's message is acked only when the task ends...
        task_reject_on_worker_lost=True,  # ...and requeued if its process dies
        worker_prefetch_multiplier=1,  # an idle GPU never has a second job reserved
        worker_concurrency=1,  # `lathe worker` sets one pool process per GPU of its host
        # No worker_max_tasks_per_child: each job trains in a subprocess of its own
        # (worker.job_process), which returns all GPU memory when it exits, while the pool
        # process stays warm, so a freed slot takes its next task at once.
        task_create_missing_queues=True,
        task_ignore_result=True,  # outcomes live in the database, not a result backend
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )
    if settings.embedded:
        # No broker configured: a folder on disk is the queue (kombu's filesystem
        # transport), so the embedded default needs no server.
        folder = settings.broker_folder
        for sub in ("in", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "in"),
            "data_folder_out": str(folder / "in"),
            "processed_folder": str(folder / "processed"),
            # Where queue bindings live (kombu's default is ./control, the cwd).
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.5,
        }
    celery.conf.update(conf)
    return celery


def send_training_task(celery: Celery, job_id: str, token: int, worker_id: str) -> None:
    """Sent by the scheduler only when the worker has the job's GPUs free (late dispatch)."""
    celery.send_task(TRAIN_TASK, args=[job_id, token], queue=worker_queue(worker_id))


def tasks_in_broker(celery: Celery, queues: list[str]) -> set[tuple[str, int]] | None:
    """(job id, dispatch token) of each training task the broker holds: waiting in one of
    `queues`, or delivered to a worker and not yet acknowledged. None where the transport cannot be
    inspected (the embedded file-system queue): then only the dispatch timeout applies.

    Used to notice messages the broker lost (a Redis restart without persistence, a
    FLUSHALL) within seconds rather than after the dispatch timeout.
    """
    if not celery.conf.broker_url.startswith(("redis://", "rediss://")):
        return None
    found: set[tuple[str, int]] = set()
    with celery.connection_for_read() as conn:
        channel = conn.default_channel
        client = channel.client
        raw = [m for name in queues for m in client.lrange(name, 0, -1)]
        raw += [json.loads(v)[0] for v in client.hvals(channel.unacked_key)]
    for message in raw:
        body = json.loads(message) if isinstance(message, (bytes, str)) else message
        args = ast.literal_eval(body.get("headers", {}).get("argsrepr") or "[]")
        if len(args) >= 2:
            found.add((str(args[0]), int(args[1])))
    return found
