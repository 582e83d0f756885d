"""The dashboard's pages: server-rendered HTML over the same services the API uses.

Every page reads the database directly through app.services (no HTTP round trip to the
API), scoped to the signed-in team exactly as the API scopes a Bearer key: another team's
job is a 404. Nothing here is in the OpenAPI document (include_in_schema=False).
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session

from app.config import Settings
from app.domain.jobs import ACTIVE_STATES, FINAL_STATES, JobStatus
from app.downloads import file_response
from app.errors import APIError, Conflict
from app.http_deps import SessionDep, SettingsDep, StoreDep
from app.models import Job, Team
from app.services import exports as exports_service
from app.services import files as files_service
from app.services import jobs as jobs_service
from app.services.admin_keys import ADMIN_KEY_PREFIX, admin_for_key
from app.services.events import timeline
from app.services.pool import team_quotas, workers_seen_by
from app.services.queue_view import job_position, queue_summary, team_queue
from app.services.teams import team_for_key
from app.services.training_metrics import metrics_rows
from app.services.usage import metered_jobs, usage_for
from app.web import auth
from app.web.chart import loss_chart, reward_accuracy_chart, reward_margin_chart, score_chart
from app.web.classification import classification_view
from app.web.deps import (
    JobId,
    MaybeTeam,
    PageNotFound,
    SignedInTeam,
    TeamJob,
    cookie_admin,
    job_not_found,
    team_job,
)
from app.web.exports import FormChoices, export_request, export_rows
from app.web.lineage import lineage_view
from app.web.pages import HERE, base_path, notice, redirect, render
from app.web.tracking import trackers_view

FINAL = {s.value for s in FINAL_STATES}
REFRESH_SECONDS = 5
EVENTS_SHOWN = 100
EXPORTS_SHOWN = 50
JOBS_PER_PAGE = 50
_PERIOD = re.compile(r"^\d{4}-\d{2}$")

router = APIRouter(include_in_schema=False)
router.mount("/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")


# --- sign-in --------------------------------------------------------------------------


@router.get("/")
def home(request: Request, team: MaybeTeam, session: SessionDep) -> Response:
    if team is None and cookie_admin(request, session) is not None:
        return redirect(request, auth.ADMIN_HOME)
    return redirect(request, "/jobs" if team else "/login")


@router.get("/login")
def login_page(
    request: Request, team: MaybeTeam, session: SessionDep, next: str | None = None
) -> Response:
    if team is not None:
        return redirect(request, auth.safe_next(next))
    if cookie_admin(request, session) is not None:  # a team page asked for: the admin's own
        return redirect(request, auth.safe_admin_next(next))
    return render(request, "login.html", next=auth.safe_next(next), error=None)


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    key: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "",
) -> Response:
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        # Another site posting a key (its own) would sign the visitor into that team.
        return Response("cross-site sign-in refused", status_code=403)
    key = key.strip()
    target = auth.safe_next(next)
    team = team_for_key(session, key) if 0 < len(key) <= auth.MAX_KEY_CHARS else None
    if team is None and 0 < len(key) <= auth.MAX_KEY_CHARS and admin_for_key(session, key):
        # An admin key: a session for the admin pages (app/web/admin_pages.py) alone.
        response = redirect(request, auth.safe_admin_next(next))
        auth.set_session_cookie(request, response, key)
        return response
    error, status = None, 200
    if not key:
        error, status = "Paste your team's API key.", 400
    elif team is None:
        error, status = "Invalid or revoked API key.", 401
    elif team.disabled:
        error, status = f"Team {team.name} is disabled; ask an administrator.", 403
    if error:
        return render(request, "login.html", status, next=target, error=error)
    response = redirect(request, target)
    auth.set_session_cookie(request, response, key)
    return response


@router.post("/logout")
def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
    # A forged logout would be harmless, but the token is checked like any other form.
    key = auth.cookie_key(request)
    if key and not auth.csrf_ok(request, csrf):
        home = "/admin/teams" if key.startswith(ADMIN_KEY_PREFIX) else "/jobs"
        return redirect(request, f"{home}?notice=bad_csrf")
    response = redirect(request, "/login")
    auth.clear_session_cookie(request, response)
    return response


# --- jobs -----------------------------------------------------------------------------


@router.get("/jobs")
def jobs_page(
    request: Request, team: SignedInTeam, session: SessionDep, after: str | None = None
) -> Response:
    try:
        rows, has_more = jobs_service.list_jobs(session, team, JOBS_PER_PAGE, after or None)
    except APIError:
        rows, has_more = jobs_service.list_jobs(session, team, JOBS_PER_PAGE, None)
    return render(
        request,
        "jobs.html",
        team=team,
        jobs=rows,
        has_more=has_more,
        refresh=REFRESH_SECONDS * 2 if any(j.status in ACTIVE_STATES for j in rows) else None,
        notice=notice(request),
    )


def _team_job_or_none(session: Session, team: Team, job_id: str) -> Job | None:
    """An ancestor on the lineage: linked only if it is this team's job."""
    try:
        return jobs_service.get_job(session, team, job_id)
    except APIError:
        return None


@router.get("/jobs/{job_id}")
def job_page(
    request: Request,
    team: SignedInTeam,
    job: TeamJob,
    session: SessionDep,
    settings: SettingsDep,
    checkpoint: str | None = None,
) -> Response:
    return _job_page(request, team, job, session, settings, checkpoint=checkpoint)


def _job_page(
    request: Request,
    team: Team,
    job: Job,
    session: Session,
    settings: Settings,
    *,
    status_code: int = 200,
    export_error: str | None = None,
    checkpoint: str | None = None,
) -> Response:
    """The job page; `export_error`: why the export form's request was refused (the
    page is then the form's answer); `checkpoint`: the one the export forms preselect."""
    events, event_count = timeline(session, job.pk, EVENTS_SHOWN)
    checkpoints, _ = jobs_service.list_checkpoints(session, team, job.id, 100, None)
    place = job_position(session, settings, job) if job.status == JobStatus.QUEUED else None
    rows = metrics_rows(session, job.pk)
    stats = job.stats if isinstance(job.stats, dict) else {}
    export_list, _ = exports_service.list_exports(session, team, job.id, EXPORTS_SHOWN, None)
    exports = export_rows(
        export_list, job.id, exports_service.export_files(session, team, export_list)
    )
    refresh = None
    if job.status in ACTIVE_STATES:
        refresh = REFRESH_SECONDS
    elif any(e.cancellable for e in exports):
        refresh = REFRESH_SECONDS * 2  # slower: the page has the export forms on it
    return render(
        request,
        "job.html",
        status_code,
        team=team,
        job=job,
        stats=stats,
        chart=loss_chart(rows),
        scores=score_chart(rows),
        reward_accuracy=reward_accuracy_chart(rows),
        reward_margin=reward_margin_chart(rows),
        classification=classification_view(stats),
        lineage=lineage_view(job, lambda job_id: _team_job_or_none(session, team, job_id)),
        trackers=trackers_view(job.integrations, stats),
        last_metrics=rows[-1] if rows else None,
        last_eval=next((r for r in reversed(rows) if r.get("valid_loss") is not None), None),
        metrics_count=len(rows),
        events=events,
        event_count=event_count,
        checkpoints=checkpoints,
        place=place,
        results=files_service.result_files(session, team, job),
        cancellable=job.status not in FINAL,
        exports=exports,
        exportable=job.status == JobStatus.SUCCEEDED,
        export_choices=FormChoices(),
        export_error=export_error,
        chosen_checkpoint=checkpoint if any(c.id == checkpoint for c in checkpoints) else None,
        refresh=refresh,
        refresh_url=f"{base_path(request)}/jobs/{job.id}",  # drops a ?notice= on reload
        notice=notice(request),
    )


@router.post("/jobs/{job_id}/cancel")
def cancel(
    request: Request,
    team: SignedInTeam,
    job_id: JobId,
    session: SessionDep,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    if not auth.csrf_ok(request, csrf):
        return redirect(request, f"/jobs/{job_id}?notice=bad_csrf")
    try:
        jobs_service.cancel_job(session, team, job_id)
    except Conflict:
        return redirect(request, f"/jobs/{job_id}?notice=not_cancellable")
    except APIError:
        raise job_not_found(team, job_id) from None
    return redirect(request, f"/jobs/{job_id}?notice=cancelled")


@router.get("/jobs/{job_id}/results/{filename}")
def result_file(
    team: SignedInTeam, job: TeamJob, filename: str, session: SessionDep, store: StoreDep
) -> Response:
    """One of the job's result files (adapter.tar.gz, metrics.csv), streamed from object
    storage as GET /v1/files/{id}/content streams it."""
    try:
        record = files_service.result_files(session, team, job).get(filename)
        if record is None:
            raise PageNotFound(team, f"Job {job.id} has no result file {filename}.")
        record = files_service.get_file(session, team, record.id)  # the team-prefix check
    except APIError:
        raise job_not_found(team, job.id) from None
    return file_response(
        record,
        store,
        other_media="text/csv",
        **{"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
    )


@router.get("/jobs/{job_id}/checkpoints/{checkpoint_id}/adapter.tar.gz")
def checkpoint_adapter(
    team: SignedInTeam, job: TeamJob, checkpoint_id: str, session: SessionDep, store: StoreDep
) -> Response:
    """A checkpoint's adapter alone (its adapter_file), to keep the step that did best."""
    try:
        checkpoint = jobs_service.get_checkpoint(session, team, job.id, checkpoint_id)
        if checkpoint.adapter_file is None:
            raise PageNotFound(team, f"Checkpoint {checkpoint_id} has no adapter file.")
        record = files_service.get_file(session, team, checkpoint.adapter_file)
    except APIError:
        raise PageNotFound(team, f"Job {job.id} has no checkpoint {checkpoint_id}.") from None
    return file_response(
        record, store, **{"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
    )


# --- exports ----------------------------------------------------------------------------


@router.post("/jobs/{job_id}/exports")
def create_export(
    request: Request,
    team: SignedInTeam,
    job_id: JobId,
    session: SessionDep,
    settings: SettingsDep,
    format: Annotated[str, Form()] = "",
    dtype: Annotated[str, Form()] = "",
    quantization: Annotated[str, Form()] = "",
    base_weights: Annotated[str, Form()] = "",
    checkpoint: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    """The export forms: queue the export as POST /v1/fine_tuning/jobs/{id}/exports does
    and go back to the job page; a refused request is that page again with the reason."""
    if not auth.csrf_ok(request, csrf):
        return redirect(request, f"/jobs/{job_id}?notice=bad_csrf")
    job = team_job(job_id, team, session)  # another team's job: the 404 page
    body = export_request(format, dtype, quantization, base_weights, checkpoint)
    if isinstance(body, str):
        return _job_page(request, team, job, session, settings, status_code=400, export_error=body)
    try:
        exports_service.create_export(session, settings, team, job.id, body)
    except APIError as exc:
        session.rollback()  # what the refused request held (the team's lock) goes
        job = team_job(job_id, team, session)
        return _job_page(
            request,
            team,
            job,
            session,
            settings,
            status_code=exc.status_code,
            export_error=exc.message,
            checkpoint=checkpoint or None,
        )
    return redirect(request, f"/jobs/{job_id}?notice=export_created#exports")


@router.post("/jobs/{job_id}/exports/{export_id}/cancel")
def cancel_export(
    request: Request,
    team: SignedInTeam,
    job_id: JobId,
    export_id: str,
    session: SessionDep,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    if not auth.csrf_ok(request, csrf):
        return redirect(request, f"/jobs/{job_id}?notice=bad_csrf")
    try:
        exports_service.cancel_export(session, team, job_id, export_id)
    except Conflict:
        return redirect(request, f"/jobs/{job_id}?notice=export_not_cancellable#exports")
    except APIError:
        raise _export_not_found(team, job_id, export_id) from None
    return redirect(request, f"/jobs/{job_id}?notice=export_cancelled#exports")


@router.get("/jobs/{job_id}/exports/{export_id}/files/{file_id}")
def export_file(
    team: SignedInTeam,
    job: TeamJob,
    export_id: str,
    file_id: str,
    session: SessionDep,
    store: StoreDep,
) -> Response:
    """One file of one of the job's exports (a safetensors shard, config.json, the .gguf,
    the Modelfile), streamed from object storage: the team's export's file only."""
    try:
        export = exports_service.get_export(session, team, job.id, export_id)
        if file_id not in (export.result_files or []):
            raise PageNotFound(team, f"Export {export_id} has no file {file_id}.")
        record = files_service.get_file(session, team, file_id)  # the team-prefix check
    except APIError:
        raise _export_not_found(team, job.id, export_id) from None
    return file_response(
        record, store, **{"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
    )


def _export_not_found(team: Team, job_id: str, export_id: str) -> PageNotFound:
    return PageNotFound(team, f"Job {job_id} of team {team.name} has no export {export_id}.")


# --- the pool and usage ---------------------------------------------------------------


@router.get("/pool")
def pool_page(
    request: Request, team: SignedInTeam, session: SessionDep, settings: SettingsDep
) -> Response:
    summary = queue_summary(session, settings)
    names = {t["team_id"]: t["name"] for t in summary["teams"]}
    return render(
        request,
        "pool.html",
        team=team,
        workers=workers_seen_by(session, settings, team),  # another team's job: "busy"
        classes=summary["classes"],
        teams=summary["teams"],
        team_names=names,
        mine=team_queue(session, settings, team),
        refresh=REFRESH_SECONDS * 2,
    )


def _month_shift(period: str, months: int) -> str:
    year, month = (int(p) for p in period.split("-"))
    index = year * 12 + month - 1 + months
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


@router.get("/usage")
def usage_page(
    request: Request,
    team: SignedInTeam,
    session: SessionDep,
    settings: SettingsDep,
    period: str | None = None,
) -> Response:
    error = None
    if period and not _PERIOD.match(period):
        error, period = "A period is a month: YYYY-MM.", None
    try:
        report = usage_for(session, [team], period or None)[0]
    except APIError as exc:
        error = exc.message
        report = usage_for(session, [team], None)[0]
    return render(
        request,
        "usage.html",
        jobs=metered_jobs(session, team, report["period"], JOBS_PER_PAGE),
        team=team,
        usage=report,
        quota=team_quotas(team, settings).gpu_hours_per_month,
        previous=_month_shift(report["period"], -1),
        following=_month_shift(report["period"], 1),
        error=error,
    )
