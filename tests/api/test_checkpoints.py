"""A job's checkpoints, one by one and listed: each names its adapter's file (Lathe's
`adapter_file`), which downloads from the files API like the job's adapter.tar.gz.

The checkpoints are written here as a worker leaves them (the archive in S3 under the
team's files, its File row, the Checkpoint row naming it); nothing here trains. The worker's
side is tests/worker/test_checkpoint_adapters.py."""

from __future__ import annotations

import hashlib
import io
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.compat import tarfile  # filter="data" on Python 3.11.2 too
from app.db import make_engine, make_sessionmaker
from app.main import create_app
from app.migrate import upgrade
from app.models import Checkpoint, File, Job, Team
from app.storage import file_key, open_store
from tests.api.conftest import TeamClient
from tests.api.datasets import CHAT
from tests.conftest import create_team_key, settings_from
from tests.openapi import schema_errors, served_document


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return served_document()


def adapter_archive() -> bytes:
    """A flat tar.gz of an adapter's two files, as the worker packs a checkpoint's."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, content in (("adapter_config.json", b"{}"), ("adapter_model.safetensors", b"w")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def create_job(team) -> str:
    training_file = team.upload(CHAT).json()["id"]
    resp = team.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-random-llama", "training_file": training_file}
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def add_checkpoint(sessions, api_env, team, job_id: str, step: int, adapter: bytes | None):
    """A checkpoint of the job at `step`, with `adapter` as its adapter's file (None: one
    written before checkpoints kept one). Its id and its adapter file's id."""
    with sessions() as session:
        team_pk = session.scalar(select(Team.pk).where(Team.id == team.id))
        job_pk = session.scalar(select(Job.pk).where(Job.id == job_id))
        file_id = None
        if adapter is not None:
            file_id = f"file-{uuid.uuid4().hex[:24]}"
            settings = settings_from(api_env)
            store = open_store(settings.resolved_storage_url, settings.s3_endpoint_url)
            store.put(file_key(team.id, file_id), io.BytesIO(adapter))
            session.add(
                File(
                    id=file_id,
                    team_pk=team_pk,
                    filename=f"checkpoint-step-{step}-adapter.tar.gz",
                    purpose="fine-tune-results",
                    bytes=len(adapter),
                    sha256=hashlib.sha256(adapter).hexdigest(),
                    storage_key=file_key(team.id, file_id),
                    status="processed",
                )
            )
            session.flush()
        checkpoint_id = f"ftckpt-{uuid.uuid4().hex[:24]}"
        session.add(
            Checkpoint(
                id=checkpoint_id,
                job_pk=job_pk,
                step_number=step,
                metrics={"step": step, "train_loss": 1.25},
                fine_tuned_model_checkpoint=f"ft:tiny-random-llama:{team.id}::x:ckpt-step-{step}",
                storage_key=f"teams/{team.id}/jobs/{job_id}/checkpoints/step-{step}.tar.gz",
                adapter_file=file_id,
            )
        )
        session.commit()
    return checkpoint_id, file_id


def test_a_checkpoint_names_its_adapter_file_which_downloads(
    team, sessions, api_env, document
) -> None:
    job_id = create_job(team)
    archive = adapter_archive()
    checkpoint_id, file_id = add_checkpoint(sessions, api_env, team, job_id, 400, archive)

    resp = team.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}")

    assert resp.status_code == 200, resp.text
    checkpoint = resp.json()
    assert not schema_errors(document, "FineTuningJobCheckpoint", checkpoint), checkpoint
    assert checkpoint["object"] == "fine_tuning.job.checkpoint"
    assert (checkpoint["id"], checkpoint["fine_tuning_job_id"]) == (checkpoint_id, job_id)
    assert (checkpoint["step_number"], checkpoint["adapter_file"]) == (400, file_id)
    assert checkpoint["metrics"] == {"step": 400, "train_loss": 1.25}
    listed = team.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()
    assert not schema_errors(document, "ListPage_FineTuningJobCheckpoint_", listed)
    assert listed["data"] == [checkpoint]

    file = team.get(f"/v1/files/{file_id}").json()
    assert (file["filename"], file["purpose"]) == (
        "checkpoint-step-400-adapter.tar.gz",
        "fine-tune-results",
    )
    content = team.get(f"/v1/files/{file_id}/content")
    assert content.status_code == 200 and content.content == archive
    with tarfile.open(fileobj=io.BytesIO(content.content)) as tar:
        assert tar.getnames() == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_checkpoint_written_before_adapter_files_shows_none(team, sessions, api_env) -> None:
    job_id = create_job(team)
    checkpoint_id, _ = add_checkpoint(sessions, api_env, team, job_id, 100, None)

    resp = team.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}")

    assert resp.status_code == 200, resp.text
    assert resp.json()["adapter_file"] is None


@pytest.fixture(params=["postgres", "sqlite"])
def on_each_database(request, api_env, tmp_path):
    """(team, sessions, env) of the API on PostgreSQL (the shared one) or on SQLite."""
    if request.param == "postgres":
        yield (
            request.getfixturevalue("team"),
            request.getfixturevalue("sessions"),
            api_env,
        )
        return
    env = {**api_env, "LATHE_DATABASE_URL": f"sqlite:///{tmp_path / 'lathe.db'}"}
    upgrade(env["LATHE_DATABASE_URL"])
    engine = make_engine(env["LATHE_DATABASE_URL"])
    with TestClient(create_app(settings_from(env))) as client:
        yield TeamClient(*create_team_key(env), client), make_sessionmaker(engine), env
    engine.dispose()


def test_deleting_the_adapter_file_leaves_the_checkpoint_without_one(on_each_database) -> None:
    """Nothing but the download reads the file, so the team may delete it; the checkpoint
    (and resuming from it) stays, and no longer names a file that is gone: the database
    clears it (ON DELETE SET NULL, on both databases)."""
    team, sessions, api_env = on_each_database
    job_id = create_job(team)
    checkpoint_id, file_id = add_checkpoint(sessions, api_env, team, job_id, 200, adapter_archive())

    deleted = team.delete(f"/v1/files/{file_id}")

    assert deleted.status_code == 200, deleted.text
    resp = team.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}")
    assert resp.status_code == 200 and resp.json()["adapter_file"] is None
    assert team.get(f"/v1/files/{file_id}/content").status_code == 404
    with sessions() as session:
        stored = session.scalar(select(Checkpoint).where(Checkpoint.id == checkpoint_id))
    assert stored.storage_key.endswith("/checkpoints/step-200.tar.gz")


def test_a_checkpoint_is_found_only_through_its_own_teams_job(
    team, other_team, sessions, api_env
) -> None:
    job_id = create_job(team)
    sibling_id = create_job(team)
    other_job_id = create_job(other_team)
    checkpoint_id, file_id = add_checkpoint(sessions, api_env, team, job_id, 300, adapter_archive())

    def error(client, job: str, checkpoint: str) -> tuple[int, str, str]:
        resp = client.get(f"/v1/fine_tuning/jobs/{job}/checkpoints/{checkpoint}")
        body = resp.json()["error"]
        return resp.status_code, body["code"], body["param"]

    # Another team: its own job does not have it, and this team's job is not found.
    assert error(other_team, other_job_id, checkpoint_id) == (
        404,
        "checkpoint_not_found",
        "checkpoint_id",
    )
    assert error(other_team, job_id, checkpoint_id)[:2] == (404, "job_not_found")
    assert other_team.get(f"/v1/files/{file_id}/content").status_code == 404
    # The team itself: another of its jobs, and an id no checkpoint has.
    assert error(team, sibling_id, checkpoint_id)[:2] == (404, "checkpoint_not_found")
    assert error(team, job_id, "ftckpt-nope")[:2] == (404, "checkpoint_not_found")
