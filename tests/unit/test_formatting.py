"""app/formatting.py: the one set of text formats the dashboard and the CLI share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.formatting import duration, number, option_text, relative, size, when

REPO = Path(__file__).resolve().parents[2]


def test_numbers_are_whole_with_separators_or_to_significant_digits() -> None:
    assert number(1234567) == "1,234,567"
    assert number(0.123456) == "0.1235"
    assert number(2.0, 5) == "2"
    assert number(12345.678) == "12,346"  # never 1.235e+04
    assert number(float("nan")) == "nan"
    assert number(True) == "yes"
    assert number(None) == "-" and number(None, missing="—") == "—"


def test_durations_are_to_the_second() -> None:
    assert duration(42.4) == "42s"
    assert duration(187) == "3m 07s"
    assert duration(3900) == "1h 05m"
    assert duration(None, missing="—") == "—"


def test_moments_in_utc_say_so_and_relative_ones_say_which_way() -> None:
    assert when(86400 + 61, utc=True) == "1970-01-02 00:01:01 UTC"
    assert when(None) == "-" and when(0, missing="—") == "—"
    assert relative(1000 + 300, now=1000) == "in 5 min"
    assert relative(1000 - 9000, now=1000) == "2.5 h ago"
    assert relative(None) == ""


def test_sizes_and_job_options() -> None:
    assert size(512) == "512 B" and size(2_300_000) == "2.3 MB"
    assert option_text(["q_proj", "v_proj"]) == "q_proj, v_proj"
    assert option_text({"r": 8, "packing": True}) == "r=8, packing=true"
    assert option_text([], missing="—") == "—"


def test_the_formats_load_without_a_web_framework() -> None:
    """The CLI imports them: they must not pull FastAPI, Jinja2, Rich or SQLAlchemy in."""
    loaded = subprocess.check_output(
        [sys.executable, "-c", "import sys, app.formatting; print(*sys.modules)"],
        cwd=REPO,
        text=True,
        timeout=60,
    ).split()
    assert not {"fastapi", "jinja2", "rich", "sqlalchemy"} & set(loaded)
