"""The embedded default: `lathe serve` with nothing configured (SQLite, a local object
directory, a folder queue and its own worker process) runs a job to the end, and leaves
no process behind when stopped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port, wait_for
from tests.e2e.processes import embedded_home, kill_all, wait_for_processes

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[2] / "app" / "data"


def test_embedded_server_trains_a_job(tmp_path: Path) -> None:
    env, key = embedded_home(tmp_path / "home", "embedded")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            timeout=30,
            headers={"Authorization": f"Bearer {key}"},
        )

        def ready() -> bool:
            try:
                return client.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 60, what="the embedded server")
        with (DATA / "sample_chat.jsonl").open("rb") as fh:
            file_id = client.post(
                "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", fh)}
            ).json()["id"]
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "tiny-random-llama",
                "training_file": file_id,
                "hyperparameters": {"n_epochs": 1, "batch_size": 8},
            },
        ).json()
        job = wait_for(
            lambda: (
                (j := client.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"]
                in ("succeeded", "failed", "cancelled")
                and j
            ),
            180,
            what="the embedded job",
        )
        assert job["status"] == "succeeded", job["error"]
        assert (tmp_path / "home" / "lathe.db").exists()
        assert (tmp_path / "home" / "models" / "tiny-random-llama" / "model.safetensors").exists()
        # The dataset, the adapter, metrics.csv and each checkpoint's adapter, under the
        # team's prefix.
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
        assert len(checkpoints) == 1 and checkpoints[0]["adapter_file"]
        stored = list((tmp_path / "home" / "objects" / "teams").glob("*/files/*"))
        assert len(stored) == 3 + len(checkpoints)
        # Stopped, the server takes its worker and the worker's pool process with it.
        server.terminate()
        server.wait(timeout=30)
        left = wait_for_processes(tmp_path / "home", lambda found: not found, 15)
        assert left == {}, f"still running after lathe serve stopped: {left}"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        kill_all(tmp_path / "home")
