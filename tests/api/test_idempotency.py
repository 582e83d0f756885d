"""Idempotency-Key on POST /v1/files and POST /v1/fine_tuning/jobs: a retry returns the
first result and creates nothing."""

from __future__ import annotations

import uuid

from tests.api.datasets import CHAT
from tests.api.test_files import object_count

MODEL = "tiny-random-llama"


def key() -> dict[str, str]:
    return {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}


def test_a_retried_job_creation_returns_the_first_job(team) -> None:
    file_id = team.upload(CHAT).json()["id"]
    headers = key()
    body = {"model": MODEL, "training_file": file_id}
    first = team.post("/v1/fine_tuning/jobs", json=body, headers=headers)
    again = team.post("/v1/fine_tuning/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    listed = [j["id"] for j in team.get("/v1/fine_tuning/jobs").json()["data"]]
    assert listed.count(first.json()["id"]) == 1 and len(listed) == 1


def test_the_same_key_with_another_body_is_a_422(team) -> None:
    file_id = team.upload(CHAT).json()["id"]
    headers = key()
    team.post(
        "/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": file_id}, headers=headers
    )
    other = team.post(
        "/v1/fine_tuning/jobs",
        json={"model": MODEL, "training_file": file_id, "suffix": "other"},
        headers=headers,
    )
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"


def test_a_failed_request_releases_its_key(team) -> None:
    file_id = team.upload(CHAT).json()["id"]
    headers = key()
    bad = team.post(
        "/v1/fine_tuning/jobs", json={"model": "nope", "training_file": file_id}, headers=headers
    )
    assert bad.status_code == 400
    good = team.post(
        "/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": file_id}, headers=headers
    )
    assert good.status_code == 200


def test_a_retried_upload_returns_the_first_file_and_stores_nothing(team, api_env) -> None:
    headers = key()
    first = team.post(
        "/v1/files",
        files={"file": ("t.jsonl", CHAT)},
        data={"purpose": "fine-tune"},
        headers=headers,
    )
    objects = object_count(api_env)
    again = team.post(
        "/v1/files",
        files={"file": ("t.jsonl", CHAT)},
        data={"purpose": "fine-tune"},
        headers=headers,
    )
    assert again.json() == first.json()
    assert object_count(api_env) == objects


def test_keys_are_per_team(team, other_team) -> None:
    headers = key()
    mine = team.post(
        "/v1/files",
        files={"file": ("t.jsonl", CHAT)},
        data={"purpose": "fine-tune"},
        headers=headers,
    )
    theirs = other_team.post(
        "/v1/files",
        files={"file": ("t.jsonl", CHAT)},
        data={"purpose": "fine-tune"},
        headers=headers,
    )
    assert mine.json()["id"] != theirs.json()["id"]


def test_a_malformed_key_is_a_400(team) -> None:
    resp = team.post(
        "/v1/files",
        files={"file": ("t.jsonl", CHAT)},
        data={"purpose": "fine-tune"},
        headers={"Idempotency-Key": "a b"},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_idempotency_key"
