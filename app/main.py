"""create_app(): the FastAPI application, with its routers and shared resources."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from app.api import admin, base_models, exports, files, health, jobs, pool, webhooks
from app.api.error_handlers import install_error_handlers
from app.api.event_stream import EventHub
from app.background import SchedulerThread
from app.broker import make_celery
from app.config import Settings, get_settings
from app.db import API_CONNECTIONS, API_THREADS, make_engine, make_sessionmaker
from app.logs import RequestContextMiddleware
from app.metrics import install_metrics
from app.ratelimit import RateLimitMiddleware
from app.storage import open_store
from app.web import install_page_handlers
from app.web import router as dashboard


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Sized with the connection pool (app/db.py): one connection per thread.
        anyio.to_thread.current_default_thread_limiter().total_tokens = API_THREADS
        scheduler = SchedulerThread(settings) if settings.scheduler_in_api else None
        if scheduler:
            scheduler.start()
        yield
        if scheduler:
            scheduler.close()
        app.state.engine.dispose()

    app = FastAPI(
        title="Lathe", version="0.1.0", summary="4-bit QLoRA fine-tuning jobs", lifespan=lifespan
    )
    app.state.settings = settings
    app.state.engine = make_engine(settings.resolved_database_url, max_connections=API_CONNECTIONS)
    app.state.sessionmaker = make_sessionmaker(app.state.engine)
    # One poller for every open event stream (GET .../events?stream=true).
    app.state.event_hub = EventHub(app.state.sessionmaker, settings.event_stream_poll_seconds)
    app.state.store = open_store(settings.resolved_storage_url, settings.s3_endpoint_url)
    app.state.celery = make_celery(settings)
    install_error_handlers(app)
    if settings.rate_limit_per_minute:
        app.add_middleware(
            RateLimitMiddleware,
            per_minute=settings.rate_limit_per_minute,
            broker_url=settings.broker_url,
        )
    install_metrics(app)  # GET /metrics and HTTP latency, outside the rate limit (app/metrics.py)
    app.add_middleware(RequestContextMiddleware)  # log ids and the access log (app/logs.py)
    for module in (health, files, jobs, exports, base_models, pool, admin, webhooks):
        app.include_router(module.router)
    app.include_router(dashboard)  # the web dashboard at / (app/web, docs/dashboard.md)
    install_page_handlers(app)
    return app
