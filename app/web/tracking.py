"""The job page's experiment trackers: each integration the job was created with (W&B,
MLflow), what it logs to, and the run's URL once the worker has started the run.

The URL comes from the worker (`stats.tracking`, what the tracker's client answered), so it
is data like any other: a link is made only of an http(s) URL with a host and nothing odd
in it; anything else is shown as text. Autoescaping keeps it inside its attribute either way,
but a `javascript:` or `data:` URL would still run or load something when clicked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

NAMES = {"wandb": "Weights & Biases", "mlflow": "MLflow"}
MAX_URL = 2048
_NOT_IN_A_LINK = set('"<>\\^`{|}')


@dataclass(frozen=True)
class Tracker:
    kind: str  # the integration's type: "wandb", "mlflow"
    name: str  # as shown
    target: str | None  # where it logs: W&B entity/project, MLflow experiment
    run_name: str | None
    url: str | None  # the run's page as reported
    link: str | None  # the same URL when it is safe to link to, else None


def link_target(url: object) -> str | None:
    """`url` if it is an absolute http or https URL with a host, no credentials, and no
    spaces, controls or characters a URL must escape; otherwise None."""
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL:
        return None
    if any(ord(c) <= 0x20 or ord(c) == 0x7F or c in _NOT_IN_A_LINK for c in url):
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # a malformed IPv6 host, a bad port
        return None
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        return None
    return url


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _target(kind: str, options: dict) -> str | None:
    if kind == "wandb":
        project, entity = _text(options.get("project")), _text(options.get("entity"))
        return f"{entity}/{project}" if entity and project else project
    if kind == "mlflow":
        return _text(options.get("experiment"))
    return None


def trackers_view(integrations: Any, stats: dict) -> list[Tracker]:
    """The job's integrations (OpenAI's shape: {"type": "wandb", "wandb": {...}}) with the
    run URL the worker reported for each in `stats["tracking"]` (or on the entry itself)."""
    tracking = stats.get("tracking") if isinstance(stats.get("tracking"), dict) else {}
    shown: list[Tracker] = []
    kinds: set[str] = set()
    entries = [e for e in integrations or [] if isinstance(e, dict)]
    # A run reported without its integration in the list (older data) is still shown.
    entries += [{"type": k} for k in tracking if k not in {e.get("type") for e in entries}]
    for entry in entries:
        kind = entry.get("type")
        if not isinstance(kind, str) or kind in kinds:
            continue
        kinds.add(kind)
        options = entry.get(kind) if isinstance(entry.get(kind), dict) else {}
        run = tracking.get(kind) if isinstance(tracking.get(kind), dict) else {}
        url = _text(run.get("url")) or _text(entry.get("url"))
        shown.append(
            Tracker(
                kind=kind,
                name=NAMES.get(kind, kind),
                target=_target(kind, options),
                run_name=_text(options.get("name")) or _text(options.get("run_name")),
                url=url,
                link=link_target(url),
            )
        )
    return shown
