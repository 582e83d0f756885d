"""Exports through the API: who may ask for one, what it records, and how it is listed,
found, cancelled and refused. The finished job is a Job row set to succeeded as a worker
leaves it (tests/api/test_train_on_fine_tuned.finish); the worker's side, which merges and
converts for real, is tests/e2e/test_exports.py."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from app.domain.jobs import JobKind
from app.models import Job, WebhookDelivery
from tests.api.test_checkpoints import create_job
from tests.api.test_train_on_fine_tuned import add_checkpoint, finish
from tests.openapi import schema_errors, served_document


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return served_document()


def finished_job(team, sessions) -> tuple[str, str]:
    job_id = create_job(team)
    return job_id, finish(sessions, team, job_id)


def export(team, job_id: str, **body):
    return team.post(f"/v1/fine_tuning/jobs/{job_id}/exports", json=body)


def error_of(resp) -> tuple[int, str, str | None]:
    body = resp.json()["error"]
    return resp.status_code, body["code"], body["param"]


def test_an_export_is_queued_pool_work_with_its_defaults(team, sessions, document) -> None:
    job_id, name = finished_job(team, sessions)

    resp = export(team, job_id, format="merged")

    assert resp.status_code == 200, resp.text
    created = resp.json()
    assert not schema_errors(document, "FineTuningJobExport", created), created
    assert created["id"].startswith("ftexp-") and created["object"] == "fine_tuning.job.export"
    assert created["fine_tuning_job_id"] == job_id and created["model"] == name
    assert (created["format"], created["dtype"], created["quantization"]) == (
        "merged",
        "bfloat16",
        None,
    )
    assert (created["base_weights"], created["status"], created["files"]) == ("nf4", "queued", [])
    with sessions() as session:
        row = session.scalar(select(Job).where(Job.id == created["id"]))
        source_pk = session.scalar(select(Job.pk).where(Job.id == job_id))
    # In line like a job: the scheduler's row, the job's base and the adapter it reads.
    assert (row.kind, row.status, row.source_job_pk) == (JobKind.EXPORT, "queued", source_pk)
    assert row.model == "tiny-random-llama" and row.parent["fine_tuned_model"] == name
    assert row.parent["archive"] == "adapter" and row.memory_gb == 0.0

    listed = team.get(f"/v1/fine_tuning/jobs/{job_id}/exports").json()
    assert not schema_errors(document, "ListPage_FineTuningJobExport_", listed)
    assert [e["id"] for e in listed["data"]] == [created["id"]]
    assert team.get(f"/v1/fine_tuning/jobs/{job_id}/exports/{created['id']}").json() == created


def test_an_export_is_not_a_fine_tuning_job(team, sessions) -> None:
    """The OpenAI surface shows fine-tunes only: an export is neither listed nor found as a
    job, nor a model."""
    job_id, _ = finished_job(team, sessions)
    export_id = export(team, job_id, format="merged").json()["id"]

    jobs = [j["id"] for j in team.get("/v1/fine_tuning/jobs?limit=100").json()["data"]]
    assert job_id in jobs and export_id not in jobs
    assert error_of(team.get(f"/v1/fine_tuning/jobs/{export_id}"))[:2] == (404, "job_not_found")
    assert error_of(team.post(f"/v1/fine_tuning/jobs/{export_id}/cancel"))[0] == 404
    models = [m["id"] for m in team.get("/v1/models").json()["data"]]
    assert None not in models


def test_a_checkpoint_is_exported_by_its_id(team, sessions) -> None:
    job_id, name = finished_job(team, sessions)
    ckpt_id, ckpt_name, key = add_checkpoint(sessions, job_id, name, 40)

    resp = export(team, job_id, format="merged", dtype="float16", checkpoint=ckpt_id)

    assert resp.status_code == 200, resp.text
    created = resp.json()
    assert (created["checkpoint_id"], created["step_number"], created["model"]) == (
        ckpt_id,
        40,
        ckpt_name,
    )
    assert created["dtype"] == "float16"
    with sessions() as session:
        parent = session.scalar(select(Job.parent).where(Job.id == created["id"]))
    assert (parent["storage_key"], parent["archive"]) == (key, "checkpoint")
    assert error_of(export(team, job_id, format="merged", checkpoint="ftckpt-nope"))[:2] == (
        404,
        "checkpoint_not_found",
    )


def test_a_running_jobs_checkpoint_exports_but_not_the_job(team, sessions) -> None:
    job_id = create_job(team)
    ckpt_id, _, _ = add_checkpoint(sessions, job_id, f"ft:tiny-random-llama:{team.id}::x", 10)

    assert error_of(export(team, job_id, format="merged")) == (
        409,
        "job_not_succeeded",
        "fine_tuning_job_id",
    )
    # A checkpoint of a job still running names no model it could be resolved by: its
    # job has not succeeded, so it is refused as for training on from it.
    refused = export(team, job_id, format="merged", checkpoint=ckpt_id)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_ready"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"format": "onnx"}, "format"),
        ({"format": "merged", "quantization": "q8_0"}, "quantization"),
        ({"format": "gguf", "dtype": "float16"}, "dtype"),
        ({"format": "gguf", "quantization": "q2_k"}, "quantization"),
        ({"format": "merged", "base_weights": "fp8"}, "base_weights"),
        ({"format": "merged", "lora": {}}, "lora"),
    ],
)
def test_a_malformed_request_says_which_field(team, sessions, body, field) -> None:
    job_id, _ = finished_job(team, sessions)

    resp = export(team, job_id, **body)

    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert field in (error["param"] or "") + error["message"], error


@pytest.fixture
def demo_model_on_disk(api_env) -> None:
    """The demo's tiny model where the API reads base models: its ByT5 byte tokenizer is one
    llama.cpp's converter does not know."""
    from tests.conftest import settings_from
    from worker.training.tiny_model import ensure_tiny_random_llama

    settings = settings_from(api_env)
    spec = settings.base_model("tiny-random-llama")
    ensure_tiny_random_llama(settings.base_model_path(spec), spec.chat_template)


def test_gguf_of_a_model_llama_cpp_cannot_convert_is_refused_at_once(
    team, sessions, demo_model_on_disk
) -> None:
    job_id, _ = finished_job(team, sessions)
    with sessions() as session:
        before = session.scalar(select(Job.pk).order_by(Job.pk.desc()).limit(1))

    code, error, param = error_of(export(team, job_id, format="gguf", quantization="f16"))

    assert (code, error, param) == (400, "unsupported_export_for_model", "format")
    with sessions() as session:  # nothing stored
        assert session.scalar(select(Job.pk).order_by(Job.pk.desc()).limit(1)) == before


def test_another_teams_export_is_not_found(team, other_team, sessions) -> None:
    job_id, _ = finished_job(team, sessions)
    export_id = export(team, job_id, format="merged").json()["id"]
    other_job_id = create_job(other_team)

    for path in (f"/v1/fine_tuning/jobs/{job_id}/exports", f"/exports/{export_id}"):
        path = path if path.startswith("/v1") else f"/v1/fine_tuning/jobs/{job_id}{path}"
        assert error_of(other_team.get(path))[:2] == (404, "job_not_found")
    assert error_of(export(other_team, job_id, format="merged"))[:2] == (404, "job_not_found")
    # Through its own job, another team's export id is simply not there.
    resp = other_team.get(f"/v1/fine_tuning/jobs/{other_job_id}/exports/{export_id}")
    assert error_of(resp) == (404, "export_not_found", "export_id")
    cancel = other_team.post(f"/v1/fine_tuning/jobs/{other_job_id}/exports/{export_id}/cancel")
    assert cancel.status_code == 404


def test_cancel_ends_a_queued_export_once_and_sends_no_webhook(team, sessions) -> None:
    job_id, _ = finished_job(team, sessions)
    hook = team.post(
        "/v1/webhooks",
        json={"url": "https://hooks.example.com/x", "event_types": ["fine_tuning.job.cancelled"]},
    )
    assert hook.status_code == 200, hook.text
    export_id = export(team, job_id, format="merged").json()["id"]
    base = f"/v1/fine_tuning/jobs/{job_id}/exports/{export_id}"

    cancelled = team.post(f"{base}/cancel")

    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert error_of(team.post(f"{base}/cancel")) == (409, "export_not_cancellable", "export_id")
    messages = [e["message"] for e in team.get(f"{base}/events").json()["data"]]
    assert messages[0] == "Export cancelled" and "Export queued" in messages
    with sessions() as session:
        assert (
            session.scalar(
                select(WebhookDelivery.pk)
                .where(WebhookDelivery.payload.is_not(None))
                .where(WebhookDelivery.event_type == "fine_tuning.job.cancelled")
                .limit(1)
            )
            is None
        )
