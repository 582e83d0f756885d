"""GET /v1/fine_tuning/jobs/{id}/events?stream=true: server-sent events until the job ends."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator

from sqlalchemy import select, update

from app.models import ApiKey, Job, Team, now
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
    initial = len(team.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"])
    received = []
    with team.client.stream(
        "GET",
        f"/v1/fine_tuning/jobs/{job_id}/events?stream=true",
        headers={"Authorization": f"Bearer {team.key}"},
    ) as resp:
        for message in messages(resp.iter_lines()):
            received.append(message)
            if len(received) == initial:  # "Validating ...", "Files validated ...", ...
                seen_initial.set()
    writer.join()

    kinds = [json.loads(m["data"]).get("type") for m in received[:-1]]
    assert kinds == ["message"] * initial + ["metrics", "message"]
    assert json.loads(received[initial]["data"])["data"]["step"] == 1
    assert json.loads(received[-2]["data"])["message"] == "Fine-tuning job cancelled"
    assert received[-1]["event"] == "end"

    # Reconnecting with Last-Event-ID gets only what came after it.
    with team.client.stream(
        "GET",
        f"/v1/fine_tuning/jobs/{job_id}/events?stream=true",
        headers={"Authorization": f"Bearer {team.key}", "Last-Event-ID": received[-3]["id"]},
    ) as resp:
        again = list(messages(resp.iter_lines()))
    assert [m.get("id") for m in again] == [received[-2]["id"], None]


def test_stream_refusals(team, other_team) -> None:
    job_id = new_job(team)
    url = f"/v1/fine_tuning/jobs/{job_id}/events?stream=true"
    assert other_team.get(url).status_code == 404
    bad = team.get(url + "&after=ftevent-nope")
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_cursor")
    assert team.client.get(url).status_code == 401


STREAM_ENDS_WITHIN_S = 15  # the key is re-checked at every poll (0.5 s by default)


def watch_until_end(team, sessions, job_id: str, meanwhile: Callable[[], None]) -> list[dict]:
    """Stream a job's events; once its backlog is in, run `meanwhile` (which should end the
    stream). Fails if the stream goes on for STREAM_ENDS_WITHIN_S after that; then the job
    is cancelled behind the API's back, so that a stream that would never end does."""
    backlog = len(team.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"])
    caught_up, ended = threading.Event(), threading.Event()
    outcome: dict[str, bool] = {}

    def act() -> None:
        if not caught_up.wait(STREAM_ENDS_WITHIN_S):
            outcome["backlog"] = False
        else:
            meanwhile()
        if not ended.wait(STREAM_ENDS_WITHIN_S):
            outcome["hung"] = True
            with sessions() as session:
                session.execute(update(Job).where(Job.id == job_id).values(status="cancelled"))
                session.commit()

    actor = threading.Thread(target=act)
    actor.start()
    received: list[dict] = []
    with team.client.stream(
        "GET",
        f"/v1/fine_tuning/jobs/{job_id}/events?stream=true",
        headers={"Authorization": f"Bearer {team.key}"},
    ) as resp:
        assert resp.status_code == 200
        for message in messages(resp.iter_lines()):
            received.append(message)
            if len(received) == backlog:
                caught_up.set()
    ended.set()
    actor.join()
    assert outcome == {}, f"the stream did not end by itself: {outcome}"
    assert len(received) > backlog
    return received


def test_a_paused_job_streams_its_events_then_ends_with_the_paused_job(team) -> None:
    job_id = new_job(team)
    assert team.post(f"/v1/fine_tuning/jobs/{job_id}/pause").status_code == 200
    listed = team.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    done = threading.Event()
    received: list[dict] = []

    def read() -> None:
        with team.client.stream(
            "GET",
            f"/v1/fine_tuning/jobs/{job_id}/events?stream=true",
            headers={"Authorization": f"Bearer {team.key}"},
        ) as resp:
            received.extend(messages(resp.iter_lines()))
        done.set()

    reader = threading.Thread(target=read)
    reader.start()
    ended = done.wait(STREAM_ENDS_WITHIN_S)
    if not ended:  # the old behaviour: never; cancel so that the reader returns
        team.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    reader.join()
    assert ended, "the paused job's stream did not end"

    *events, end = received
    assert [m["id"] for m in events] == [e["id"] for e in reversed(listed)]
    assert end["event"] == "end"
    assert json.loads(end["data"])["status"] == "paused"


def test_a_stream_ends_when_its_job_is_paused(team, sessions) -> None:
    job_id = new_job(team)

    def pause() -> None:
        assert team.post(f"/v1/fine_tuning/jobs/{job_id}/pause").status_code == 200

    *events, end = watch_until_end(team, sessions, job_id, pause)
    assert json.loads(events[-1]["data"])["message"] == "Fine-tuning job paused"
    assert (end["event"], json.loads(end["data"])["status"]) == ("end", "paused")


def test_revoking_the_key_ends_its_open_stream_with_an_error(team, sessions) -> None:
    job_id = new_job(team)

    def revoke() -> None:
        with sessions() as session:
            team_pk = session.scalar(select(Team.pk).where(Team.id == team.id))
            session.execute(
                update(ApiKey).where(ApiKey.team_pk == team_pk).values(revoked_at=now())
            )
            session.commit()

    last = watch_until_end(team, sessions, job_id, revoke)[-1]
    assert last["event"] == "error"
    assert json.loads(last["data"])["error"]["code"] == "invalid_api_key"
    assert team.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 401


def test_disabling_the_team_ends_its_open_stream_with_an_error(team, sessions) -> None:
    job_id = new_job(team)

    def disable() -> None:
        with sessions() as session:
            session.execute(update(Team).where(Team.id == team.id).values(disabled=True))
            session.commit()

    last = watch_until_end(team, sessions, job_id, disable)[-1]
    assert last["event"] == "error"
    assert json.loads(last["data"])["error"]["code"] == "team_disabled"
