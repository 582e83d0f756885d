"""/v1/fine_tuning/jobs on Postgres + Redis: creation, refusals, pagination, cancel, scoping."""

from __future__ import annotations

import pytest

from tests.api.datasets import CHAT, PROMPT_COMPLETION, jsonl

MODEL = "tiny-random-llama"


def create(team, **body):
    return team.post("/v1/fine_tuning/jobs", json={"model": MODEL, **body})


@pytest.fixture
def train_id(team) -> str:
    return team.upload(CHAT).json()["id"]


def test_created_job_is_queued_with_resolved_hyperparameters(team, train_id) -> None:
    resp = create(
        team,
        training_file=train_id,
        hyperparameters={"n_epochs": 2},
        suffix="math",
        seed=7,
        metadata={"ticket": "ML-1"},
        lora={"r": 4, "alpha": 8},
        quantization={"type": "fp4"},
        max_seq_length=256,
    )
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["object"] == "fine_tuning.job"
    assert job["status"] == "queued"
    assert job["organization_id"] == team.id
    assert job["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 8,
        "learning_rate_multiplier": 1.0,
    }
    assert (job["seed"], job["metadata"], job["result_files"]) == (7, {"ticket": "ML-1"}, [])
    events = team.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    # Whether a worker is online depends on other tests' rows (see tests/api/test_pool.py
    # for the notice saying none is).
    messages = [e["message"] for e in events if not e["message"].startswith("No worker")]
    assert [m.split(" ")[0] for m in messages] == ["Files", "Validating"]
    assert events[-1]["data"]["lora"]["r"] == 4
    assert events[-1]["data"]["quantization"]["type"] == "fp4"


def test_training_options_default_are_kept_and_shown(team, train_id) -> None:
    default = create(team, training_file=train_id).json()
    chosen = create(
        team,
        training_file=train_id,
        training={"packing": False, "train_on_inputs": True, "truncation": "refuse"},
        lora={"target_modules": ["q_proj", "v_proj"]},
    ).json()

    assert default["training"] == {
        "train_on_inputs": False,
        "truncation": "truncate",
        "packing": True,
        "gradient_checkpointing": "auto",
        "optimizer": "auto",
        "attention": "auto",
        "liger": "auto",
        "micro_batch_tokens": "auto",
        "eval_steps": None,
        "sample_max_new_tokens": 64,
    }
    assert default["stats"] == {}, "filled in by the worker"
    assert chosen["training"]["packing"] is False
    assert chosen["training"]["truncation"] == "refuse"
    events = team.get(f"/v1/fine_tuning/jobs/{chosen['id']}/events").json()["data"]
    assert events[-1]["data"]["training"]["train_on_inputs"] is True
    assert events[-1]["data"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    first = team.get(f"/v1/fine_tuning/jobs/{default['id']}/events").json()["data"][-1]
    assert first["data"]["lora"]["target_modules"] == ["all-linear"]


def test_a_classification_file_trains_a_classifier(team) -> None:
    rows = [{"text": f"review {i}", "label": "good" if i % 2 else "bad"} for i in range(10)]
    upload = team.upload(jsonl(rows)).json()
    job = create(team, training_file=upload["id"]).json()

    assert job["status"] == "queued"
    events = team.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert "10 classification examples" in events[0]["message"]


def test_method_supervised_hyperparameters_are_read(team, train_id) -> None:
    resp = create(
        team,
        training_file=train_id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2}}},
    )
    assert resp.json()["hyperparameters"]["batch_size"] == 2


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "gpt-17"}, 400, "model", "model_not_found"),
        ({"training_file": "file-nope"}, 400, "training_file", "file_not_found"),
        ({"validation_file": "file-nope"}, 400, "validation_file", "file_not_found"),
        ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs", "invalid_value"),
        (
            {"hyperparameters": {"batch_size": "big"}},
            400,
            "hyperparameters.batch_size",
            "invalid_value",
        ),
        ({"lora": {"r": 0}}, 400, "lora.r", "invalid_value"),
        ({"quantization": {"type": "int3"}}, 400, "quantization.type", "invalid_value"),
        ({"lora_r": 8}, 400, "lora_r", "invalid_value"),
        ({"method": {"type": "reinforcement"}}, 400, "method.type", "invalid_value"),
        ({"metadata": {"k" * 65: "v"}}, 400, "metadata." + "k" * 65, "invalid_value"),
        ({"metadata": {"k": "v" * 513}}, 400, "metadata.k", "invalid_value"),
        ({"training_file": "file-\x00"}, 400, None, "invalid_value"),
        ({"training": {"truncation": "drop"}}, 400, "training.truncation", "invalid_value"),
        ({"training": {"optimizer": "sgd"}}, 400, "training.optimizer", "invalid_value"),
        ({"training": {"eval_steps": 0}}, 400, "training.eval_steps", "invalid_value"),
        ({"training": {"pack": True}}, 400, "training.pack", "invalid_value"),
        ({"lora": {"target_modules": ["q_proj;"]}}, 400, "lora.target_modules.0", "invalid_value"),
    ],
)
def test_bad_job_requests_are_refused_with_the_field_named(
    team, train_id, body, status, param, code
) -> None:
    before = team.get("/v1/fine_tuning/jobs").json()["data"]
    resp = create(team, **{"training_file": train_id, **body})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]
    assert team.get("/v1/fine_tuning/jobs").json()["data"] == before


def test_result_file_cannot_be_a_training_file(team, api_env) -> None:
    from app.db import make_engine, make_sessionmaker
    from app.models import File, Team

    engine = make_engine(api_env["LATHE_DATABASE_URL"])
    with make_sessionmaker(engine)() as session:
        team_pk = session.query(Team.pk).filter(Team.id == team.id).scalar()
        session.add(
            File(
                id="file-results-x1",
                team_pk=team_pk,
                filename="metrics.csv",
                purpose="fine-tune-results",
                bytes=1,
                sha256="0" * 64,
                storage_key="files/none",
            )
        )
        session.commit()
    engine.dispose()
    resp = create(team, training_file="file-results-x1")
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_file_purpose"


def test_validation_file_of_another_format_fails_the_job(team, train_id) -> None:
    valid_id = team.upload(PROMPT_COMPLETION).json()["id"]
    job = create(team, training_file=train_id, validation_file=valid_id).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_validation_file"
    assert job["error"]["param"] == "validation_file"
    assert job["finished_at"] is not None


def test_list_is_newest_first_with_after_and_limit(team, train_id) -> None:
    ids = [create(team, training_file=train_id).json()["id"] for _ in range(3)]
    page = team.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2]
    assert page["has_more"] is True
    rest = team.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": ids[1]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False


def test_events_paginate_newest_first(team, train_id) -> None:
    job_id = create(team, training_file=train_id).json()["id"]
    team.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    url = f"/v1/fine_tuning/jobs/{job_id}/events"
    everything = team.get(url).json()["data"]
    assert [e["message"] for e in everything][0] == "Fine-tuning job cancelled"
    first = team.get(url, params={"limit": 1}).json()
    assert first["has_more"] is True
    second = team.get(url, params={"limit": 1, "after": first["data"][0]["id"]}).json()
    assert second["data"][0]["id"] == everything[1]["id"]


def test_cancel_a_queued_job_then_cancel_again_is_409(team, train_id) -> None:
    job_id = create(team, training_file=train_id).json()["id"]
    resp = team.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert resp.json()["status"] == "cancelled"
    assert resp.json()["finished_at"] is not None
    again = team.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_not_cancellable"


def test_another_teams_job_answers_404(team, other_team, train_id) -> None:
    job_id = create(team, training_file=train_id).json()["id"]
    for resp in (
        other_team.get(f"/v1/fine_tuning/jobs/{job_id}"),
        other_team.post(f"/v1/fine_tuning/jobs/{job_id}/cancel"),
        other_team.get(f"/v1/fine_tuning/jobs/{job_id}/events"),
        other_team.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints"),
    ):
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "job_not_found"
    assert other_team.get("/v1/fine_tuning/jobs").json()["data"] == []
    # Nor can another team train on this team's file.
    resp = create(other_team, training_file=train_id)
    assert resp.json()["error"]["code"] == "file_not_found"
    assert team.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "queued"


def test_models_lists_the_allowed_base_models(team) -> None:
    models = team.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert team.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert team.get("/v1/models/nope").status_code == 404


def test_health_and_readiness_need_no_key(api) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_a_paused_jobs_files_cannot_be_deleted_until_it_ends(team, train_id) -> None:
    """Resume reads the training and validation files again: while any unfinished job
    (paused included) uses a file, its delete is refused naming the job."""
    valid_id = team.upload(CHAT, name="valid.jsonl").json()["id"]
    job_id = create(team, training_file=train_id, validation_file=valid_id).json()["id"]
    assert team.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
    for file_id in (train_id, valid_id):
        refused = team.delete(f"/v1/files/{file_id}")
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("file_in_use", "file_id")
        assert job_id in error["message"]
    assert team.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"
    assert team.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    for file_id in (train_id, valid_id):
        assert team.delete(f"/v1/files/{file_id}").json()["deleted"] is True
