"""The dashboard's admin pages under /admin, for a session signed in with an admin key:
teams (weights, quotas, this month's usage, disable, preemptible), a team's keys (issue,
rotate, revoke; a new key shown once), workers (drain, undrain), the whole queue and the
audit log.

Every change is a POST form with the session's CSRF token that calls the same service as
the admin API (app.services.team_admin, team_keys, worker_drain) with the signed-in
AdminKey, so it is checked and audited exactly as the API's request would be, the admin
key's name and id as the actor. A refusal is the page again with the service's message on
the field it names (its `param`). A team's session gets the 404 page here
(app.web.deps.signed_in_admin); see docs/dashboard.md.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import APIError, NotFound
from app.http_deps import SessionDep, SettingsDep
from app.models import AdminKey, ApiKey, Team
from app.services import audit, team_admin, team_keys, worker_drain
from app.services.pool import quota_defaults, workers_seen_by
from app.web import auth
from app.web.admin_forms import TEAM_FORM_FIELDS, team_changes, team_form
from app.web.admin_views import team_rows, whole_queue
from app.web.deps import SignedInAdmin
from app.web.pages import NOTICES, redirect, render

TEAMS_PER_PAGE = 50
AUDIT_PER_PAGE = 50
# Fixed texts for the admin pages' ?notice= (the page never echoes the query string).
ADMIN_NOTICES = {
    "bad_csrf": NOTICES["bad_csrf"],
    "team_saved": ("ok", "The team's settings were saved."),
    "team_unchanged": ("ok", "Nothing changed: the team's settings are as they were."),
    "key_revoked": ("ok", "The key was revoked: it no longer works for the API or the dashboard."),
    "worker_drained": ("ok", "The worker is draining: it finishes its job and takes no other."),
    "worker_undrained": ("ok", "The worker is back in the pool: it takes jobs again."),
}

router = APIRouter(prefix="/admin", include_in_schema=False)
Text = Annotated[str, Form()]


def _page(
    request: Request, template: str, admin: AdminKey, status_code: int = 200, **context: object
) -> Response:
    """An admin page: the admin's navigation, and the CSRF token of the session's key."""
    key = auth.cookie_key(request)
    notice = ADMIN_NOTICES.get(request.query_params.get("notice", ""))
    return render(
        request,
        template,
        status_code,
        admin=admin,
        admin_csrf=auth.csrf_token(key) if key else "",
        notice=notice,
        **context,
    )


def _not_found(request: Request, admin: AdminKey, message: str) -> Response:
    return _page(request, "error.html", admin, 404, title="Not found", message=message)


@router.get("")
def admin_home(request: Request, admin: SignedInAdmin) -> Response:
    return redirect(request, auth.ADMIN_HOME)


# --- teams ------------------------------------------------------------------------------


@router.get("/teams")
def teams_page(
    request: Request,
    admin: SignedInAdmin,
    session: SessionDep,
    settings: SettingsDep,
    after: str | None = None,
) -> Response:
    try:
        teams, has_more = team_admin.list_teams(session, TEAMS_PER_PAGE, after or None)
    except APIError:  # a cursor that is no team's id: the first page
        teams, has_more = team_admin.list_teams(session, TEAMS_PER_PAGE, None)
    return _page(
        request,
        "admin_teams.html",
        admin,
        rows=team_rows(session, settings, teams),
        has_more=has_more,
    )


def _team_page(
    request: Request,
    admin: AdminKey,
    session: Session,
    settings: Settings,
    team: Team,
    *,
    status_code: int = 200,
    values: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    keys_error: str | None = None,
) -> Response:
    """A team's page; `values` and `errors`: the refused form as sent, and the service's
    message by field; `keys_error`: why a key action was refused."""
    return _page(
        request,
        "admin_team.html",
        admin,
        status_code,
        row=team_rows(session, settings, [team])[0],
        defaults=quota_defaults(settings),
        keys=team_keys.list_keys(session, team.id),
        values=values if values is not None else team_form(team),
        errors=errors or {},
        keys_error=keys_error,
    )


@router.get("/teams/{team_id}")
def team_page(
    request: Request,
    team_id: str,
    admin: SignedInAdmin,
    session: SessionDep,
    settings: SettingsDep,
) -> Response:
    try:
        team = team_admin.get_team(session, team_id)
    except APIError as exc:
        return _not_found(request, admin, exc.message)
    return _team_page(request, admin, session, settings, team)


@router.post("/teams/{team_id}")
def update_team(
    request: Request,
    team_id: str,
    admin: SignedInAdmin,
    session: SessionDep,
    settings: SettingsDep,
    weight: Text = "",
    max_running_jobs: Text = "",
    max_queued_jobs: Text = "",
    max_file_bytes: Text = "",
    gpu_hours_per_month: Text = "",
    disabled: Text = "",
    preemptible: Text = "",
    csrf: Text = "",
) -> Response:
    """The team form: the fields changed go to team_admin.update_team, as PATCH
    /v1/admin/teams/{id} with those fields would send them."""
    if not auth.csrf_ok(request, csrf):
        return redirect(request, f"/admin/teams/{team_id}?notice=bad_csrf")
    try:
        team = team_admin.get_team(session, team_id)
    except APIError as exc:
        return _not_found(request, admin, exc.message)
    form = {
        "weight": weight,
        "max_running_jobs": max_running_jobs,
        "max_queued_jobs": max_queued_jobs,
        "max_file_bytes": max_file_bytes,
        "gpu_hours_per_month": gpu_hours_per_month,
        "disabled": disabled,
        "preemptible": preemptible,
    }
    changes = team_changes(team, form)
    if not changes:
        return redirect(request, f"/admin/teams/{team_id}?notice=team_unchanged")
    try:
        team_admin.update_team(session, admin, team_id, changes)
    except APIError as exc:
        session.rollback()
        field = exc.param if exc.param in TEAM_FORM_FIELDS else "form"
        return _team_page(
            request,
            admin,
            session,
            settings,
            team_admin.get_team(session, team_id),
            status_code=exc.status_code,
            values=form,
            errors={field: exc.message},
        )
    return redirect(request, f"/admin/teams/{team_id}?notice=team_saved")


# --- a team's keys ------------------------------------------------------------------------


def _key_shown_once(
    request: Request, admin: AdminKey, team: Team, record: ApiKey, key: str, rotated: bool
) -> Response:
    """The one page that shows a new key in clear text: the POST's own answer (no-store,
    like every page), never a page that can be loaded again."""
    return _page(
        request, "admin_key.html", admin, shown=team, record=record, key=key, rotated=rotated
    )


def _key_action(
    request: Request,
    admin: AdminKey,
    session: Session,
    settings: Settings,
    team_id: str,
    csrf: str,
    rotate: bool,
) -> Response:
    if not auth.csrf_ok(request, csrf):
        return redirect(request, f"/admin/teams/{team_id}?notice=bad_csrf")
    try:
        team = team_admin.get_team(session, team_id)
    except APIError as exc:
        return _not_found(request, admin, exc.message)
    action = team_keys.rotate_keys if rotate else team_keys.issue_key
    try:
        record, key = action(session, admin, team_id)
    except APIError as exc:
        session.rollback()
        team = team_admin.get_team(session, team_id)
        return _team_page(
            request,
            admin,
            session,
            settings,
            team,
            status_code=exc.status_code,
            keys_error=exc.message,
        )
    return _key_shown_once(request, admin, team, record, key, rotate)


@router.post("/teams/{team_id}/keys")
def issue_key(
    request: Request,
    team_id: str,
    admin: SignedInAdmin,
    session: SessionDep,
    settings: SettingsDep,
    csrf: Text = "",
) -> Response:
    """One more key for the team (team_keys.issue_key, as POST /v1/admin/teams/{id}/keys)."""
    return _key_action(request, admin, session, settings, team_id, csrf, rotate=False)


@router.post("/teams/{team_id}/keys/rotate")
def rotate_keys(
    request: Request,
    team_id: str,
    admin: SignedInAdmin,
    session: SessionDep,
    settings: SettingsDep,
    csrf: Text = "",
) -> Response:
    """A new key and every other key of the team revoked (team_keys.rotate_keys)."""
    return _key_action(request, admin, session, settings, team_id, csrf, rotate=True)


@router.post("/teams/{team_id}/keys/{key_id}/revoke")
def revoke_key(
    request: Request,
    team_id: str,
    key_id: str,
    admin: SignedInAdmin,
    session: SessionDep,
    settings: SettingsDep,
    csrf: Text = "",
) -> Response:
    """team_keys.revoke_key, as DELETE /v1/admin/keys/{id}; only a key of the page's team
    (the path names both, and a key of another team is not this page's to revoke)."""
    if not auth.csrf_ok(request, csrf):
        return redirect(request, f"/admin/teams/{team_id}?notice=bad_csrf")
    try:
        team = team_admin.get_team(session, team_id)
    except APIError as exc:
        return _not_found(request, admin, exc.message)
    try:
        team_keys.revoke_key(session, admin, key_id, team)
    except NotFound:
        return _not_found(request, admin, f"Team {team.name} has no API key {key_id}.")
    except APIError as exc:
        session.rollback()
        team = team_admin.get_team(session, team_id)
        return _team_page(
            request,
            admin,
            session,
            settings,
            team,
            status_code=exc.status_code,
            keys_error=exc.message,
        )
    return redirect(request, f"/admin/teams/{team_id}?notice=key_revoked#keys")


# --- workers ------------------------------------------------------------------------------


def _workers_page(
    request: Request,
    admin: AdminKey,
    session: Session,
    settings: Settings,
    *,
    status_code: int = 200,
    refused: tuple[str, str] | None = None,
) -> Response:
    """`refused`: (worker id, the service's message) for a drain or undrain refused."""
    return _page(
        request,
        "admin_workers.html",
        admin,
        status_code,
        workers=workers_seen_by(session, settings, None),  # every team's job shown
        refused=refused,
    )


@router.get("/workers")
def workers_page(
    request: Request, admin: SignedInAdmin, session: SessionDep, settings: SettingsDep
) -> Response:
    return _workers_page(request, admin, session, settings)


def _drain(
    request: Request,
    admin: AdminKey,
    session: Session,
    settings: Settings,
    worker_id: str,
    csrf: str,
    drain: bool,
) -> Response:
    if not auth.csrf_ok(request, csrf):
        return redirect(request, "/admin/workers?notice=bad_csrf")
    move = worker_drain.drain_worker if drain else worker_drain.undrain_worker
    try:
        move(session, admin, worker_id)
    except APIError as exc:
        session.rollback()
        return _workers_page(
            request,
            admin,
            session,
            settings,
            status_code=exc.status_code,
            refused=(worker_id, exc.message),
        )
    return redirect(request, f"/admin/workers?notice=worker_{'drained' if drain else 'undrained'}")


@router.post("/workers/{worker_id}/drain")
def drain_worker(
    request: Request,
    worker_id: str,
    admin: SignedInAdmin,
    session: SessionDep,
    settings: SettingsDep,
    csrf: Text = "",
) -> Response:
    """worker_drain.drain_worker, as POST /v1/admin/workers/{id}/drain."""
    return _drain(request, admin, session, settings, worker_id, csrf, drain=True)


@router.post("/workers/{worker_id}/undrain")
def undrain_worker(
    request: Request,
    worker_id: str,
    admin: SignedInAdmin,
    session: SessionDep,
    settings: SettingsDep,
    csrf: Text = "",
) -> Response:
    """worker_drain.undrain_worker, as POST /v1/admin/workers/{id}/undrain."""
    return _drain(request, admin, session, settings, worker_id, csrf, drain=False)


# --- the queue and the audit log -----------------------------------------------------------


@router.get("/queue")
def queue_page(
    request: Request, admin: SignedInAdmin, session: SessionDep, settings: SettingsDep
) -> Response:
    return _page(request, "admin_queue.html", admin, queue=whole_queue(session, settings))


@router.get("/audit")
def audit_page(
    request: Request, admin: SignedInAdmin, session: SessionDep, after: str | None = None
) -> Response:
    try:
        entries, has_more = audit.list_entries(session, AUDIT_PER_PAGE, after or None)
    except APIError:  # a cursor that is no entry's id: the first page
        entries, has_more = audit.list_entries(session, AUDIT_PER_PAGE, None)
    return _page(
        request,
        "admin_audit.html",
        admin,
        entries=[(e, json.dumps(e.details, sort_keys=True) if e.details else "") for e in entries],
        has_more=has_more,
        first=not after,
        per_page=AUDIT_PER_PAGE,
    )
