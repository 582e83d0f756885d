"""The background loops of the API process (or of `lathe scheduler`): a scheduler pass
(app.services.scheduler.schedule_once) every interval, and the sweep of orphaned uploads.

Beside them, a second thread sends webhook deliveries, so a slow receiver never holds up
scheduling."""

from __future__ import annotations

import logging
import threading
import time

from app.broker import make_celery
from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.services.files import sweep_orphans
from app.services.scheduler import schedule_once
from app.services.webhooks import deliver_due, sender_client
from app.storage import open_store

log = logging.getLogger(__name__)


def run_forever(settings: Settings, stop: threading.Event | None = None) -> None:
    """One pass every `scheduler_interval_seconds` until `stop` is set."""
    stop = stop or threading.Event()
    engine = make_engine(settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    celery = make_celery(settings)
    store = open_store(settings.resolved_storage_url, settings.s3_endpoint_url)
    last_sweep = 0.0
    webhooks = threading.Thread(
        target=deliver_webhooks_forever,
        args=(settings, sessions, stop),
        name="lathe-webhooks",
        daemon=True,
    )
    webhooks.start()
    try:
        while not stop.is_set():
            try:
                schedule_once(sessions, settings, celery)
            except Exception:  # the database or broker may be briefly away
                log.exception("scheduler pass failed; retrying")
            if time.monotonic() - last_sweep >= settings.sweep_interval_seconds:
                last_sweep = time.monotonic()
                try:
                    with sessions() as session:
                        removed = sweep_orphans(session, store)
                    if removed:
                        log.info("swept %d objects left by interrupted uploads", removed)
                except Exception:
                    log.exception("sweep failed; retrying later")
            stop.wait(settings.scheduler_interval_seconds)
    finally:
        stop.set()
        webhooks.join(timeout=settings.webhook_timeout_seconds + 5)
        engine.dispose()


def deliver_webhooks_forever(settings: Settings, sessions, stop: threading.Event) -> None:
    """Send due webhook deliveries until `stop`; idle, look again every second."""
    # Each connection checks its address against LATHE_WEBHOOK_DENIED_NETWORKS (egress.py).
    with sender_client(settings) as client:
        while not stop.is_set():
            sent = 0
            try:
                sent = deliver_due(sessions, client, settings)
            except Exception:  # the database may be briefly away
                log.exception("webhook delivery pass failed; retrying")
            if not sent:
                stop.wait(1.0)


class SchedulerThread:
    """Runs the loop beside the API (LATHE_SCHEDULER_IN_API, the default)."""

    def __init__(self, settings: Settings) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=run_forever, args=(settings, self.stop), name="lathe-scheduler", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
