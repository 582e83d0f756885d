"""The web dashboard served at `/`: sign in with a team API key, see the team's jobs (loss
chart, events, checkpoints, queue place), cancel one, download its adapter; the pool and
the team's usage; launch a job, manage files. Server-rendered Jinja2 templates, one
stylesheet, and one optional script (the launch form's upload progress).

`app.web.router` is included by app.main.create_app, with `install_page_handlers` (the
sign-in redirect and the 404 page its dependencies raise); see docs/dashboard.md.
"""

from app.web import admin_pages, compare, files_page, launch
from app.web.pages import install_page_handlers
from app.web.views import router

router.include_router(admin_pages.router)
router.include_router(compare.router)
router.include_router(files_page.router)
router.include_router(launch.router)
router.routes.insert(0, router.routes.pop())  # /jobs/new before views' /jobs/{job_id}

__all__ = ["install_page_handlers", "router"]
