"""Times, durations and numbers as text for people: one set for the dashboard (app/web) and
the `lathe` command (app/client).

Plain functions over the standard library, so the client keeps its small import footprint
(no FastAPI, no Jinja2) and the dashboard needs no Rich. Each takes the text it shows for a
missing value: the dashboard writes an em dash, a terminal a hyphen.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

MISSING = "-"


def when(epoch: float | None, *, utc: bool = False, missing: str = MISSING) -> str:
    """A moment to the minute in the reader's time zone; with `utc`, to the second in UTC
    and saying so (the server that renders a page does not know the reader's zone)."""
    if not epoch:
        return missing
    if utc:
        return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def clock(epoch: float | None) -> str:
    """The time of day of a moment (a log line's prefix)."""
    return time.strftime("%H:%M:%S", time.localtime(epoch)) if epoch else "--:--:--"


def relative(epoch: float | None, *, now: float | None = None) -> str:
    """How far a moment is from now: "in 5 min", "2.5 h ago"; empty when unknown."""
    if not epoch:
        return ""
    delta = epoch - (time.time() if now is None else now)
    seconds = abs(delta)
    if seconds < 60:
        text = f"{seconds:.0f} s"
    elif seconds < 3600:
        text = f"{seconds / 60:.0f} min"
    elif seconds < 86400:
        text = f"{seconds / 3600:.1f} h"
    else:
        text = f"{seconds / 86400:.1f} days"
    return f"in {text}" if delta >= 0 else f"{text} ago"


def duration(seconds: float | None, *, missing: str = MISSING) -> str:
    """A length of time to the second: "1h 05m", "3m 07s", "42s"."""
    if seconds is None:
        return missing
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def number(value: object, digits: int = 4, *, missing: str = MISSING) -> str:
    """A number for reading, not for parsing back: whole numbers in full with thousands
    separators; others to `digits` significant digits, but never in exponent form for a
    large one (12,345 tokens/s, not 1.234e+04)."""
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"
    return str(value)


def size(n: float | None, *, missing: str = MISSING) -> str:
    """A byte count in decimal units: "512 B", "2.3 MB"."""
    if n is None:
        return missing
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def option_text(value: object, *, missing: str = MISSING) -> str:
    """A job option as it was given: lists joined, a dict as key=value pairs, booleans as
    JSON writes them."""
    if value is None:
        return missing
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ", ".join(option_text(v, missing=missing) for v in value) or missing
    if isinstance(value, dict):
        return ", ".join(f"{k}={option_text(v, missing=missing)}" for k, v in value.items()) or (
            missing
        )
    return str(value)
