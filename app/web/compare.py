"""The compare page, `/compare?job=<id>&job=<id>...`: two to eight of the team's jobs, their
losses overlaid on one chart (and DPO's reward accuracy), the options that differ and their
final figures side by side. The job list's checkboxes are a GET form to it, so it works
without JavaScript and a comparison is a link one can share with the team.

Each job is read through app.services.jobs.get_job, the API's own scoping: an id that is not
the signed-in team's job is the 404 page naming it, whichever of the ids it is. Only the
compared jobs' metrics are read (one query each), never the team's other jobs'.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from app.domain.jobs import ACTIVE_STATES
from app.http_deps import SessionDep
from app.services.training_metrics import metrics_rows
from app.web.chart import JOB_STYLES, Run, compare_loss_chart, compare_reward_accuracy_chart
from app.web.comparison import figures, option_rows
from app.web.deps import SignedInTeam, find_team_job
from app.web.pages import render

MIN_JOBS, MAX_JOBS = 2, JOB_STYLES  # a colour each on the chart
REFRESH_SECONDS = 10

router = APIRouter(include_in_schema=False)


def _label(job_id: str, suffix: str | None) -> str:
    return f"{job_id} · {suffix}" if suffix else job_id


@router.get("/compare")
def compare_page(
    request: Request,
    team: SignedInTeam,
    session: SessionDep,
    job: Annotated[list[str] | None, Query()] = None,
) -> Response:
    ids = list(dict.fromkeys(j.strip() for j in job or [] if j.strip()))  # once each, in order
    if not MIN_JOBS <= len(ids) <= MAX_JOBS:
        few = len(ids) < MIN_JOBS
        message = (
            f"Select at least {MIN_JOBS} jobs to compare ({len(ids)} selected)."
            if few
            else f"At most {MAX_JOBS} jobs can be compared at once ({len(ids)} selected)."
        )
        return render(request, "compare.html", 400, team=team, message=message)
    jobs = [find_team_job(session, team, job_id) for job_id in ids]
    rows = [metrics_rows(session, j.pk) for j in jobs]
    runs = [Run(j.id, _label(j.id, j.suffix), r) for j, r in zip(jobs, rows, strict=True)]
    differing, same = option_rows(jobs)
    return render(
        request,
        "compare.html",
        team=team,
        message=None,
        jobs=jobs,
        figures=[figures(j, r) for j, r in zip(jobs, rows, strict=True)],
        chart=compare_loss_chart(runs),
        reward_accuracy=compare_reward_accuracy_chart(runs),
        differing=differing,
        same=same,
        refresh=REFRESH_SECONDS if any(j.status in ACTIVE_STATES for j in jobs) else None,
    )
