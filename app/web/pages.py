"""How a dashboard page is answered: the Jinja2 environment and its filters, the HTML
response with its security headers, redirects, and the handlers that turn the dependencies'
SignInRequired and PageNotFound (app.web.deps) into the sign-in redirect and the 404 page.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader

from app import formatting
from app.models import Team
from app.web import auth
from app.web.deps import PageNotFound, SignInRequired

HERE = Path(__file__).resolve().parent
DASH = "—"  # a missing value on a page
# Fixed texts for ?notice=: a redirect names one, the page never echoes the query string.
NOTICES = {
    "cancelled": ("ok", "The job was cancelled."),
    "not_cancellable": ("error", "The job has already ended; it cannot be cancelled."),
    "bad_csrf": ("error", "The form had expired; reload the page and try again."),
    "export_created": ("ok", "The export is queued; its files are listed below once it succeeds."),
    "export_cancelled": ("ok", "The export was cancelled."),
    "file_deleted": ("ok", "The file was deleted."),
    "export_not_cancellable": ("error", "The export has already ended; it cannot be cancelled."),
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


def _fixed(value: object, decimals: int = 3) -> str:
    """A score (accuracy, precision, F1) to a fixed number of decimals, so a column of
    them lines up: 1.000 and 0.250, not 1 and 0.25."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return DASH
    return f"{value:.{decimals}f}"


_env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every template, whatever its name: all data is text
    trim_blocks=True,
    lstrip_blocks=True,
)
# The server does not know the reader's time zone: moments are shown in UTC, and say so.
_env.filters.update(
    ts=partial(formatting.when, utc=True, missing=DASH),
    relative=formatting.relative,
    num=partial(formatting.number, missing=DASH),
    duration=partial(formatting.duration, missing=DASH),
    value=partial(formatting.option_text, missing=DASH),
    fixed=_fixed,
    size=partial(formatting.size, missing=DASH),
)


def base_path(request: Request) -> str:
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
        base=base_path(request),
        team=team,
        csrf=auth.csrf_token(key) if key else "",
        page=template.removesuffix(".html"),
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=HEADERS)


def redirect(request: Request, path: str) -> RedirectResponse:
    return RedirectResponse(base_path(request) + path, status_code=303, headers=HEADERS)


def notice(request: Request) -> tuple[str, str] | None:
    return NOTICES.get(request.query_params.get("notice", ""))


def _to_sign_in(request: Request, _: Exception) -> RedirectResponse:
    """To the sign-in page, and back to this page after."""
    path = request.url.path
    base = base_path(request)
    if base and path.startswith(base):
        path = path[len(base) :]
    if request.url.query:
        path += "?" + request.url.query
    return redirect(request, "/login?next=" + quote(auth.safe_next(path), safe="/"))


def _not_found(request: Request, exc: Exception) -> HTMLResponse:
    assert isinstance(exc, PageNotFound)
    return render(request, "error.html", 404, exc.team, title="Not found", message=exc.message)


def install_page_handlers(app: FastAPI) -> None:
    """The dashboard's answers to its dependencies' refusals (app.web.deps)."""
    app.add_exception_handler(SignInRequired, _to_sign_in)
    app.add_exception_handler(PageNotFound, _not_found)
