"""The dashboard's FastAPI dependencies: the signed-in team and the team's job, or the
signed-in administrator, each loaded and checked once per request.

A page that needs a team declares `team: SignedInTeam`; without a valid session cookie the
dependency raises SignInRequired, which app.web.pages turns into a redirect to the sign-in
page (and back after). `job: TeamJob` adds the job of the path's {job_id}, or a 404 page
when the team has no such job, just as the API scopes a Bearer key. The admin pages
declare `admin: SignedInAdmin`: the cookie's admin key (app.services.admin_keys), checked
as the admin API checks its Bearer header; a team's session gets the 404 page there.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.errors import APIError
from app.http_deps import SessionDep
from app.logs import bind
from app.models import AdminKey, Job, Team
from app.services import jobs as jobs_service
from app.services.admin_keys import admin_for_key
from app.services.teams import team_for_key
from app.web.auth import cookie_key

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SHOWN_ID_CHARS = 80  # of text that is no job id, in the 404 page's message


class SignInRequired(Exception):
    """No team is signed in: the page redirects to the sign-in page."""


class PageNotFound(Exception):
    """A 404 page for the signed-in team, saying what was not found."""

    def __init__(self, team: Team, message: str) -> None:
        super().__init__(message)
        self.team = team
        self.message = message


def cookie_team(request: Request, session: SessionDep) -> Team | None:
    """The team whose key the cookie holds, or None (no cookie, unknown or revoked key,
    disabled team)."""
    key = cookie_key(request)
    if key is None:
        return None
    team = team_for_key(session, key)
    if team is None or team.disabled:
        return None
    bind(team_id=team.id)  # on this request's log lines, as for the API (app/logs.py)
    session.commit()  # as app.api.deps.current_team: the lookup's connection goes back at once
    return team


MaybeTeam = Annotated[Team | None, Depends(cookie_team)]


def signed_in_team(team: MaybeTeam) -> Team:
    if team is None:
        raise SignInRequired
    return team


SignedInTeam = Annotated[Team, Depends(signed_in_team)]


def checked_job_id(job_id: str, team: SignedInTeam) -> str:
    """The path's job id, when it could be one (so no odd text reaches a query or a URL)."""
    if not JOB_ID.match(job_id):
        raise PageNotFound(team, "No such fine-tuning job.")
    return job_id


JobId = Annotated[str, Depends(checked_job_id)]


def job_not_found(team: Team, job_id: str) -> PageNotFound:
    """The 404 page for a job the signed-in team does not have."""
    return PageNotFound(team, f"No fine-tuning job {job_id} in team {team.name}.")


def find_team_job(session: Session, team: Team, job_id: str) -> Job:
    """The team's job `job_id`, else the 404 page naming it; text that cannot be an id
    reaches no query, and the page shows only its first SHOWN_ID_CHARS characters."""
    if not JOB_ID.match(job_id):
        raise job_not_found(team, job_id[:SHOWN_ID_CHARS])
    try:
        return jobs_service.get_job(session, team, job_id)
    except APIError:
        raise job_not_found(team, job_id) from None


def team_job(job_id: JobId, team: SignedInTeam, session: SessionDep) -> Job:
    return find_team_job(session, team, job_id)


TeamJob = Annotated[Job, Depends(team_job)]


def cookie_admin(request: Request, session: SessionDep) -> AdminKey | None:
    """The unrevoked admin key the cookie holds, or None (no cookie, a team's key, an
    unknown or revoked admin key)."""
    key = cookie_key(request)
    if key is None:
        return None
    admin = admin_for_key(session, key)
    session.commit()  # as cookie_team: the lookup's connection goes back at once
    return admin


MaybeAdmin = Annotated[AdminKey | None, Depends(cookie_admin)]


def signed_in_admin(request: Request, session: SessionDep, admin: MaybeAdmin) -> AdminKey:
    """The admin pages' session. A team's session gets the 404 page (its own, with the
    team's navigation): an admin page is not there for a team, as /v1/admin refuses a team
    key. No session at all: the sign-in redirect, and back after."""
    if admin is not None:
        return admin
    team = cookie_team(request, session)
    if team is not None:
        raise PageNotFound(team, "No such page.")
    raise SignInRequired


SignedInAdmin = Annotated[AdminKey, Depends(signed_in_admin)]
