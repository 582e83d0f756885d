"""The admin team form read into what app.services.team_admin.update_team takes.

Only the fields the administrator changed are passed on, so the audit entry says what
changed and a form sent back untouched is no change at all (the service records none).
Text that is not a number is passed on as it is: the service refuses it in the same words
as the admin API (the rules live there, not here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.models import Team
from app.services.team_admin import QUOTA_FIELDS

TEAM_FORM_FIELDS = ("weight", *QUOTA_FIELDS, "disabled", "preemptible")


def number(text: str) -> int | float | str:
    """ "3" -> 3, "2.5" -> 2.5, "1e3" -> 1000.0; anything else unchanged, for the service
    to refuse."""
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def team_changes(team: Team, form: Mapping[str, str]) -> dict[str, Any]:
    """The form's fields that differ from the team's own settings. A quota left blank is
    the deployment default (None); an unticked box is false."""
    changes: dict[str, Any] = {}
    weight = number(form.get("weight", ""))
    if weight != team.weight:
        changes["weight"] = weight
    for name in QUOTA_FIELDS:
        text = form.get(name, "").strip()
        value = number(text) if text else None
        if value != getattr(team, name):
            changes[name] = value
    current = {"disabled": bool(team.disabled), "preemptible": team.preemptible is not False}
    for flag, now in current.items():
        ticked = form.get(flag) == "on"
        if ticked != now:
            changes[flag] = ticked
    return changes


def _plain(value: object) -> str:
    """A setting as the form shows it for editing: 2.0 as "2", no thousands separators."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def team_form(team: Team) -> dict[str, str]:
    """The team's own settings as the form's fields (a blank quota: the default)."""
    values = {name: _plain(getattr(team, name)) for name in ("weight", *QUOTA_FIELDS)}
    values["disabled"] = "on" if team.disabled else ""
    values["preemptible"] = "on" if team.preemptible is not False else ""
    return values
