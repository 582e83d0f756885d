"""A real `mlflow server` for the tracking tests: SQLite backend store, artifacts served by
the server itself (uploaded over HTTP, as a worker on another machine would), on a free
port of 127.0.0.1.

The session fixture ``mlflow_tracking_uri`` (tests/conftest.py) serves every test that
only logs; a test that stops the server mid-run starts its own with
``running_mlflow_server``.

The server is a process tree (mlflow's CLI, uvicorn, its worker). It is started through
this module's launcher, the leader of a process group of its own, which dies with pytest
(app.lifetime.die_with_parent: even a SIGKILLed pytest) and takes the whole group with it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.lifetime import child_env, die_with_parent, stop_child

MLFLOW = Path(sys.executable).with_name("mlflow")
ROOT = Path(__file__).resolve().parents[1]
START_DEADLINE_S = 120.0  # about 10 s on two cores; imports dominate


@dataclass
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        """Stop the server and everything it started, at once."""
        stop_child(self.process, grace_s=10.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(root: Path, port: int) -> list[str]:
    return [
        str(MLFLOW),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


@contextmanager
def running_mlflow_server(root: Path) -> Iterator[MlflowServer]:
    """An `mlflow server` storing under `root`, serving until the block ends (or its
    `stop()`)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "mlflow-server.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # the launcher is this module; the server runs in `root`
        # The server's job runner (several huey consumers) serves MLflow's GenAI
        # evaluation jobs, which these tests never start.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.tracking_server", *server_command(root, port)],
            env=child_env(env),  # it dies with pytest, even a killed one
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the launcher leads the server's process group
            cwd=root,
        )
    server = MlflowServer(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_healthy(server)
        yield server
    finally:
        server.stop()


def wait_healthy(server: MlflowServer) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited:\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.uri}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server not healthy:\n{server.log.read_text()[-3000:]}")
        time.sleep(0.2)


def launch(command: list[str]) -> int:
    """The launcher: run `command` in this process group, which dies when pytest does."""

    def kill_group(signum: int, frame: object) -> None:
        os.killpg(os.getpgrp(), signal.SIGKILL)

    signal.signal(signal.SIGTERM, kill_group)
    die_with_parent(signal.SIGTERM)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
