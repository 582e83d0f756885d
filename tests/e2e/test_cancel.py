"""Cancel of a running job on a real worker: training stops within a few steps, nothing
is published, and the same worker (the only one of its class) takes the next job."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import create_team_key, settings_from
from tests.e2e.conftest import SMALL, submit, team_client, upload, wait_for
from worker.job_runner import run_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(live_api: str, stack_env: dict[str, str], workers) -> httpx.Client:
    _, key = create_team_key(stack_env, "cancel")
    with team_client(live_api, key) as client:
        yield client


def start_job(api: httpx.Client, n_epochs: int) -> str:
    return submit(api, upload(api, "sample_chat.jsonl"), n_epochs, gpu_class=SMALL)


def events(api: httpx.Client, job_id: str) -> list[dict]:
    return api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]


def test_cancel_stops_training_and_frees_the_worker(api: httpx.Client, workers) -> None:
    long_job = start_job(api, n_epochs=50)
    wait_for(
        lambda: any(e["type"] == "metrics" for e in events(api, long_job)),
        180,
        what="the first training step",
    )
    assert api.post(f"/v1/fine_tuning/jobs/{long_job}/cancel").json()["status"] == "cancelled"

    # The worker is free again when it starts the next job.
    next_job = start_job(api, n_epochs=1)
    wait_for(
        lambda: api.get(f"/v1/fine_tuning/jobs/{next_job}").json()["status"] == "running",
        120,
        what="the next job to start",
    )
    assert api.get(f"/v1/fine_tuning/jobs/{next_job}/queue").json()["worker"] == workers[SMALL]
    api.post(f"/v1/fine_tuning/jobs/{next_job}/cancel")

    timeline = events(api, long_job)[::-1]  # oldest first
    cancelled_at = next(i for i, e in enumerate(timeline) if e["message"].endswith("cancelled"))
    steps_after_cancel = [e for e in timeline[cancelled_at:] if e["type"] == "metrics"]
    assert len(steps_after_cancel) <= 2
    job = api.get(f"/v1/fine_tuning/jobs/{long_job}").json()
    assert job["result_files"] == []
    assert job["fine_tuned_model"] is None
    assert job["status"] == "cancelled"


def test_a_second_delivery_of_a_finished_job_is_a_no_op(api, stack_env) -> None:
    job_id = api.get("/v1/fine_tuning/jobs", params={"limit": 1}).json()["data"][0]["id"]
    assert run_job(job_id, settings_from(stack_env)) == "skipped (cancelled)"
    assert api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "cancelled"
