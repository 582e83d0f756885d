"""The worker's Celery app: the shared configuration from app.queue plus the tasks."""

from __future__ import annotations

from app.config import get_settings
from app.queue import make_celery

celery = make_celery(get_settings())
celery.conf.update(include=["worker.tasks"])
