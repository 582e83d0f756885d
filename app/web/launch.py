"""The launch form, `/jobs/new`: upload a dataset, choose a model, a method, its
hyperparameters and Lathe's options, check the memory estimate, submit.

One multipart form, posted to `POST /jobs/new` by one of its buttons: Upload (store the
chosen files and show the server's verdict beside each), Check (also the memory estimate
and the GPU classes that fit) or Submit (create the job, then its page). A file chosen in
the form is uploaded by whichever button is pressed, through the same file service as
POST /v1/files; the job is created by app.services.jobs.create_job. It all works without
JavaScript; static/upload.js only shows the upload's progress (docs/dashboard.md).
`/jobs/new?from=ID` fills the form with a job's settings ("run again with these settings").
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.config import Settings
from app.domain.datasets import format_label
from app.errors import APIError
from app.http_deps import SessionDep, SettingsDep, StoreDep
from app.models import File, Team
from app.schemas.jobs import JobCreate
from app.services import files as files_service
from app.services import jobs as jobs_service
from app.services.pool import pool_classes
from app.storage import ObjectStore
from app.web import auth
from app.web.deps import SignedInTeam, find_team_job
from app.web.launch_check import CheckResult, check_job, model_choices
from app.web.launch_form import (
    METHODS,
    body_from,
    defaults,
    field_for,
    fields,
    posted_values,
    validation_errors,
    values_from_job,
)
from app.web.pages import HEADERS, redirect, render

router = APIRouter(include_in_schema=False)

# This page alone runs a script: the dashboard's own static/upload.js, which posts the form
# with XMLHttpRequest (connect-src) to show the upload's progress. Every other page keeps
# pages.HEADERS' "no script at all".
CSP = HEADERS["Content-Security-Policy"].replace(
    "default-src 'none';", "default-src 'none'; script-src 'self'; connect-src 'self';"
)
UPLOADS = {"training_upload": "training_file", "validation_upload": "validation_file"}
ACTIONS = ("upload", "check", "submit")
FILES_LISTED = 200
# Room for the form's fields and the multipart framing beside its (at most two) files.
FORM_BYTES = 256 * 1024
REQUIRED = {
    "model": "Choose a model.",
    "training_file": "Choose a training file, or upload one.",
}


def _page(
    request: Request,
    team: Team,
    session: Session,
    settings: Settings,
    values: dict[str, str],
    *,
    status_code: int = 200,
    errors: dict[str, str] | None = None,
    general: list[str] | None = None,
    verdicts: dict[str, tuple[str, str]] | None = None,
    check: CheckResult | None = None,
    cloned_from: str | None = None,
) -> Response:
    files, _ = files_service.list_files(session, team, "fine-tune", FILES_LISTED, None)
    response = render(
        request,
        "launch.html",
        status_code,
        team=team,
        values=values,
        fields=fields(),
        sections=list(dict.fromkeys(f.section for f in fields())),
        methods=METHODS,
        models=model_choices(session, settings, team),
        gpu_classes=sorted(pool_classes(session, settings).items()),
        files=files,
        files_by_id={f.id: f for f in files},
        errors=errors or {},
        general=general or [],
        verdicts=verdicts or {},
        check=check,
        cloned_from=cloned_from,
        max_file_bytes=files_service.upload_limits(team, settings).bytes,
    )
    response.headers["Content-Security-Policy"] = CSP
    return response


@router.get("/jobs/new")
def launch_page(
    request: Request,
    team: SignedInTeam,
    session: SessionDep,
    settings: SettingsDep,
    source: Annotated[str | None, Query(alias="from")] = None,
    training_file: str | None = None,
) -> Response:
    values = defaults()
    if source:
        values = values_from_job(find_team_job(session, team, source))  # another team's: 404
    elif training_file:
        values["training_file"] = training_file
    return _page(request, team, session, settings, values, cloned_from=source)


@router.post("/jobs/new")
async def launch(
    request: Request,
    team: SignedInTeam,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
) -> Response:
    limits = files_service.upload_limits(team, settings)
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        # Starlette spools a form's file parts to disk without a limit: only a stated
        # length (which uvicorn holds the body to) bounds them. Browsers always state it.
        message = "The form must be sent with its Content-Length (a chunked body is refused)."
        return await run_in_threadpool(
            _page, request, team, session, settings, defaults(), status_code=411, general=[message]
        )
    if int(declared) > 2 * limits.bytes + FORM_BYTES:
        # Refused unread, as POST /v1/files refuses it (uvicorn holds a body to its length).
        message = limits.refusal(int(declared)).message
        return await run_in_threadpool(
            _page, request, team, session, settings, defaults(), status_code=413, general=[message]
        )
    async with request.form(max_files=2, max_fields=100, max_part_size=64 * 1024) as form:
        csrf = form.get("csrf")
        if not auth.csrf_ok(request, csrf if isinstance(csrf, str) else ""):
            return redirect(request, "/jobs/new?notice=bad_csrf")
        texts = {k: v for k, v in form.items() if isinstance(v, str)}
        uploads = {
            name: part
            for name, part in form.items()
            if name in UPLOADS and isinstance(part, UploadFile) and part.filename
        }
        return await run_in_threadpool(
            _answer, request, team, session, settings, store, texts, uploads, limits
        )


def _answer(
    request: Request,
    team: Team,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    form: dict[str, str],
    uploads: dict[str, UploadFile],
    limits: files_service.UploadLimits,
) -> Response:
    values = posted_values(form)
    action = form.get("action") if form.get("action") in ACTIONS else "submit"
    page: dict[str, Any] = {"cloned_from": form.get("from") or None}
    verdicts: dict[str, tuple[str, str]] = {}
    errors: dict[str, str] = {}
    for name, part in uploads.items():
        target = UPLOADS[name]
        try:
            record = files_service.store_upload(
                session,
                store,
                team,
                part.filename or "upload.jsonl",
                "fine-tune",
                part.file,
                limits.max_bytes,
                limits.quota_bytes,
            )
        except APIError as exc:
            session.rollback()
            verdicts[name] = ("error", exc.message)
            continue
        values[target] = record.id
        verdicts[name] = ("ok", _accepted(record))
    if any(kind == "error" for kind, _ in verdicts.values()):
        return _page(
            request, team, session, settings, values, status_code=400, verdicts=verdicts, **page
        )
    if action == "upload":
        return _page(request, team, session, settings, values, verdicts=verdicts, **page)
    for name, message in REQUIRED.items():
        if not values.get(name):
            errors[name] = message
    general: list[str] = []
    body = None
    raw, unreadable = body_from(values)
    errors = {**unreadable, **errors}
    try:
        body = JobCreate.model_validate(raw)
    except ValidationError as exc:
        by_field, general = validation_errors(exc)
        errors = {**by_field, **errors}
    if errors or general or body is None:
        return _page(
            request,
            team,
            session,
            settings,
            values,
            status_code=400,
            errors=errors,
            general=general,
            verdicts=verdicts,
            **page,
        )
    try:
        if action == "check":
            result = check_job(session, settings, team, body)
            session.rollback()  # it only read
            if result.refusal is not None:
                _place(result.refusal, errors, general)
            return _page(
                request,
                team,
                session,
                settings,
                values,
                errors=errors,
                general=general,
                verdicts=verdicts,
                check=result,
                **page,
            )
        job = jobs_service.create_job(session, settings, team, body)
    except APIError as exc:
        session.rollback()  # what the refused request held (the team's lock) goes
        _place(exc, errors, general)
        return _page(
            request,
            team,
            session,
            settings,
            values,
            status_code=exc.status_code,
            errors=errors,
            general=general,
            verdicts=verdicts,
            **page,
        )
    return redirect(request, f"/jobs/{job.id}")


def _place(exc: APIError, errors: dict[str, str], general: list[str]) -> None:
    """A service's refusal on the field its `param` names, else above the form."""
    name = field_for(exc.param)
    if name is None:
        general.append(exc.message)
    else:
        errors[name] = exc.message


def _accepted(record: File) -> str:
    label = format_label(record.format)
    return (
        f"{record.filename} is valid: {label}, {record.examples} examples; uploaded as {record.id}."
    )
