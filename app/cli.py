"""The `lathe` command: serve, worker, migrate, admin and demo; and the client (app/client)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from app.client import commands as client
from app.config import get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

app = typer.Typer(
    help="Lathe: 4-bit QLoRA fine-tuning jobs over an OpenAI-compatible API.", no_args_is_help=True
)
admin = typer.Typer(help="Administration: teams and keys.", no_args_is_help=True)
app.add_typer(admin, name="admin")
console = Console(stderr=True)

# The client (docs/cli.md): it talks HTTP only and never imports torch.
app.command(rich_help_panel="Client")(client.login)
app.add_typer(client.files_app, name="files", rich_help_panel="Client")
app.add_typer(client.jobs_app, name="jobs", rich_help_panel="Client")
app.command(rich_help_panel="Client")(client.workers)
app.command(rich_help_panel="Client")(client.usage)


@app.command()
def migrate() -> None:
    """Build or upgrade the database schema (Alembic migrations)."""
    from app.migrate import upgrade

    settings = get_settings()
    upgrade(settings.resolved_database_url)
    console.print(f"database at head: {settings.resolved_database_url.split('@')[-1]}")


class _Stopped(BaseException):
    """A stop signal, raised in the main thread (BaseException: nothing catches it midway)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> None:
    """SIGTERM, SIGINT and SIGHUP raise _Stopped, once: the cleanup it unwinds into is not
    interrupted by a second one. uvicorn handles SIGTERM and SIGINT itself while it runs,
    then restores these handlers and raises the signal again after its graceful shutdown:
    without a handler of ours SIGTERM would kill the process there, skipping every
    `finally` (and leaving the embedded worker running)."""
    stopping = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise _Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="Port to listen on."),
) -> None:
    """Run the API. With no LATHE_BROKER_URL it also runs its own worker (embedded mode)."""
    from app.lifetime import die_with_parent

    _stop_on_signals()
    # Started by `lathe demo`: stop cleanly (as on SIGTERM) when the demo is gone.
    die_with_parent(signal.SIGTERM, grace_s=30)
    try:
        _serve(host, port)
    except _Stopped as stopped:
        # Cleaned up: now end as the signal would have (the status a supervisor expects).
        signal.signal(stopped.signum, signal.SIG_DFL)
        signal.raise_signal(stopped.signum)


SHUTDOWN_GRACE_SECONDS = 5


def _serve(host: str, port: int) -> None:
    import uvicorn

    from app.lifetime import child_env, stop_child
    from app.logs import configure_logging
    from app.main import create_app

    settings = get_settings()
    configure_logging(settings.log_format)
    worker = None
    try:
        if settings.embedded:
            from app.migrate import upgrade

            upgrade(settings.resolved_database_url)
            # The worker is a child process (the API process never imports torch), in a
            # process group of its own with its pool and training process: stopped
            # together below, and each dies with its parent if this process is killed
            # (app/lifetime.py).
            worker = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker"],
                env=child_env(),
                start_new_session=True,
            )
            console.print(f"embedded mode: worker pid {worker.pid}, data in {settings.home}")
        # Request lines come from app.logs' access log (with request and team ids); in
        # JSON, uvicorn's own lines go through the root logger's JSON handler too.
        json_logs = {"log_config": None} if settings.log_format == "json" else {}
        uvicorn.run(
            create_app(settings),
            host=host,
            port=port,
            log_level="info",
            access_log=False,
            # Open event streams never end by themselves: past this, a stop closes them
            # (clients reconnect to another replica and resume after their last event).
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
            **json_logs,
        )
    finally:
        if worker is not None:
            # A cold Celery shutdown: a running job is not waited for; its worker marks
            # itself stopped and the job goes back in line, to resume from its last
            # checkpoint on the next start.
            stop_child(worker, signal.SIGQUIT, grace_s=10)


@app.command()
def worker(
    gpu_class: str = typer.Option(
        None, help="GPU class to announce and consume (default: detected, e.g. h100-80gb)."
    ),
    memory_gb: float = typer.Option(None, help="GPU memory to announce (default: detected)."),
    name: str = typer.Option(None, help="Worker id (default: lathe-CLASS-PID@HOST)."),
    loglevel: str = typer.Option("INFO"),
) -> None:
    """Run a Celery worker for this host's GPUs: one pool process per GPU, each job in a
    fresh process (a multi-GPU job's ranks on the GPUs it holds)."""
    from app.lifetime import die_with_parent

    # Started by `lathe serve` (embedded): a cold shutdown when the server is gone, then
    # SIGKILL for this process group (the pool and the training process) if it lingers.
    die_with_parent(signal.SIGQUIT, grace_s=10)
    if gpu_class:
        os.environ["LATHE_WORKER_GPU_CLASS"] = gpu_class
    if memory_gb:
        os.environ["LATHE_WORKER_MEMORY_GB"] = str(memory_gb)
    get_settings.cache_clear()
    settings = get_settings()

    from app.broker import class_queue, worker_queue
    from worker.registry import default_worker_id, resolve_hardware

    hardware = resolve_hardware(settings)
    worker_id = name or settings.worker_name or default_worker_id(hardware.gpu_class)
    if "@" not in worker_id:  # Celery names nodes NAME@HOST; drains address that name
        worker_id = f"{worker_id}@{socket.gethostname()}"
    os.environ["LATHE_WORKER_ID"] = worker_id  # read by the heartbeat and the job process

    from app.logs import install_celery_logging, set_process_fields
    from worker.celery_app import celery

    set_process_fields(worker=worker_id)
    install_celery_logging(settings.log_format)

    console.print(
        f"worker {worker_id}: {hardware.gpus} x class {hardware.gpu_class}, "
        f"{hardware.memory_gb} GB ({hardware.gpu_name}), queue {worker_queue(worker_id)}"
    )
    celery.worker_main(
        [
            "worker",
            f"--loglevel={loglevel}",
            # One pool process per GPU: jobs side by side, a multi-GPU job in one of them.
            f"--concurrency={hardware.gpus}",
            "--pool=prefork",
            "-O",
            "fair",
            "-Q",
            f"{worker_queue(worker_id)},{class_queue(hardware.gpu_class)}",
            "-n",
            worker_id,
            "--without-gossip",
            "--without-mingle",
            # Task events for Flower (docker-compose.yml); not on the embedded file queue.
            *([] if settings.embedded else ["--task-events"]),
        ]
    )


@app.command()
def scheduler() -> None:
    """Run the scheduler: dispatch queued jobs to free GPU slots, fairly; mark lost workers."""
    from app.background import run_forever
    from app.logs import configure_logging

    configure_logging(get_settings().log_format)
    run_forever(get_settings())


@contextmanager
def _database_session() -> Iterator[Session]:
    """A session on the configured database for one admin command; the engine goes with it."""
    from app.db import make_engine, make_sessionmaker

    engine = make_engine(get_settings().resolved_database_url)
    try:
        with make_sessionmaker(engine)() as session:
            yield session
    finally:
        engine.dispose()


@admin.command("create-team")
def create_team(name: str) -> None:
    """Create a team and print its new API key (shown once) as the last line."""
    import re

    from app.services.teams import TeamExists
    from app.services.teams import create_team as create

    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", name):
        console.print(
            "team names are 1-63 of a-z, 0-9, '-' and '_', starting with a letter or digit"
        )
        raise typer.Exit(2)
    try:
        with _database_session() as session:
            team, key = create(session, name)
    except TeamExists as exc:
        console.print(str(exc))
        raise typer.Exit(1) from None
    console.print(f"created team {team.name} ({team.id}); its API key is shown once:")
    print(key)


@admin.command("create-admin-key")
def create_admin_key(name: str) -> None:
    """Create an admin key for /v1/admin and print it (shown once) as the last line."""
    from app.errors import APIError
    from app.services.admin_keys import create_admin_key as create

    try:
        with _database_session() as session:
            record, key = create(session, name)
    except APIError as exc:
        console.print(exc.message)
        raise typer.Exit(2) from None
    console.print(f"created admin key {record.name} ({record.id}); it is shown once:")
    print(key)


@admin.command("team-preemptible")
def team_preemptible(
    team: str,
    preemptible: bool = typer.Option(
        ..., "--on/--off", help="--off: the scheduler never preempts its jobs; --on: default."
    ),
) -> None:
    """Mark a team (name or id) preemptible or not; audited with actor "cli"."""
    from app.errors import APIError
    from app.services.team_admin import set_preemptible

    try:
        with _database_session() as session:
            name = set_preemptible(session, team, preemptible).name
    except APIError as exc:
        console.print(exc.message)
        raise typer.Exit(1) from None
    console.print(f"team {name}: preemptible {'on' if preemptible else 'off'}")


@admin.command("job-preemptible")
def job_preemptible(
    job_id: str,
    preemptible: bool = typer.Option(
        ..., "--on/--off", help="--off: the scheduler never preempts it; --on: default."
    ),
) -> None:
    """Mark a job that has not ended preemptible or not; audited with actor "cli"."""
    from app.errors import APIError
    from app.services.audit import CLI_ACTOR
    from app.services.job_admin import set_preemptible

    try:
        with _database_session() as session:
            set_preemptible(session, CLI_ACTOR, job_id, preemptible)
    except APIError as exc:
        console.print(exc.message)
        raise typer.Exit(1) from None
    console.print(f"job {job_id}: preemptible {'on' if preemptible else 'off'}")


@app.command()
def demo(port: int = typer.Option(8123, help="Port for the demo server.")) -> None:
    """Start an embedded server, fine-tune tiny-random-llama on a sample, fetch the adapter."""
    from app.demo import run_demo

    run_demo(port)


if __name__ == "__main__":
    app()
