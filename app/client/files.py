"""`lathe files`: upload and download (with a progress bar; a download resumes) and list."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from app.client.downloads import download_file, part_path
from app.client.http import ClientError, LatheClient, handles_errors
from app.client.options import ApiKey, ApiUrl, Json
from app.client.render import make_console, print_json
from app.formatting import size, when

files_app = typer.Typer(help="Upload, list and download files.", no_args_is_help=True)


class _ProgressReader:
    """A file that advances a progress bar as httpx reads it for the multipart body, so
    the upload streams from disk in chunks and the bar follows the bytes sent."""

    def __init__(self, fh: Any, progress: Progress, task: Any, name: str) -> None:
        self._fh, self._progress, self._task, self._name = fh, progress, task, name

    def read(self, n: int = -1) -> bytes:
        chunk = self._fh.read(n)
        if chunk:
            self._progress.advance(self._task, len(chunk))
        else:  # all sent: the server validates the lines before it answers
            self._progress.update(self._task, description=f"validating {self._name}")
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self._fh.seek(offset, whence)
        self._progress.update(self._task, completed=position)
        return position

    def tell(self) -> int:
        return self._fh.tell()

    def fileno(self) -> int:  # lets httpx size the body (Content-Length, not chunked)
        return self._fh.fileno()


def transfer_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # no bar in a log file
    )


def upload_file(client: LatheClient, path: Path, console: Console) -> dict:
    """POST /v1/files with a progress bar; the file object. A bad line is the API's 400."""
    if not path.is_file():
        raise ClientError(f"no such file: {path}")
    total = path.stat().st_size
    with path.open("rb") as fh, transfer_progress(console) as progress:
        task = progress.add_task(f"uploading {path.name}", total=total)
        return client.request(
            "POST",
            "/v1/files",
            data={"purpose": "fine-tune"},
            files={"file": (path.name, _ProgressReader(fh, progress, task, path.name))},
        ).json()


def describe_upload(record: dict, console: Console) -> None:
    console.print(
        f"[green]uploaded[/] {escape(record['filename'])} as [bold]{escape(record['id'])}[/] "
        f"({size(record['bytes'])}, {record['status']})"
    )


@files_app.command("upload")
@handles_errors
def upload(
    path: Annotated[Path, typer.Argument(help="A JSONL dataset (see docs/datasets.md).")],
    json_: Json = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Upload a JSONL dataset. It is validated on the way: a bad line is refused with its
    line number, and nothing is stored."""
    console = make_console(stderr=json_)
    with LatheClient.from_options(api_url, api_key) as client:
        record = upload_file(client, path, console)
    if json_:
        print_json(record)
    else:
        describe_upload(record, console)


@files_app.command("list")
@handles_errors
def list_files(
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
    json_: Json = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """The team's files, newest first."""
    with LatheClient.from_options(api_url, api_key) as client:
        page = client.get("/v1/files", limit=limit)
    if json_:
        print_json(page)
        return
    table = Table("id", "filename", "purpose", "size", "status", "created")
    for f in page["data"]:
        table.add_row(
            f["id"],
            f["filename"],
            f["purpose"],
            size(f["bytes"]),
            f["status"],
            when(f["created_at"]),
        )
    make_console().print(table if page["data"] else "no files")


@files_app.command("download")
@handles_errors
def download(
    file_id: Annotated[str, typer.Argument(metavar="FILE_ID")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where to save it (default: ./ the file's name)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Download a file with a progress bar. An interrupted download leaves OUTPUT.part:
    the same command continues it from there, and the whole is checked against the file's
    SHA-256 before it is named OUTPUT. Prints the path."""
    console = make_console(stderr=True)
    with LatheClient.from_options(api_url, api_key) as client:
        record = client.get(f"/v1/files/{file_id}")
        target = output or Path(Path(record["filename"]).name)
        if target.is_dir():
            target = target / Path(record["filename"]).name
        if target.exists() and not force:
            raise ClientError(f"{target} exists (--force to replace it)")
        resuming = part_path(target).is_file()
        with transfer_progress(console) as progress:
            download_file(client, record, target, progress)
    verb = "resumed and checked" if resuming else "downloaded and checked"
    console.print(f"[green]{verb}[/] {escape(record['id'])} ({size(record['bytes'])})")
    print(target)
