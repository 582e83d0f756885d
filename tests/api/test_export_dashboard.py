"""Exports on the dashboard's job page (app/web): the merged and GGUF forms queue an export
through app.services.exports (with the CSRF token, and not without it), a refused request
is the job page again with the service's reason, the exports table lists each with its
options and status, a finished one links its files (streamed from S3, the team's only),
and an unfinished one can be cancelled. In-process on Postgres, Redis and moto's S3; the
worker that really merges and converts is tests/e2e/test_exports.py's."""

from __future__ import annotations

import hashlib
import io
import re
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.domain.jobs import JobKind, JobStatus
from app.models import File, Job, Team, now
from app.services import lifecycle
from app.storage import ObjectStore, file_key
from tests.api.conftest import TeamClient
from tests.api.test_checkpoints import create_job
from tests.api.test_dashboard import csrf_of, signed_in
from tests.api.test_train_on_fine_tuned import add_checkpoint, finish


@pytest.fixture
def browser(api, team) -> Iterator[TestClient]:
    with signed_in(api, team.key) as client:
        yield client


@pytest.fixture
def demo_model_on_disk(api_env) -> None:
    """The demo's tiny model where the API reads base models: its ByT5 byte tokenizer is one
    llama.cpp's converter does not know (as tests/api/test_exports.py sets it up)."""
    from tests.conftest import settings_from
    from worker.training.tiny_model import ensure_tiny_random_llama

    settings = settings_from(api_env)
    spec = settings.base_model("tiny-random-llama")
    ensure_tiny_random_llama(settings.base_model_path(spec), spec.chat_template)


def finished_job(team: TeamClient, sessions) -> str:
    job_id = create_job(team)
    finish(sessions, team, job_id)
    return job_id


def finish_export(
    sessions, store: ObjectStore, team: TeamClient, export_id: str, files: dict[str, bytes]
) -> list[str]:
    """End the export as the worker does: its files stored in S3 as the team's result
    files, and the row moved running -> succeeded through the lifecycle's guarded moves.
    The files' ids, in order."""
    ids = []
    with sessions() as session:
        team_pk = session.scalar(select(Team.pk).where(Team.id == team.id))
        for name, data in files.items():
            file_id = f"file-{uuid.uuid4().hex[:24]}"
            store.put(file_key(team.id, file_id), io.BytesIO(data))
            session.add(
                File(
                    id=file_id,
                    team_pk=team_pk,
                    filename=name,
                    purpose="fine-tune-results",
                    bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                    storage_key=file_key(team.id, file_id),
                    status="processed",
                )
            )
            ids.append(file_id)
        session.flush()
        export = session.scalars(select(Job).where(Job.id == export_id)).one()
        assert lifecycle.transition(
            session, export, JobStatus.RUNNING, "Export started", started_at=now()
        )
        assert lifecycle.transition(
            session,
            export,
            JobStatus.SUCCEEDED,
            "Export finished",
            result_files=ids,
            finished_at=now(),
        )
        session.commit()
    return ids


def exports_of(sessions, job_id: str) -> list[Job]:
    with sessions() as session:
        source = session.scalar(select(Job.pk).where(Job.id == job_id))
        return list(
            session.scalars(
                select(Job)
                .where(Job.source_job_pk == source, Job.kind == JobKind.EXPORT)
                .order_by(Job.pk)
            )
        )


def export_count(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).where(Job.kind == JobKind.EXPORT))


def row_of(page: str, export_id: str) -> str:
    found = re.search(rf'<tr data-export="{export_id}">(.*?)</tr>', page, re.S)
    assert found, f"no row for {export_id} in the exports table"
    return found.group(1)


def test_the_merged_form_queues_an_export_and_the_table_lists_it(browser, team, sessions) -> None:
    job_id = finished_job(team, sessions)
    page = browser.get(f"/jobs/{job_id}").text
    assert 'id="export-merged"' in page and 'id="export-gguf"' in page
    assert 'id="export-list"' not in page  # no exports yet
    token = csrf_of(page)

    resp = browser.post(
        f"/jobs/{job_id}/exports",
        data={
            "csrf": token,
            "format": "merged",
            "dtype": "float16",
            "quantization": "q4_k_m",  # the other form's field: ignored for merged
            "base_weights": "original",
            "checkpoint": "",
        },
    )

    assert resp.status_code == 303, resp.text
    assert resp.headers["location"] == f"/jobs/{job_id}?notice=export_created#exports"
    [export] = exports_of(sessions, job_id)
    assert export.status == JobStatus.QUEUED
    assert (export.export["format"], export.export["dtype"], export.export["quantization"]) == (
        "merged",
        "float16",
        None,
    )
    assert export.export["base_weights"] == "original" and export.export["checkpoint"] is None
    page = browser.get(resp.headers["location"]).text
    assert "The export is queued" in page
    row = row_of(page, export.id)
    assert "merged, float16, original base" in row and "final model" in row
    assert 'class="status queued"' in row and "export-cancel" in row
    # An export in line refreshes the page, more slowly than a running job's.
    assert 'http-equiv="refresh" content="10;url=/jobs/' in page
    # The API lists the same export.
    listed = team.get(f"/v1/fine_tuning/jobs/{job_id}/exports").json()["data"]
    assert [e["id"] for e in listed] == [export.id]


def test_an_export_post_without_the_token_changes_nothing(browser, team, sessions) -> None:
    job_id = finished_job(team, sessions)
    before = export_count(sessions)
    for data in ({"format": "merged"}, {"format": "merged", "csrf": "0" * 40}):
        resp = browser.post(f"/jobs/{job_id}/exports", data=data)
        assert (resp.status_code, resp.headers["location"]) == (
            303,
            f"/jobs/{job_id}?notice=bad_csrf",
        )
    assert export_count(sessions) == before


def test_a_checkpoint_is_preselected_from_its_row_and_exported_as_gguf(
    browser, team, sessions
) -> None:
    job_id = create_job(team)
    name = finish(sessions, team, job_id)
    ckpt_id, _, _ = add_checkpoint(sessions, job_id, name, 40)
    page = browser.get(f"/jobs/{job_id}").text
    link = f"/jobs/{job_id}?checkpoint={ckpt_id}#export"
    assert f'href="{link}"' in page
    chosen = browser.get(link).text
    assert f'<option value="{ckpt_id}" selected>' in chosen
    assert f'<option value="{ckpt_id}" selected>' not in page
    # A made-up id preselects nothing and is not echoed.
    odd = browser.get(f"/jobs/{job_id}?checkpoint=<b>x</b>").text
    assert " selected>checkpoint" not in odd and "<b>x</b>" not in odd

    resp = browser.post(
        f"/jobs/{job_id}/exports",
        data={"csrf": csrf_of(chosen), "format": "merged", "checkpoint": ckpt_id},
    )

    assert resp.status_code == 303, resp.text
    [export] = exports_of(sessions, job_id)
    assert (export.export["checkpoint"], export.export["step_number"]) == (ckpt_id, 40)
    assert "checkpoint, step 40" in row_of(browser.get(f"/jobs/{job_id}").text, export.id)


def test_a_refused_export_shows_the_services_reason_and_stores_nothing(
    browser, team, sessions, demo_model_on_disk
) -> None:
    """The tiny model's byte tokenizer is not one llama.cpp converts: the service refuses
    GGUF at once (400). The page says why, with the form still there; nothing is queued."""
    job_id = finished_job(team, sessions)
    token = csrf_of(browser.get(f"/jobs/{job_id}").text)
    before = export_count(sessions)

    resp = browser.post(
        f"/jobs/{job_id}/exports",
        data={"csrf": token, "format": "gguf", "quantization": "q8_0", "dtype": "bfloat16"},
    )

    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith("text/html")
    error = re.search(r'id="export-error"[^>]*>(.*?)</p>', resp.text, re.S)
    assert error, resp.text
    assert "llama.cpp cannot convert" in error.group(1)
    assert "export it with format &#39;merged&#39;" in error.group(1)  # escaped as text
    assert 'id="export-gguf"' in resp.text  # the form, to try again
    assert export_count(sessions) == before
    # The team's lock the refused request took is released: the next export goes through.
    merged = browser.post(
        f"/jobs/{job_id}/exports", data={"csrf": token, "format": "merged", "dtype": ""}
    )
    assert merged.status_code == 303
    assert export_count(sessions) == before + 1


@pytest.mark.parametrize(
    ("data", "status", "says"),
    [
        ({"format": "onnx"}, 400, "Invalid format"),
        ({"format": "merged", "dtype": "float8"}, 400, "Invalid dtype"),
        ({"format": "gguf", "quantization": "q2_k"}, 400, "Invalid quantization"),
        ({"format": "merged", "base_weights": "fp8"}, 400, "Invalid base_weights"),
        ({"format": "merged", "checkpoint": "ftckpt-nope"}, 404, "no checkpoint"),
    ],
)
def test_a_form_sent_by_hand_with_bad_values_is_answered_on_the_page(
    browser, team, sessions, data, status, says
) -> None:
    job_id = finished_job(team, sessions)
    token = csrf_of(browser.get(f"/jobs/{job_id}").text)
    before = export_count(sessions)
    resp = browser.post(f"/jobs/{job_id}/exports", data={"csrf": token, **data})
    assert resp.status_code == status, resp.text
    error = re.search(r'id="export-error"[^>]*>(.*?)</p>', resp.text, re.S)
    assert error and says in error.group(1), resp.text
    assert export_count(sessions) == before


def test_an_unfinished_job_has_no_export_form_and_its_post_is_refused(
    browser, team, sessions
) -> None:
    job = create_job(team)  # queued
    page = browser.get(f"/jobs/{job}").text
    assert 'id="export-merged"' not in page and "Once the job has succeeded" in page
    resp = browser.post(f"/jobs/{job}/exports", data={"csrf": csrf_of(page), "format": "merged"})
    assert resp.status_code == 409
    assert "only a succeeded job" in resp.text


def test_a_finished_exports_files_download_and_another_team_sees_none_of_it(
    api, browser, team, other_team, sessions
) -> None:
    job_id = finished_job(team, sessions)
    export_id = team.post(
        f"/v1/fine_tuning/jobs/{job_id}/exports", json={"format": "merged"}
    ).json()["id"]
    files = {
        "config.json": b'{"model_type": "llama"}',
        "model-00001-of-00002.safetensors": bytes(range(256)) * 40,
        "model-00002-of-00002.safetensors": b"\x01" * 3000,
    }
    ids = finish_export(sessions, api.app.state.store, team, export_id, files)

    page = browser.get(f"/jobs/{job_id}").text

    row = row_of(page, export_id)
    assert 'class="status succeeded"' in row and "export-cancel" not in row
    assert "3 files, 13.3 KB" in row
    links = re.findall(r'class="export-file" href="([^"]+)"', row)
    assert links == [f"/jobs/{job_id}/exports/{export_id}/files/{i}" for i in ids]
    assert 'http-equiv="refresh"' not in page  # nothing left running
    for link, (name, data) in zip(links, files.items(), strict=True):
        resp = browser.get(link)
        assert resp.status_code == 200
        assert resp.content == data
        assert f'filename="{name}"' in resp.headers["content-disposition"]
        assert resp.headers["cache-control"] == "no-store"

    # Only the export's own files: the job's adapter is not one of them.
    with sessions() as session:
        adapter = session.scalar(select(Job.result_files).where(Job.id == job_id))[0]
    assert browser.get(f"/jobs/{job_id}/exports/{export_id}/files/{adapter}").status_code == 404
    # The export under another job of the same team: not found.
    other_job = finished_job(team, sessions)
    assert browser.get(f"/jobs/{other_job}/exports/{export_id}/files/{ids[0]}").status_code == 404

    with signed_in(api, other_team.key) as other:
        assert other.get(f"/jobs/{job_id}").status_code == 404
        assert other.get(links[0]).status_code == 404
        # Through a job of its own, the export id is not there either.
        own = finished_job(other_team, sessions)
        assert other.get(f"/jobs/{own}/exports/{export_id}/files/{ids[0]}").status_code == 404
        assert export_id not in other.get(f"/jobs/{own}").text
        token = csrf_of(other.get(f"/jobs/{own}").text)
        cancel = other.post(f"/jobs/{own}/exports/{export_id}/cancel", data={"csrf": token})
        assert cancel.status_code == 404
        made = other.post(f"/jobs/{job_id}/exports", data={"csrf": token, "format": "merged"})
        assert made.status_code == 404
    assert len(exports_of(sessions, job_id)) == 1


def test_cancel_ends_a_queued_export_once_and_needs_the_token(
    api, browser, team, other_team, sessions
) -> None:
    job_id = finished_job(team, sessions)
    export_id = team.post(
        f"/v1/fine_tuning/jobs/{job_id}/exports", json={"format": "merged"}
    ).json()["id"]
    url = f"/jobs/{job_id}/exports/{export_id}/cancel"

    refused = browser.post(url, data={"csrf": "nope"})
    assert refused.headers["location"] == f"/jobs/{job_id}?notice=bad_csrf"
    assert [e.status for e in exports_of(sessions, job_id)] == ["queued"]

    token = csrf_of(browser.get(f"/jobs/{job_id}").text)
    done = browser.post(url, data={"csrf": token})
    assert done.headers["location"] == f"/jobs/{job_id}?notice=export_cancelled#exports"
    assert [e.status for e in exports_of(sessions, job_id)] == ["cancelled"]
    page = browser.get(done.headers["location"]).text
    assert "The export was cancelled." in page
    assert "export-cancel" not in row_of(page, export_id)
    again = browser.post(url, data={"csrf": token})
    assert again.headers["location"] == f"/jobs/{job_id}?notice=export_not_cancellable#exports"
    missing = browser.post(f"/jobs/{job_id}/exports/ftexp-nope/cancel", data={"csrf": token})
    assert missing.status_code == 404
