"""A production-shaped deployment for end-to-end tests: the API under uvicorn, a separate
`lathe worker` process, Postgres, Redis and moto's S3 server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from app.main import create_app
from tests.conftest import settings_from


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def live_api(stack_env: dict[str, str]) -> Iterator[str]:
    """Base URL of the API served by uvicorn in a thread."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings_from(stack_env)), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def worker_process(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen]:
    """A real `lathe worker` process consuming the stack's Redis queue."""
    log_path: Path = tmp_path_factory.mktemp("worker") / "worker.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--name", "e2e@%h"],
        env={**os.environ, **stack_env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 90
    while b" ready." not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the worker did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    if os.environ.get("LATHE_TEST_SHOW_WORKER_LOG"):
        print(log_path.read_text())


def wait_for(check, deadline_s: float, interval: float = 0.25, what: str = "condition"):
    """Poll `check()` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {deadline_s} s waiting for {what}")
