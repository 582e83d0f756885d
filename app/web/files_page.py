"""`/files`: the team's files (format, size, examples, token counts where a job measured
them, the jobs that used them) and their delete button, which the file service refuses
while an unfinished job needs the file."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.errors import APIError, NotFound
from app.http_deps import SessionDep, StoreDep
from app.models import File, Job, Team
from app.services import files as files_service
from app.web import auth
from app.web.deps import PageNotFound, SignedInTeam
from app.web.pages import notice, redirect, render

router = APIRouter(include_in_schema=False)
FILES_PER_PAGE = 100
JOBS_SHOWN = 10  # per file; the rest are counted


@dataclass
class FileUse:
    """The jobs that name a file, newest first, and the tokens the newest that measured it
    counted (stats.tokens: per epoch, with the job's tokenizer and max_seq_length)."""

    jobs: list[tuple[str, str, str]] = field(default_factory=list)  # (id, status, role)
    more: int = 0
    tokens: int | None = None
    tokens_job: str | None = None


def file_uses(session: Session, team: Team, files: list[File]) -> dict[str, FileUse]:
    ids = [f.id for f in files]
    uses: dict[str, FileUse] = defaultdict(FileUse)
    if not ids:
        return uses
    rows = session.execute(
        select(Job.id, Job.status, Job.training_file, Job.validation_file, Job.stats)
        .where(
            Job.team_pk == team.pk,
            or_(Job.training_file.in_(ids), Job.validation_file.in_(ids)),
        )
        .order_by(Job.pk.desc())
    )
    for job_id, status, training, validation, stats in rows:
        tokens = stats.get("tokens") if isinstance(stats, dict) else None
        for file_id, role, key in (
            (training, "training", "train"),
            (validation, "validation", "valid"),
        ):
            if file_id not in ids:
                continue
            use = uses[file_id]
            if len(use.jobs) < JOBS_SHOWN:
                use.jobs.append((job_id, status, role))
            else:
                use.more += 1
            counted = tokens.get(key) if isinstance(tokens, dict) else None
            if use.tokens is None and isinstance(counted, dict) and counted.get("tokens"):
                use.tokens, use.tokens_job = int(counted["tokens"]), job_id
    return uses


def _files_page(
    request: Request,
    team: Team,
    session: Session,
    after: str | None,
    *,
    status_code: int = 200,
    error: str | None = None,
) -> Response:
    try:
        files, has_more = files_service.list_files(session, team, None, FILES_PER_PAGE, after)
    except APIError:
        files, has_more = files_service.list_files(session, team, None, FILES_PER_PAGE, None)
    return render(
        request,
        "files.html",
        status_code,
        team=team,
        files=files,
        uses=file_uses(session, team, files),
        has_more=has_more,
        error=error,
        notice=notice(request),
    )


@router.get("/files")
def files_page(
    request: Request, team: SignedInTeam, session: SessionDep, after: str | None = None
) -> Response:
    return _files_page(request, team, session, after or None)


@router.post("/files/{file_id}/delete")
def delete_file(
    request: Request,
    team: SignedInTeam,
    file_id: str,
    session: SessionDep,
    store: StoreDep,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    """Delete through the file service, as DELETE /v1/files/{id} does; its refusal (the
    file is in use by an unfinished job) is the files page with its message."""
    if not auth.csrf_ok(request, csrf):
        return redirect(request, "/files?notice=bad_csrf")
    try:
        files_service.delete_file(session, store, team, file_id)
    except NotFound:
        raise PageNotFound(team, f"No file {file_id} in team {team.name}.") from None
    except APIError as exc:
        session.rollback()
        return _files_page(
            request, team, session, None, status_code=exc.status_code, error=exc.message
        )
    return redirect(request, "/files?notice=file_deleted")
