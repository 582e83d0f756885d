"""Dashboard sign-in: a team API key (or an admin key, for the admin pages), kept in an
HttpOnly, SameSite=Strict cookie.

The cookie holds the key itself and every page checks it the way the API checks a Bearer
header (app.services.teams.team_for_key: the SHA-256 digest looked up, compared in
constant time, revoked keys refused; a disabled team is refused too). So there is no
server-side session to store or expire, a revoked key or a disabled team ends the session
on the next page, and API replicas need no shared secret. See docs/dashboard.md.
An admin key is kept and checked the same way (app.services.admin_keys.admin_for_key),
and its CSRF token is derived from it as a team key's is from that key.
The pages get the team or the admin key itself through app.web.deps.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from fastapi import Request, Response

COOKIE = "lathe_dashboard"
COOKIE_MAX_AGE = 12 * 3600  # the browser forgets the key after 12 h (or on logout)
MAX_KEY_CHARS = 200
ADMIN_HOME = "/admin/teams"
_NEXT = re.compile(r"^/(?![/\\])[A-Za-z0-9_\-./?=&%]*$")


def cookie_key(request: Request) -> str | None:
    key = (request.cookies.get(COOKIE) or "").strip()
    return key if 0 < len(key) <= MAX_KEY_CHARS else None


def set_session_cookie(request: Request, response: Response, key: str) -> None:
    response.set_cookie(
        COOKIE,
        key,
        max_age=COOKIE_MAX_AGE,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_session_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(
        COOKIE,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def csrf_token(key: str) -> str:
    """A token for the dashboard's POST forms: an HMAC of a constant under the session's
    key. A page of the dashboard can show it; another site can neither read nor forge it
    (and SameSite=Strict already keeps the cookie off cross-site requests)."""
    return hmac.new(key.encode(), b"lathe-dashboard-csrf", hashlib.sha256).hexdigest()[:40]


def csrf_ok(request: Request, submitted: str) -> bool:
    key = cookie_key(request)
    return key is not None and hmac.compare_digest(csrf_token(key), submitted or "")


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this site only (never `//host` or a URL)."""
    if target and len(target) <= 500 and _NEXT.match(target) and not target.startswith("/login"):
        return target
    return "/jobs"


def safe_admin_next(target: str | None) -> str:
    """Where an administrator goes after signing in: an admin page asked for, else the
    teams page (the team pages are not theirs)."""
    path = safe_next(target)
    return path if path == "/admin" or path.startswith("/admin/") else ADMIN_HOME
