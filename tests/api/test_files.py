"""/v1/files on Postgres + S3: streaming upload with size and sha256, line-numbered refusals."""

from __future__ import annotations

import hashlib

import boto3
import pytest
from sqlalchemy import create_engine, func, select

from app.models import File
from tests.api.datasets import CHAT, PROMPT_COMPLETION, jsonl


def preference_row(i: int, rejected: str | None = None) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": f"What is {i} + 1?"}]},
        "preferred_output": [{"role": "assistant", "content": f"{i} + 1 = {i + 1}."}],
        "non_preferred_output": [
            {"role": "assistant", "content": rejected or f"The answer is {i + 1}, I think!"}
        ],
    }


PREFERENCE = jsonl([preference_row(i) for i in range(12)])


def test_upload_records_size_and_sha256_and_round_trips(team) -> None:
    resp = team.upload(CHAT)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "file"
    assert body["bytes"] == len(CHAT)
    assert body["purpose"] == "fine-tune"
    assert body["status"] == "processed"
    assert body["filename"] == "train.jsonl"
    content = team.get(f"/v1/files/{body['id']}/content")
    assert content.status_code == 200
    assert content.content == CHAT
    assert team.get(f"/v1/files/{body['id']}").json() == body


def test_upload_stores_sha256_in_the_database(team, api_env) -> None:
    file_id = team.upload(PROMPT_COMPLETION).json()["id"]
    engine = create_engine(api_env["LATHE_DATABASE_URL"])
    with engine.connect() as conn:
        row = conn.execute(
            select(File.sha256, File.format, File.examples).where(File.id == file_id)
        ).one()
    engine.dispose()
    assert row == (hashlib.sha256(PROMPT_COMPLETION).hexdigest(), "prompt_completion", 12)


def object_count(api_env) -> int:
    bucket = api_env["LATHE_STORAGE_URL"].removeprefix("s3://").split("/")[0]
    s3 = boto3.client("s3", endpoint_url=api_env["LATHE_S3_ENDPOINT_URL"])
    return s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0)


def file_rows(api_env) -> int:
    engine = create_engine(api_env["LATHE_DATABASE_URL"])
    with engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(File)).scalar_one()
    engine.dispose()
    return count


@pytest.mark.parametrize(
    ("tail", "code", "fragment"),
    [
        (b'{"messages": [{"role": "user", "content": "hi"}\n', "invalid_json", "invalid JSON"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}\n', "unknown_role", "'robot'"),
        (
            b'{"messages": [{"role": "user", "content": "x"}]}\n',
            "no_assistant_message",
            "assistant",
        ),
        (b'{"prompt": "a", "completion": "b"}\n', "mixed_formats", "mixed formats"),
        (b'{"input": "a"}\n', "missing_key", "expected key"),
        # Escapes that json.loads accepts but a training file must not hold.
        (rb'{"text": "a\u0000"}' + b"\n", "nul_character", "NUL character"),
        (rb'{"text": "\ud800"}' + b"\n", "invalid_encoding", "surrogate"),
    ],
)
def test_bad_line_is_refused_with_its_number_and_nothing_is_stored(
    team, api_env, tail: bytes, code: str, fragment: str
) -> None:
    objects_before, rows_before = object_count(api_env), file_rows(api_env)
    resp = team.upload(CHAT + tail + CHAT)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == code
    assert error["param"] == "file"
    assert "line 13:" in error["message"]
    assert fragment in error["message"]
    assert object_count(api_env) == objects_before
    assert file_rows(api_env) == rows_before


def test_preference_upload_is_stored_with_its_format_and_examples(team, api_env) -> None:
    resp = team.upload(PREFERENCE)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["status"], body["bytes"]) == ("processed", len(PREFERENCE))
    engine = create_engine(api_env["LATHE_DATABASE_URL"])
    with engine.connect() as conn:
        row = conn.execute(select(File.format, File.examples).where(File.id == body["id"])).one()
    engine.dispose()
    assert row == ("preference", 12)
    assert team.get(f"/v1/files/{body['id']}/content").content == PREFERENCE


@pytest.mark.parametrize(
    ("head", "tail", "code", "fragment"),
    [
        (
            PREFERENCE,
            jsonl([preference_row(3, rejected="3 + 1 = 4.")]),
            "identical_outputs",
            "identical",
        ),
        (
            PREFERENCE,
            jsonl(
                [preference_row(3) | {"non_preferred_output": [{"role": "user", "content": "4"}]}]
            ),
            "invalid_output_role",
            "non_preferred_output[0].role 'user' is not 'assistant'",
        ),
        (
            PREFERENCE,
            b'{"input": {"messages": [{"role": "user", "content": "x"}]},'
            b' "preferred_output": [{"role": "assistant", "content": "y"}]}\n',
            "missing_key",
            "missing key 'non_preferred_output'",
        ),
        (PREFERENCE, CHAT, "mixed_formats", "line 1 is preference"),
        (CHAT, PREFERENCE, "mixed_formats", "this line is preference"),
    ],
)
def test_bad_preference_line_is_refused_with_its_number_and_nothing_is_stored(
    team, api_env, head: bytes, tail: bytes, code: str, fragment: str
) -> None:
    objects_before, rows_before = object_count(api_env), file_rows(api_env)
    resp = team.upload(head + tail)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == (code, "file")
    assert "line 13:" in error["message"]
    assert fragment in error["message"]
    assert object_count(api_env) == objects_before
    assert file_rows(api_env) == rows_before


def test_empty_file_is_refused(team) -> None:
    resp = team.upload(b"\n\n")
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "empty_file"


def test_wrong_purpose_is_refused(team) -> None:
    resp = team.upload(CHAT, purpose="assistants")
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "purpose"


def test_missing_file_part_is_a_400_naming_it(team) -> None:
    resp = team.post("/v1/files", data={"purpose": "fine-tune"})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "file"


def test_list_is_newest_first_and_delete_removes(team) -> None:
    first = team.upload(CHAT).json()["id"]
    second = team.upload(CHAT).json()["id"]
    listed = [f["id"] for f in team.get("/v1/files").json()["data"]]
    assert listed[:2] == [second, first]
    resp = team.delete(f"/v1/files/{first}")
    assert resp.json() == {"id": first, "object": "file", "deleted": True}
    assert team.get(f"/v1/files/{first}").status_code == 404
    assert team.get(f"/v1/files/{first}/content").status_code == 404


def test_another_teams_file_answers_404(team, other_team) -> None:
    file_id = team.upload(CHAT).json()["id"]
    for resp in (
        other_team.get(f"/v1/files/{file_id}"),
        other_team.get(f"/v1/files/{file_id}/content"),
        other_team.delete(f"/v1/files/{file_id}"),
    ):
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "file_not_found"
    assert file_id not in [f["id"] for f in other_team.get("/v1/files").json()["data"]]
    assert team.get(f"/v1/files/{file_id}").status_code == 200


def test_requests_without_a_valid_key_are_401(api) -> None:
    assert api.get("/v1/files").status_code == 401
    resp = api.get("/v1/files", headers={"Authorization": "Bearer lathe-not-a-key"})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"


def test_non_ascii_filename_downloads_with_an_rfc_6266_header(team) -> None:
    body = team.upload(CHAT, name="données-été.jsonl").json()
    assert body["filename"] == "données-été.jsonl"
    resp = team.get(f"/v1/files/{body['id']}/content")
    assert resp.status_code == 200
    disposition = resp.headers["content-disposition"]
    assert 'filename="donn_es-_t_.jsonl"' in disposition
    assert "filename*=UTF-8''donn%C3%A9es-%C3%A9t%C3%A9.jsonl" in disposition


def test_overlong_filename_is_a_400_and_stores_nothing(team, api_env) -> None:
    objects_before = object_count(api_env)
    resp = team.upload(CHAT, name="a" * 600 + ".jsonl")
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_filename"
    assert object_count(api_env) == objects_before


@pytest.mark.parametrize("url", ["/v1/files/file-%00abc", "/v1/files?after=file-%00"])
def test_nul_bytes_in_ids_are_a_400_not_a_500(team, url: str) -> None:
    resp = team.get(url)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("name", "stored"),
    [("../../etc/passwd.jsonl", "passwd.jsonl"), ("C:\\data\\t.jsonl", "t.jsonl")],
)
def test_filenames_keep_only_their_last_component(team, name: str, stored: str) -> None:
    assert team.upload(CHAT, name=name).json()["filename"] == stored


def test_control_characters_in_filenames_are_refused(team) -> None:
    # Written by hand: HTTP clients percent-encode control characters in filenames.
    body = (
        b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="bad\x01name.jsonl"'
        b"\r\nContent-Type: application/octet-stream\r\n\r\n" + CHAT + b"\r\n--B--\r\n"
    )
    resp = team.post(
        "/v1/files", content=body, headers={"Content-Type": "multipart/form-data; boundary=B"}
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_filename"
