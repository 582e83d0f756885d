"""GET /v1/fine_tuning/jobs/{id}/events?stream=true: server-sent events until the job ends."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

from sqlalchemy import select

from app.models import Job
from app.services.events import add_event
from tests.api.datasets import CHAT


def new_job(team) -> str:
    file_id = team.upload(CHAT).json()["id"]
    resp = team.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-random-llama", "training_file": file_id}
    )
    return resp.json()["id"]


def messages(lines: Iterator[str]) -> Iterator[dict]:
    """Parse an SSE stream into {field: value} messages (comments and retry skipped)."""
    message: dict = {}
    for line in lines:
        if line == "":
            if "event" in message or "data" in message:
                yield message
            message = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            message[name] = value.removeprefix(" ")


def test_a_finished_job_streams_its_events_oldest_first_then_end(team) -> None:
    job_id = new_job(team)
    team.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    listed = team.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]

    with team.client.stream(
        "GET",
        f"/v1/fine_tuning/jobs/{job_id}/events?stream=true",
        headers={"Authorization": f"Bearer {team.key}"},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        received = list(messages(resp.iter_lines()))

    *events, end = received
    assert [m["event"] for m in events] == ["fine_tuning.job.event"] * len(listed)
    assert [m["id"] for m in events] == [e["id"] for e in reversed(listed)]
    assert [json.loads(m["data"]) for m in events] == list(reversed(listed))
    assert end["event"] == "end"
    assert json.loads(end["data"])["status"] == "cancelled"


def test_new_events_arrive_live_and_a_reconnect_resumes_after_the_last_seen(team, sessions) -> None:
    job_id = new_job(team)
    with sessions() as session:
        job_pk = session.scalar(select(Job.pk).where(Job.id == job_id))
    seen_initial = threading.Event()

    def write_then_cancel() -> None:
        assert seen_initial.wait(10)
        with sessions() as session:
            add_event(session, job_pk, "Step 1/4: training loss=1.0", type="metrics",
                      data={"step": 1, "total_steps": 4, "train_loss": 1.0})  # fmt: skip
            session.commit()
        team.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")

    writer = threading.Thread(target=write_then_cancel)
    writer.start()
    received = []
    with team.client.stream(
        "GET",
        f"/v1/fine_tuning/jobs/{job_id}/events?stream=true",
        headers={"Authorization": f"Bearer {team.key}"},
    ) as resp:
        for message in messages(resp.iter_lines()):
            received.append(message)
            if len(received) == 2:  # "Validating ..." and "Files validated ...": all so far
                seen_initial.set()
    writer.join()

    kinds = [json.loads(m["data"]).get("type") for m in received[:-1]]
    assert kinds == ["message", "message", "metrics", "message"]
    assert json.loads(received[2]["data"])["data"]["step"] == 1
    assert json.loads(received[3]["data"])["message"] == "Fine-tuning job cancelled"
    assert received[-1]["event"] == "end"

    # Reconnecting with Last-Event-ID gets only what came after it.
    with team.client.stream(
        "GET",
        f"/v1/fine_tuning/jobs/{job_id}/events?stream=true",
        headers={"Authorization": f"Bearer {team.key}", "Last-Event-ID": received[2]["id"]},
    ) as resp:
        again = list(messages(resp.iter_lines()))
    assert [m.get("id") for m in again] == [received[3]["id"], None]


def test_stream_refusals(team, other_team) -> None:
    job_id = new_job(team)
    url = f"/v1/fine_tuning/jobs/{job_id}/events?stream=true"
    assert other_team.get(url).status_code == 404
    bad = team.get(url + "&after=ftevent-nope")
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_cursor")
    assert team.client.get(url).status_code == 401
