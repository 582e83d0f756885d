"""Client commands outside the groups: login, workers, usage; and what app/cli.py adds."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from app.client.config import Target, config_path, load_config, save_config
from app.client.files import files_app
from app.client.http import APIError, LatheClient, handles_errors
from app.client.jobs import jobs_app
from app.client.options import ApiKey, ApiUrl, Json
from app.client.render import WORKER_STYLE, make_console, print_json
from app.formatting import duration, when

__all__ = ["files_app", "jobs_app", "login", "usage", "workers"]


@handles_errors
def login(
    api_url: Annotated[
        str | None,
        typer.Option("--api-url", help="Server, e.g. http://localhost:8000.", show_default=False),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Team API key.", show_default=False)
    ] = None,
) -> None:
    """Save the server URL and team key (checked first) for later commands.

    Missing values are prompted for. The file is $XDG_CONFIG_HOME/lathe/config.toml
    (~/.config/lathe/config.toml), readable by you only; LATHE_API_URL, LATHE_API_KEY and
    --api-url/--api-key on a command override it."""
    console = make_console(stderr=True)
    stored = load_config()
    if not api_url:
        default = (
            os.environ.get("LATHE_API_URL") or stored.get("api_url") or "http://localhost:8000"
        )
        api_url = typer.prompt("Server URL", default=default)
    if not api_key:
        api_key = typer.prompt("API key", hide_input=True)
    api_url = api_url.strip().rstrip("/")
    api_key = api_key.strip()
    with LatheClient(Target(api_url, api_key)) as client:
        client.get("/v1/models")  # a bad key or URL ends here; nothing is saved
        try:
            team = client.get("/v1/usage").get("team")
        except APIError:
            team = None
    path = save_config({"api_url": api_url, "api_key": api_key}, config_path())
    who = f" as team [bold]{escape(str(team))}[/]" if team else ""
    console.print(f"[green]logged in[/] to {escape(api_url)}{who}; saved to {escape(str(path))}")


@handles_errors
def workers(json_: Json = False, api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """The pool's GPU workers: class, GPUs, memory, status, and your job on each."""
    with LatheClient.from_options(api_url, api_key) as client:
        page = client.get("/v1/workers")
    if json_:
        print_json(page)
        return
    table = Table(
        "worker", "GPU class", "GPU", "GPUs", "memory", "status", "job", "jobs done", "last seen"
    )
    for w in page["data"]:
        job = w.get("current_job") or ("busy" if w.get("busy") else "-")
        status = WORKER_STYLE.get(w["status"], "white")
        table.add_row(
            w["id"],
            w["gpu_class"],
            w.get("gpu_name") or "-",
            str(w.get("gpus") or 1),
            f"{w['memory_gb']:g} GB" if w.get("memory_gb") is not None else "-",
            f"[{status}]{w['status']}[/]",
            job,
            str(w.get("jobs_done", "-")),
            when(w.get("last_seen")),
        )
    make_console().print(table if page["data"] else "no workers")


@handles_errors
def usage(
    period: Annotated[
        str | None, typer.Option(help="A month, YYYY-MM (default: this month, UTC).")
    ] = None,
    json_: Json = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Your team's metered GPU time for a month, by GPU class."""
    with LatheClient.from_options(api_url, api_key) as client:
        report = client.get("/v1/usage", period=period)
    if json_:
        print_json(report)
        return
    quota = report.get("gpu_hours_quota")
    table = Table(title=f"GPU usage of {report.get('team')} in {report.get('period')}")
    table.add_column("GPU class")
    table.add_column("GPU hours", justify="right")
    for gpu_class, seconds in sorted((report.get("by_gpu_class") or {}).items()):
        table.add_row(gpu_class, f"{seconds / 3600:.3f}")
    table.add_section()
    table.add_row("[bold]total[/]", f"[bold]{report.get('gpu_hours', 0):.3f}[/]")
    console = make_console()
    console.print(table)
    console.print(
        f"{report.get('jobs', 0)} jobs, {duration(report.get('gpu_seconds'))} of GPU time"
        + (f"; quota {quota:g} GPU hours a month" if quota is not None else "")
    )
