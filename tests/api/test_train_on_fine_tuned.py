"""Training on from a fine-tuned model: `model` as a succeeded job's ft: name or one of its
checkpoints', of the same team; the job keeps the base for the weights, records the parent
adapter and the lineage, and keeps the adapter's LoRA shape.

A finished parent is a Job row set to succeeded with an adapter.tar.gz result file (and
Checkpoint rows), as a worker leaves it; nothing here trains."""

from __future__ import annotations

import uuid

import pytest
from openai.types.fine_tuning import FineTuningJob as OpenAIFineTuningJob
from sqlalchemy import select, update

from app.models import Checkpoint, File, Job, Team
from tests.api.datasets import CHAT
from tests.api.test_dpo_jobs import PREFERENCE, dpo, team_jobs
from tests.api.test_encoder_models import NEWS

BASE = "tiny-random-llama"
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def create(team, **body):
    return team.post("/v1/fine_tuning/jobs", json=body)


def finish(sessions, team, job_id: str, *, with_adapter: bool = True) -> str:
    """Mark the job succeeded as a worker would: its ft name and result files; the name."""
    tag = uuid.uuid4().hex[:8]
    name = f"ft:{BASE}:{team.id}::{tag}"
    with sessions() as session:
        team_pk = session.scalar(select(Team.pk).where(Team.id == team.id))
        files = []
        for filename in ("adapter.tar.gz", "metrics.csv")[0 if with_adapter else 1 :]:
            record = File(
                id=f"file-{uuid.uuid4().hex[:24]}",
                team_pk=team_pk,
                filename=filename,
                purpose="fine-tune-results",
                bytes=1,
                sha256="0" * 64,
                storage_key=f"teams/{team.id}/files/{tag}-{filename}",
                status="processed",
            )
            session.add(record)
            files.append(record.id)
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status="succeeded", fine_tuned_model=name, result_files=files, finished_at=1)
        )
        session.commit()
    return name


def add_checkpoint(sessions, job_id: str, model_name: str, step: int) -> tuple[str, str, str]:
    """A checkpoint row of the job: (its id, its model name, its storage key)."""
    ckpt_id = f"ftckpt-{uuid.uuid4().hex[:24]}"
    name = f"{model_name}:ckpt-step-{step}"
    key = f"teams/x/jobs/{job_id}/checkpoints/step-{step}.tar.gz"
    with sessions() as session:
        job_pk = session.scalar(select(Job.pk).where(Job.id == job_id))
        session.add(
            Checkpoint(
                id=ckpt_id,
                job_pk=job_pk,
                step_number=step,
                metrics={},
                fine_tuned_model_checkpoint=name,
                storage_key=key,
            )
        )
        session.commit()
    return ckpt_id, name, key


def row(sessions, job_id: str) -> Job:
    with sessions() as session:
        return session.scalars(select(Job).where(Job.id == job_id)).one()


def adapter_key(sessions, job_id: str) -> str:
    with sessions() as session:
        ids = session.scalar(select(Job.result_files).where(Job.id == job_id))
        return session.scalar(
            select(File.storage_key).where(File.id.in_(ids), File.filename == "adapter.tar.gz")
        )


@pytest.fixture
def chat_id(team) -> str:
    return team.upload(CHAT).json()["id"]


@pytest.fixture
def parent(team, sessions, chat_id) -> tuple[str, str]:
    """A succeeded supervised job with LORA: (its id, its fine-tuned model)."""
    job = create(team, model=BASE, training_file=chat_id, lora=LORA).json()
    return job["id"], finish(sessions, team, job["id"])


def test_a_job_from_the_teams_fine_tuned_model_records_its_parent_and_lineage(
    team, sessions, chat_id, parent
) -> None:
    parent_id, ft = parent

    resp = create(team, model=ft, training_file=chat_id, suffix="more")

    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["status"] == "queued"
    assert job["model"] == ft  # what it was created with
    assert job["parent"] == {"fine_tuned_model": ft, "job": parent_id, "checkpoint": None}
    assert job["lineage"] == [BASE, ft]
    # The adapter's shape comes from the parent; dropout is the run's own.
    assert {k: job["lora"][k] for k in LORA} == LORA
    stored = row(sessions, job["id"])
    assert stored.model == BASE  # the worker loads the base's weights by it
    assert stored.parent == {
        "fine_tuned_model": ft,
        "job": parent_id,
        "checkpoint": None,
        "storage_key": adapter_key(sessions, parent_id),
        "archive": "adapter",
    }
    assert OpenAIFineTuningJob.model_validate(job).model == ft
    events = team.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert any(e["message"].startswith(f"Training on from {ft}") for e in events)
    assert not any("storage_key" in (e["data"] or {}) for e in events)


def test_a_grandchilds_lineage_names_the_base_and_both_fine_tuned_models(
    team, sessions, chat_id, parent
) -> None:
    _, ft = parent
    child = create(team, model=ft, training_file=chat_id).json()
    ft_child = finish(sessions, team, child["id"])

    grandchild = create(team, model=ft_child, training_file=chat_id).json()

    assert grandchild["lineage"] == [BASE, ft, ft_child]
    assert grandchild["parent"]["job"] == child["id"]
    assert row(sessions, grandchild["id"]).model == BASE
    # Every generation is still listed as a model of the team.
    listed = [m["id"] for m in team.get("/v1/models").json()["data"]]
    assert {ft, ft_child} <= set(listed)


def test_a_job_from_the_base_has_the_base_as_its_lineage(team, chat_id) -> None:
    job = create(team, model=BASE, training_file=chat_id).json()
    assert (job["model"], job["parent"], job["lineage"]) == (BASE, None, [BASE])


def test_a_checkpoint_of_the_teams_job_can_be_trained_on(team, sessions, chat_id, parent) -> None:
    parent_id, ft = parent
    ckpt_id, ckpt_name, key = add_checkpoint(sessions, parent_id, ft, step=10)

    job = create(team, model=ckpt_name, training_file=chat_id).json()

    assert job["model"] == ckpt_name
    assert job["parent"] == {"fine_tuned_model": ft, "job": parent_id, "checkpoint": ckpt_id}
    assert job["lineage"] == [BASE, ckpt_name]
    stored = row(sessions, job["id"]).parent
    assert (stored["storage_key"], stored["archive"]) == (key, "checkpoint")


def test_dpo_trains_on_from_a_supervised_model(team, sessions, parent) -> None:
    parent_id, ft = parent
    pairs = team.upload(PREFERENCE).json()["id"]

    job = create(team, model=ft, training_file=pairs, method=dpo(beta=0.2)).json()

    assert job["status"] == "queued", job
    assert (job["method"]["type"], job["parent"]["job"]) == ("dpo", parent_id)
    assert row(sessions, job["id"]).hyperparameters["beta"] == 0.2


def test_another_teams_fine_tuned_model_is_not_found(team, other_team, sessions, parent) -> None:
    parent_id, ft = parent
    ckpt_name = add_checkpoint(sessions, parent_id, ft, step=5)[1]
    theirs = other_team.upload(CHAT).json()["id"]

    for model in (ft, ckpt_name, f"ft:{BASE}:nobody::00000000"):
        resp = create(other_team, model=model, training_file=theirs)
        assert resp.status_code == 404, resp.text
        error = resp.json()["error"]
        assert (error["code"], error["param"]) == ("model_not_found", "model")
        assert error["type"] == "invalid_request_error"
    assert team_jobs(sessions, other_team) == 0


def test_a_model_whose_job_did_not_succeed_is_refused(team, sessions, chat_id) -> None:
    running = create(team, model=BASE, training_file=chat_id).json()["id"]
    ckpt_name = add_checkpoint(sessions, running, f"ft:{BASE}:{team.id}::run", step=3)[1]
    before = team_jobs(sessions, team)

    resp = create(team, model=ckpt_name, training_file=chat_id)

    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_ready", "model")
    assert running in error["message"] and "queued" in error["message"]
    assert team_jobs(sessions, team) == before


def test_a_model_whose_adapter_file_was_deleted_is_refused(team, sessions, chat_id) -> None:
    job = create(team, model=BASE, training_file=chat_id).json()
    ft = finish(sessions, team, job["id"], with_adapter=False)

    resp = create(team, model=ft, training_file=chat_id)

    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "model_not_ready"
    assert "adapter.tar.gz" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    ("lora", "param"),
    [
        ({"r": 8}, "lora.r"),
        ({"alpha": 16}, "lora.alpha"),
        ({"target_modules": ["all-linear"]}, "lora.target_modules"),
    ],
)
def test_a_lora_shape_other_than_the_adapters_is_refused_naming_both(
    team, sessions, chat_id, parent, lora, param
) -> None:
    _, ft = parent
    before = team_jobs(sessions, team)

    resp = create(team, model=ft, training_file=chat_id, lora=lora)

    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("lora_mismatch", param)
    key = param.removeprefix("lora.")
    assert f"{key} {LORA[key]!r}" in error["message"]
    assert f"is {lora[key]!r}" in error["message"]
    assert team_jobs(sessions, team) == before


def test_the_adapters_lora_shape_may_be_restated_and_dropout_changed(team, chat_id, parent) -> None:
    _, ft = parent
    lora = {"r": 4, "alpha": 8.0, "target_modules": ["v_proj", "q_proj"], "dropout": 0.0}
    job = create(team, model=ft, training_file=chat_id, lora=lora).json()
    assert job["status"] == "queued", job
    assert job["lora"]["dropout"] == 0.0


def test_a_classifier_trains_on_from_classification_files_only(team, sessions) -> None:
    news = team.upload(NEWS).json()["id"]
    classifier = create(team, model=BASE, training_file=news).json()
    ft = finish(sessions, team, classifier["id"])

    chat = create(team, model=ft, training_file=team.upload(CHAT).json()["id"])
    again = create(team, model=ft, training_file=news)

    assert chat.status_code == 400
    assert chat.json()["error"]["code"] == "unsupported_format_for_model"
    assert "is a classifier" in chat.json()["error"]["message"]
    assert again.status_code == 200, again.text


def test_a_job_from_a_fine_tuned_model_pauses_and_resumes_keeping_its_parent(
    team, chat_id, parent
) -> None:
    _, ft = parent
    job = create(team, model=ft, training_file=chat_id).json()
    url = f"/v1/fine_tuning/jobs/{job['id']}"

    assert team.post(f"{url}/pause").json()["status"] == "paused"
    resumed = team.post(f"{url}/resume").json()

    assert resumed["status"] == "queued"
    assert (resumed["parent"], resumed["lineage"]) == (job["parent"], job["lineage"])


def test_a_name_neither_base_nor_fine_tuned_is_still_a_400(team, chat_id) -> None:
    resp = create(team, model="gpt-17", training_file=chat_id)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "model_not_found"


def test_a_job_from_a_fine_tuned_model_is_estimated_as_one_from_its_base(
    team, chat_id, parent
) -> None:
    """The parent adapter is a few MB on a base of GBs: the estimate is the base's."""
    _, ft = parent
    from_base = create(team, model=BASE, training_file=chat_id, lora=LORA).json()
    from_ft = create(team, model=ft, training_file=chat_id).json()

    def estimate(job_id: str) -> float:
        events = team.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
        return next(e["data"]["memory_gb"] for e in events if e["message"].startswith("Valid"))

    assert estimate(from_ft["id"]) == estimate(from_base["id"]) > 0


def test_the_adapter_an_unfinished_job_trains_on_from_cannot_be_deleted(
    team, sessions, chat_id, parent
) -> None:
    """The parent's adapter.tar.gz is the child's starting point: deleting it while the
    child waits would fail the child at its worker's download. Once the child has ended,
    the file may go."""
    parent_id, ft = parent
    child = create(team, model=ft, training_file=chat_id).json()["id"]
    with sessions() as session:
        ids = session.scalar(select(Job.result_files).where(Job.id == parent_id))
        adapter_id = session.scalar(
            select(File.id).where(File.id.in_(ids), File.filename == "adapter.tar.gz")
        )

    refused = team.delete(f"/v1/files/{adapter_id}")

    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("file_in_use", "file_id")
    assert child in error["message"]

    assert team.post(f"/v1/fine_tuning/jobs/{child}/cancel").status_code == 200
    assert team.delete(f"/v1/files/{adapter_id}").status_code == 200


def test_a_model_name_past_512_characters_is_refused_unechoed(team, chat_id) -> None:
    resp = create(team, model="ft:" + "x" * 100_000, training_file=chat_id)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "model" and len(error["message"]) < 1000
