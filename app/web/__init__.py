"""The web dashboard served at `/`: sign in with a team API key, see the team's jobs (loss
chart, events, checkpoints, queue place), cancel one, download its adapter; the pool and
the team's usage; launch a job, manage files. Server-rendered Jinja2 templates, one
stylesheet, and one optional script (the launch form's upload progress).

`app.web.router` is included by app.main.create_app, with `install_page_handlers` (the
sign-in redirect and the 404 page its dependencies raise); see docs/dashboard.md.
"""

from fastapi import APIRouter

from app.web import admin_pages, compare, files_page, launch, views
from app.web.pages import install_page_handlers

router = APIRouter(include_in_schema=False)
# Routes match in order: the launch form's /jobs/new before the views' /jobs/{job_id}.
for part in (launch, views, compare, files_page, admin_pages):
    router.include_router(part.router)

__all__ = ["install_page_handlers", "router"]
