"""Formatting for people (Rich) and for scripts (--json)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from rich.console import Console

STATUS_STYLE = {
    "validating_files": "cyan",
    "queued": "cyan",
    "running": "blue",
    "paused": "yellow",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}
LEVEL_STYLE = {"warn": "yellow", "warning": "yellow", "error": "red"}


def make_console(stderr: bool = False) -> Console:
    """A console for people. Piped into a file or another program, lines are not cut at
    80 columns (ids must stay whole), unless COLUMNS says otherwise."""
    # No automatic highlighting: it colours parts of ids and model names at random.
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, highlight=False, width=200)
    return console


def print_json(value: Any) -> None:
    """Raw JSON on stdout, for scripts: no colours, no wrapping."""
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


def status_text(status: str | None) -> str:
    if not status:
        return "-"
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "--:--:--"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def count(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.1f}"


def number(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)
