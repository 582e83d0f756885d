"""No process Lathe starts outlives its parent: `lathe serve` (embedded) stopped with
SIGTERM, or killed with SIGKILL, in the middle of a job, leaves no worker, Celery pool
process or training process of its home behind (app/lifetime.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.cli import SHUTDOWN_GRACE_SECONDS
from tests.e2e.conftest import free_port, wait_for
from tests.e2e.processes import embedded_home, kill_all, wait_for_processes

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[2] / "app" / "data"
GONE_WITHIN_S = 15  # the worker's cold shutdown; a job is not waited for


def training(found: dict[int, str]) -> bool:
    return any("worker.job_process" in cmd for cmd in found.values())


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopping_the_embedded_server_mid_job_leaves_no_process_of_its_home(
    tmp_path: Path, stop: signal.Signals
) -> None:
    home = tmp_path / "home"
    env, key = embedded_home(home, "lifetime")
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # The worker is up once Celery says so (its log goes to the server's stderr).
        wait_for(lambda: b" ready." in log_path.read_bytes(), 120, what="the embedded worker")
        with contextlib.ExitStack() as stack:
            client = stack.enter_context(
                httpx.Client(
                    base_url=f"http://127.0.0.1:{port}",
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=30,
                )
            )
            with (DATA / "sample_chat.jsonl").open("rb") as fh:
                upload = client.post(
                    "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", fh)}
                )
            assert upload.status_code == 200, upload.text
            file_id = upload.json()["id"]
            job = client.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": "tiny-random-llama",
                    "training_file": file_id,
                    "hyperparameters": {"n_epochs": 50, "batch_size": 1},  # minutes of work
                },
            )
            assert job.status_code == 200, job.text
            running = wait_for_processes(home, training, 180)
            assert training(running), f"no training process started: {running}"
            # serve, the worker, its pool process and the training process: all of this home.
            assert len(running) >= 4, running
            # An open event stream never ends by itself; it must not hold up the stop.
            stream = stack.enter_context(
                client.stream(
                    "GET",
                    f"/v1/fine_tuning/jobs/{job.json()['id']}/events",
                    params={"stream": "true"},
                )
            )
            assert stream.status_code == 200
            next(stream.iter_lines())

            server.send_signal(stop)
            # After SIGTERM, its cleanup done (the open stream closed after
            # SHUTDOWN_GRACE_SECONDS), serve ends by the signal, as a supervisor expects.
            assert server.wait(timeout=SHUTDOWN_GRACE_SECONDS + GONE_WITHIN_S) == -stop
            left = wait_for_processes(home, lambda found: not found, GONE_WITHIN_S)
            assert left == {}, f"still running after {stop.name} to lathe serve: {left}"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        kill_all(home)


def test_killing_lathe_demo_mid_job_leaves_no_process_of_its_home(tmp_path: Path) -> None:
    """`lathe demo` runs `lathe serve` (which runs the worker): SIGKILLed, nothing of the
    demo is left, the server having stopped as on SIGTERM."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATHE_")}
    env["LATHE_HOME"] = str(home)
    demo = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "demo", "--port", str(free_port())],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        running = wait_for_processes(home, training, 180)
        assert training(running), f"the demo's job never started training: {running}"
        demo.kill()
        demo.wait()
        left = wait_for_processes(home, lambda found: not found, GONE_WITHIN_S)
        assert left == {}, f"still running after SIGKILL to lathe demo: {left}"
    finally:
        demo.kill()
        demo.wait()
        kill_all(home)
