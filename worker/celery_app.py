"""The worker's Celery app: the shared configuration from app.broker, the tasks, and the
registry heartbeat wired to the worker's start and shutdown signals."""

from __future__ import annotations

import logging
import os

from celery.signals import worker_ready, worker_shutdown

from app.broker import class_queue, make_celery, worker_queue
from app.config import get_settings

celery = make_celery(get_settings())
celery.conf.update(include=["worker.tasks"])
log = logging.getLogger(__name__)
_heartbeat = None


@worker_ready.connect
def _start_heartbeat(sender=None, **_) -> None:
    global _heartbeat
    from app.db import make_engine, make_sessionmaker
    from worker.registry import Heartbeat, resolve_hardware

    settings = get_settings()
    hardware = resolve_hardware(settings)
    worker_id = os.environ["LATHE_WORKER_ID"]
    queues = (worker_queue(worker_id), class_queue(hardware.gpu_class))

    def on_drain(resume: bool = False) -> None:
        # Broadcast control: handled on the worker's own event loop, not this thread.
        for queue in queues:
            try:
                if resume:
                    celery.control.add_consumer(queue, destination=[worker_id], reply=False)
                else:
                    celery.control.cancel_consumer(queue, destination=[worker_id], reply=False)
            except Exception:
                log.exception("could not %s consuming %s", "resume" if resume else "stop", queue)

    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    _heartbeat = Heartbeat(sessions, settings, worker_id, hardware, on_drain)
    _heartbeat.start()


@worker_shutdown.connect
def _stop_heartbeat(**_) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
