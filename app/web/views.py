"""The dashboard's pages: server-rendered HTML over the same services the API uses.

Every page reads the database directly through app.services (no HTTP round trip to the
API), scoped to the signed-in team exactly as the API scopes a Bearer key: another team's
job is a 404. Nothing here is in the OpenAPI document (include_in_schema=False).
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader
from sqlalchemy import func, select

from app.api import pool as pool_api
from app.api.deps import SessionDep, SettingsDep, StoreDep
from app.api.files import file_response
from app.domain.jobs import FINAL_STATES, JobStatus
from app.errors import APIError, Conflict
from app.models import File, Job, JobEvent, Team
from app.services import files as files_service
from app.services import jobs as jobs_service
from app.services.admin import admin_for_key
from app.services.pool import team_quotas
from app.services.queue_view import job_position, positions, queue_summary
from app.services.teams import team_for_key
from app.services.usage import period_bounds, usage_for
from app.web import auth
from app.web.chart import loss_chart

HERE = Path(__file__).resolve().parent
ACTIVE = {JobStatus.VALIDATING_FILES.value, JobStatus.QUEUED.value, JobStatus.RUNNING.value}
FINAL = {s.value for s in FINAL_STATES}
REFRESH_SECONDS = 5
EVENTS_SHOWN = 100
JOBS_PER_PAGE = 50
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PERIOD = re.compile(r"^\d{4}-\d{2}$")
# Fixed texts for ?notice=: a redirect names one, the page never echoes the query string.
NOTICES = {
    "cancelled": ("ok", "The job was cancelled."),
    "not_cancellable": ("error", "The job has already ended; it cannot be cancelled."),
    "bad_csrf": ("error", "The form had expired; reload the page and try again."),
}
HEADERS = {
    # No script at all, styles only from the dashboard's own file, no framing.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

router = APIRouter(include_in_schema=False)
router.mount("/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")


# --- rendering ------------------------------------------------------------------------


def _ts(epoch: float | None) -> str:
    if not epoch:
        return "—"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _relative(epoch: float | None) -> str:
    if not epoch:
        return ""
    delta = epoch - time.time()
    seconds = abs(delta)
    if seconds < 60:
        text = f"{seconds:.0f} s"
    elif seconds < 3600:
        text = f"{seconds / 60:.0f} min"
    elif seconds < 86400:
        text = f"{seconds / 3600:.1f} h"
    else:
        text = f"{seconds / 86400:.1f} days"
    return f"in {text}" if delta >= 0 else f"{text} ago"


def _num(value: object, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.{digits}g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _value(value: object) -> str:
    """A job option as text: lists joined, None as a dash, the rest as is."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ", ".join(_value(v) for v in value) or "—"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_value(v)}" for k, v in value.items()) or "—"
    return str(value)


_env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every template, whatever its name: all data is text
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(ts=_ts, relative=_relative, num=_num, duration=_duration, value=_value)


def _base(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def render(
    request: Request,
    template: str,
    status_code: int = 200,
    team: Team | None = None,
    **context: object,
) -> HTMLResponse:
    key = auth.cookie_key(request) if team is not None else None
    html = _env.get_template(template).render(
        base=_base(request),
        team=team,
        csrf=auth.csrf_token(key) if key else "",
        page=template.removesuffix(".html"),
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=HEADERS)


def redirect(request: Request, path: str) -> RedirectResponse:
    return RedirectResponse(_base(request) + path, status_code=303, headers=HEADERS)


def to_login(request: Request) -> RedirectResponse:
    path = request.url.path
    base = _base(request)
    if base and path.startswith(base):
        path = path[len(base) :]
    if request.url.query:
        path += "?" + request.url.query
    return redirect(request, "/login?next=" + quote(auth.safe_next(path), safe="/"))


def not_found(request: Request, team: Team, what: str) -> HTMLResponse:
    return render(request, "error.html", 404, team, title="Not found", message=what)


# --- sign-in --------------------------------------------------------------------------


@router.get("/")
def home(request: Request, session: SessionDep) -> Response:
    team = auth.signed_in_team(request, session)
    return redirect(request, "/jobs" if team else "/login")


@router.get("/login")
def login_page(request: Request, session: SessionDep, next: str | None = None) -> Response:
    if auth.signed_in_team(request, session) is not None:
        return redirect(request, auth.safe_next(next))
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
    error, status = None, 200
    if not key:
        error, status = "Paste your team's API key.", 400
    elif team is None:
        if len(key) <= auth.MAX_KEY_CHARS and admin_for_key(session, key) is not None:
            error = "That is an admin key; the dashboard needs a team API key."
        else:
            error = "Invalid or revoked API key."
        status = 401
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
    if auth.cookie_key(request) and not auth.csrf_ok(request, csrf):
        return redirect(request, "/jobs?notice=bad_csrf")
    response = redirect(request, "/login")
    auth.clear_session_cookie(request, response)
    return response


# --- jobs -----------------------------------------------------------------------------


@router.get("/jobs")
def jobs_page(request: Request, session: SessionDep, after: str | None = None) -> Response:
    team = auth.signed_in_team(request, session)
    if team is None:
        return to_login(request)
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
        refresh=REFRESH_SECONDS * 2 if any(j.status in ACTIVE for j in rows) else None,
        notice=NOTICES.get(request.query_params.get("notice", "")),
    )


def _metrics_rows(session: SessionDep, job: Job) -> list[dict]:
    return [
        data
        for data in session.scalars(
            select(JobEvent.data)
            .where(JobEvent.job_pk == job.pk, JobEvent.type == "metrics")
            .order_by(JobEvent.pk)
        )
        if isinstance(data, dict)
    ]


def _result_files(session: SessionDep, team: Team, job: Job) -> dict[str, File]:
    ids = [i for i in job.result_files or [] if isinstance(i, str)]
    if not ids:
        return {}
    rows = session.scalars(select(File).where(File.team_pk == team.pk, File.id.in_(ids)))
    return {f.filename: f for f in rows}


def own_job(request: Request, session, job_id: str) -> tuple[Team, Job] | Response:
    """The signed-in team and its job `job_id`; else the login redirect or a 404 page."""
    team = auth.signed_in_team(request, session)
    if team is None:
        return to_login(request)
    if not _ID.match(job_id):
        return not_found(request, team, "No such fine-tuning job.")
    try:
        return team, jobs_service.get_job(session, team, job_id)
    except APIError:
        return not_found(request, team, f"No fine-tuning job {job_id} in team {team.name}.")


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, session: SessionDep, settings: SettingsDep):
    found = own_job(request, session, job_id)
    if isinstance(found, Response):
        return found
    team, job = found
    # The timeline without the per-step metrics events: those are the chart (and
    # metrics.csv); a long run has thousands.
    timeline = (JobEvent.job_pk == job.pk) & (JobEvent.type != "metrics")
    events = session.scalars(
        select(JobEvent).where(timeline).order_by(JobEvent.pk.desc()).limit(EVENTS_SHOWN)
    ).all()
    event_count = session.scalar(select(func.count()).where(timeline)) or 0
    checkpoints, _ = jobs_service.list_checkpoints(session, team, job_id, 100, None)
    place = job_position(session, settings, job) if job.status == JobStatus.QUEUED else None
    rows = _metrics_rows(session, job)
    last = rows[-1] if rows else None
    return render(
        request,
        "job.html",
        team=team,
        job=job,
        stats=job.stats if isinstance(job.stats, dict) else {},
        chart=loss_chart(rows),
        last_metrics=last,
        metrics_count=len(rows),
        events=events,
        event_count=event_count,
        checkpoints=checkpoints,
        place=place,
        results=_result_files(session, team, job),
        cancellable=job.status not in FINAL,
        refresh=REFRESH_SECONDS if job.status in ACTIVE else None,
        refresh_url=f"{_base(request)}/jobs/{job.id}",  # drops a ?notice= on reload
        notice=NOTICES.get(request.query_params.get("notice", "")),
    )


@router.post("/jobs/{job_id}/cancel")
def cancel(
    request: Request, job_id: str, session: SessionDep, csrf: Annotated[str, Form()] = ""
) -> Response:
    team = auth.signed_in_team(request, session)
    if team is None:
        return to_login(request)
    if not _ID.match(job_id):
        return not_found(request, team, "No such fine-tuning job.")
    if not auth.csrf_ok(request, csrf):
        return redirect(request, f"/jobs/{job_id}?notice=bad_csrf")
    try:
        jobs_service.cancel_job(session, team, job_id)
    except Conflict:
        return redirect(request, f"/jobs/{job_id}?notice=not_cancellable")
    except APIError:
        return not_found(request, team, f"No fine-tuning job {job_id} in team {team.name}.")
    return redirect(request, f"/jobs/{job_id}?notice=cancelled")


@router.get("/jobs/{job_id}/results/{filename}")
def result_file(
    request: Request, job_id: str, filename: str, session: SessionDep, store: StoreDep
) -> Response:
    """One of the job's result files (adapter.tar.gz, metrics.csv), streamed from object
    storage as GET /v1/files/{id}/content streams it."""
    found = own_job(request, session, job_id)
    if isinstance(found, Response):
        return found
    team, job = found
    try:
        record = _result_files(session, team, job).get(filename)
        if record is None:
            return not_found(request, team, f"Job {job_id} has no result file {filename}.")
        record = files_service.get_file(session, team, record.id)  # the team-prefix check
    except APIError:
        return not_found(request, team, f"No fine-tuning job {job_id} in team {team.name}.")
    return file_response(
        record,
        store,
        other_media="text/csv",
        **{"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
    )


# --- the pool and usage ---------------------------------------------------------------


@router.get("/pool")
def pool_page(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    team = auth.signed_in_team(request, session)
    if team is None:
        return to_login(request)
    # The API's own listing: it shows another team's job only as "busy".
    workers = pool_api.list_workers(team, session, settings)["data"]
    summary = queue_summary(session, settings)
    waiting = positions(session, settings)
    own_queued = session.scalars(
        select(Job)
        .where(Job.team_pk == team.pk, Job.status == JobStatus.QUEUED.value)
        .order_by(Job.created_at)
    ).all()
    mine = sorted(
        ((job, waiting.get(job.pk)) for job in own_queued),
        key=lambda pair: pair[1].position if pair[1] else math.inf,
    )
    names = {t["team_id"]: t["name"] for t in summary["teams"]}
    return render(
        request,
        "pool.html",
        team=team,
        workers=workers,
        classes=summary["classes"],
        teams=summary["teams"],
        team_names=names,
        mine=mine,
        refresh=REFRESH_SECONDS * 2,
    )


def _month_shift(period: str, months: int) -> str:
    year, month = (int(p) for p in period.split("-"))
    index = year * 12 + month - 1 + months
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


@router.get("/usage")
def usage_page(
    request: Request, session: SessionDep, settings: SettingsDep, period: str | None = None
) -> Response:
    team = auth.signed_in_team(request, session)
    if team is None:
        return to_login(request)
    error = None
    if period and not _PERIOD.match(period):
        error, period = "A period is a month: YYYY-MM.", None
    try:
        report = usage_for(session, [team], period or None)[0]
    except APIError as exc:
        error = exc.message
        report = usage_for(session, [team], None)[0]
    _, start, end = period_bounds(report["period"])
    ended = func.coalesce(Job.finished_at, Job.started_at)
    metered = session.scalars(
        select(Job)
        .where(Job.team_pk == team.pk, Job.gpu_seconds > 0, ended >= start, ended < end)
        .order_by(Job.pk.desc())
        .limit(JOBS_PER_PAGE)
    ).all()
    return render(
        request,
        "usage.html",
        jobs=metered,
        team=team,
        usage=report,
        quota=team_quotas(team, settings).gpu_hours_per_month,
        previous=_month_shift(report["period"], -1),
        following=_month_shift(report["period"], 1),
        error=error,
    )
