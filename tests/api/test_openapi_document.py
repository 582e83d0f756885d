"""The OpenAPI document describes every body the API sends (issue 12): each 2xx response
has a schema, each JSON one a model whose fields are all required (a null is sent as null,
never left out) and closed to others; and real responses match it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.datasets import CHAT
from tests.openapi import component_validator, schema_errors, served_document


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return served_document()


def _operations(document: dict[str, Any]):
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            yield f"{method.upper()} {path}", operation


def _component(document: dict[str, Any], ref: str) -> dict[str, Any]:
    return document["components"]["schemas"][ref.removeprefix("#/components/schemas/")]


def test_every_2xx_response_has_a_schema(document) -> None:
    missing = []
    for name, operation in _operations(document):
        for status, response in operation["responses"].items():
            if not status.startswith("2"):
                continue
            content = response.get("content") or {}
            if not content:
                missing.append(f"{name} {status}: no content")
            for media, body in content.items():
                schema = body.get("schema") or {}
                if not schema or schema == {"type": "object", "additionalProperties": True}:
                    missing.append(f"{name} {status} {media}: no schema")
    assert not missing, missing


def test_every_json_object_sent_lists_all_its_fields_as_required_and_no_others(
    document,
) -> None:
    loose = []
    for name, operation in _operations(document):
        for status, response in operation["responses"].items():
            schema = (response.get("content") or {}).get("application/json", {}).get("schema")
            if not status.startswith("2") or schema is None:
                continue
            assert "$ref" in schema, f"{name} {status}: an inline schema, not a model"
            component = _component(document, schema["$ref"])
            if set(component.get("required", [])) != set(component["properties"]):
                loose.append(f"{name}: {schema['$ref']} leaves fields optional")
            if component["title"] not in ("Liveness", "Readiness"):
                if component.get("additionalProperties") is not False:
                    loose.append(f"{name}: {schema['$ref']} allows undeclared fields")
    assert not loose, loose


def test_responses_match_the_document(team, other_team, document) -> None:
    """A job (created, listed, paused, resumed, cancelled, its events and place in line),
    its file and the pool's views, each against the document's schema for its route."""
    file = team.upload(CHAT).json()
    job = team.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-random-llama", "training_file": file["id"], "metadata": {"a": "b"}},
    ).json()
    checks = [
        ("FineTuningJob", job),
        ("FileObject", file),
        ("FineTuningJob", team.post(f"/v1/fine_tuning/jobs/{job['id']}/pause").json()),
        ("FineTuningJob", team.post(f"/v1/fine_tuning/jobs/{job['id']}/resume").json()),
        ("JobQueuePosition", team.get(f"/v1/fine_tuning/jobs/{job['id']}/queue").json()),
        ("FineTuningJob", team.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()),
        ("ListPage_FineTuningJob_", team.get("/v1/fine_tuning/jobs").json()),
        (
            "ListPage_FineTuningJobEvent_",
            team.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json(),
        ),
        ("ListPage_FileObject_", team.get("/v1/files").json()),
        ("ListPage_Worker_", team.get("/v1/workers").json()),
        ("QueueSummary", team.get("/v1/queue").json()),
        ("TeamUsage", team.get("/v1/usage").json()),
        ("ModelList", team.get("/v1/models").json()),
    ]
    for name, body in checks:
        assert not schema_errors(document, name, body), (name, body)
    assert job["status"] == "queued" and checks[5][1]["status"] == "cancelled"


def test_the_document_refuses_a_job_that_drifts_from_the_model(document) -> None:
    """The check above has teeth: a field left out, an extra field, a wrong type."""
    validator = component_validator(document, "FineTuningJob")
    required = _component(document, "FineTuningJob")["required"]
    assert {"error", "fine_tuned_model", "finished_at", "validation_file"} <= set(required)
    job = {
        "id": "ftjob-" + "0" * 24,
        "object": "fine_tuning.job",
        "created_at": 1,
        "error": None,
        "fine_tuned_model": None,
        "finished_at": None,
        "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0},
        "model": "tiny-random-llama",
        "organization_id": "team-" + "0" * 24,
        "result_files": [],
        "seed": 1,
        "status": "queued",
        "trained_tokens": None,
        "training_file": "file-" + "0" * 24,
        "validation_file": None,
        "estimated_finish": None,
        "lora": {},
        "quantization": {},
        "max_seq_length": 1024,
        "training": {},
        "stats": {},
        "integrations": [],
        "metadata": None,
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
            },
            "dpo": None,
        },
        "parent": None,
        "lineage": ["tiny-random-llama"],
        "gpus": 1,
        "parallelism": None,
        "devices": None,
        "preemptions": 0,
        "preemptible": True,
    }
    assert validator.is_valid(job)
    assert not validator.is_valid({k: v for k, v in job.items() if k != "error"})
    assert not validator.is_valid({**job, "unexpected": 1})
    assert not validator.is_valid({**job, "status": "done"})


def test_a_dpo_job_from_a_fine_tuned_model_with_tracking_matches_the_document(
    team, sessions, document
) -> None:
    """The fields issue 13 added, filled: method dpo, parent and lineage, integrations with
    their URLs (set on the row as a worker reports them)."""
    from sqlalchemy import update

    from app.models import Job
    from tests.api.test_dpo_jobs import PREFERENCE, dpo
    from tests.api.test_train_on_fine_tuned import finish

    chat = team.upload(CHAT).json()["id"]
    parent = team.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-random-llama", "training_file": chat}
    ).json()
    ft = finish(sessions, team, parent["id"])
    pairs = team.upload(PREFERENCE).json()["id"]
    job = team.post(
        "/v1/fine_tuning/jobs", json={"model": ft, "training_file": pairs, "method": dpo()}
    ).json()
    integrations = [
        {"type": "wandb", "wandb": {"project": "p", "name": None, "entity": None, "tags": []}},
        {"type": "mlflow", "mlflow": {"experiment": "e", "run_name": "r"}},
    ]
    tracking = {"wandb": {"url": "https://w.example/r/1"}, "mlflow": {"url": None}}
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == job["id"])
            .values(integrations=integrations, stats={"tracking": tracking})
        )
        session.commit()
    shown = team.get(f"/v1/fine_tuning/jobs/{job['id']}").json()

    assert (shown["method"]["type"], shown["lineage"]) == ("dpo", ["tiny-random-llama", ft])
    assert [i["url"] for i in shown["integrations"]] == ["https://w.example/r/1", None]
    assert not schema_errors(document, "FineTuningJob", shown), shown
    validator = component_validator(document, "FineTuningJob")
    assert not validator.is_valid({**shown, "parent": {**shown["parent"], "storage_key": "k"}})
    assert not validator.is_valid({**shown, "method": {"type": "dpo", "dpo": None}})
