"""`lathe jobs export`, `exports`, `export-download` and `export-cancel`: a fine-tuned model
written out as merged 16-bit weights or GGUF by the pool (POST /v1/fine_tuning/jobs/{id}/
exports), followed until it ends, and its files downloaded into one directory: a Hugging
Face folder, or the .gguf with its Ollama Modelfile. Registered on `lathe jobs` by
app/client/jobs.py; what they draw is in app/client/render.py."""

from __future__ import annotations

import hashlib
import time
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from app.client.downloads import READ_CHUNK, download_file
from app.client.files import transfer_progress
from app.client.http import (
    EXIT_API_ERROR,
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_OK,
    APIError,
    ClientError,
    LatheClient,
    Unreachable,
)
from app.client.options import ApiKey, ApiUrl, Json
from app.client.render import (
    export_options_text,
    export_size_text,
    export_table,
    exports_table,
    make_console,
    print_json,
    status_text,
)
from app.client.watch import event_line
from app.domain.byte_ranges import etag_digest
from app.domain.jobs import FINAL_STATES, JobStatus
from app.formatting import duration

POLL_SECONDS = 3.0
MAX_POLL_FAILURES = 8  # as `jobs watch` gives up after 8 failed connects in a row
EVENTS_PER_POLL = 100
EXPORT_EXIT_CODES = {
    JobStatus.SUCCEEDED: EXIT_OK,
    JobStatus.FAILED: EXIT_FAILED,
    JobStatus.CANCELLED: EXIT_CANCELLED,
}
FINAL = {s.value for s in FINAL_STATES}


class ExportFormat(StrEnum):
    MERGED = "merged"
    GGUF = "gguf"


class Dtype(StrEnum):
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Quantization(StrEnum):
    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_K_M = "q4_k_m"


class BaseWeights(StrEnum):
    NF4 = "nf4"
    ORIGINAL = "original"


JobArg = Annotated[str, typer.Argument(metavar="JOB_ID")]
ExportArg = Annotated[str, typer.Argument(metavar="EXPORT_ID")]
PollInterval = Annotated[
    float,
    typer.Option("--poll-interval", min=0.05, hidden=True, help="Seconds between polls."),
]
Force = Annotated[
    bool,
    typer.Option("--force", help="Write into a directory that is not empty, replacing files."),
]


def _exports_path(job_id: str, export_id: str | None = None) -> str:
    path = f"/v1/fine_tuning/jobs/{job_id}/exports"
    return f"{path}/{export_id}" if export_id else path


def export(
    job_id: JobArg,
    format_: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            "-f",
            help="merged: a Hugging Face folder of 16-bit weights (vLLM, TGI, transformers); "
            "gguf: one GGUF file and an Ollama Modelfile (llama.cpp, Ollama).",
        ),
    ],
    dtype: Annotated[
        Dtype | None,
        typer.Option(help="A merged export's dtype (default bfloat16).", show_default=False),
    ] = None,
    quantization: Annotated[
        Quantization | None,
        typer.Option(help="A GGUF export's quantization (default q8_0).", show_default=False),
    ] = None,
    base_weights: Annotated[
        BaseWeights | None,
        typer.Option(
            help="What the adapter is merged into: the NF4 base it was trained against "
            "(default) or the original 16-bit weights (docs/exports.md).",
            show_default=False,
        ),
    ] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(help="Export this checkpoint (ftckpt-...) instead of the final model."),
    ] = None,
    priority: Annotated[
        str | None, typer.Option(help="low, normal or high, among your team's work.")
    ] = None,
    gpu_class: Annotated[str | None, typer.Option(help="Run only on this class.")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Follow it until it ends, with its events.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Then download its files into this directory (implies --wait).",
            show_default=False,
        ),
    ] = None,
    force: Force = False,
    poll_interval: PollInterval = POLL_SECONDS,
    json_: Json = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Export a succeeded job's model (or one of its checkpoints) as merged weights or
    GGUF. Prints the export's id; with --wait follows it to its end (exit 0 succeeded,
    1 failed, 2 cancelled), and with --output downloads its files into a directory."""
    if format_ == ExportFormat.GGUF and dtype is not None:
        raise typer.BadParameter("--dtype is a merged export's; GGUF has --quantization")
    if format_ == ExportFormat.MERGED and quantization is not None:
        raise typer.BadParameter("--quantization is a GGUF export's; merged has --dtype")
    if output is not None:
        _check_empty(output, force)  # before anything is asked of the pool
    console = make_console(stderr=True)  # stdout: the id, the JSON or the directory only
    body: dict[str, Any] = {"format": format_.value}
    for name, value in (
        ("dtype", dtype),
        ("quantization", quantization),
        ("base_weights", base_weights),
        ("checkpoint", checkpoint),
        ("priority", priority),
        ("gpu_class", gpu_class),
    ):
        if value is not None:
            body[name] = str(value)
    with LatheClient.from_options(api_url, api_key) as client:
        created = client.post(_exports_path(job_id), json=body)
        console.print(
            f"created [bold]{escape(created['id'])}[/] ({status_text(created['status'])}): "
            f"{escape(export_options_text(created))} of {escape(created.get('model') or job_id)}"
        )
        if not wait and output is None:
            if json_:
                print_json(created)
            else:
                print(created["id"])
            return
        final, code = wait_for_export(client, job_id, created["id"], console, poll_interval)
        if output is not None and code == EXIT_OK:
            download_export(client, final, output, console, force)
    if json_:
        print_json(final)
    elif output is not None and code == EXIT_OK:
        print(output)
    raise typer.Exit(code)


def _check_empty(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise ClientError(f"{out} exists and is not an empty directory (--force to write anyway)")


def wait_for_export(
    client: LatheClient, job_id: str, export_id: str, console: Console, interval: float
) -> tuple[dict, int]:
    """Poll the export (and print its new events) until it ends: (the export, its exit
    code). A server that stops answering is tried again, up to MAX_POLL_FAILURES times in
    a row."""
    path = _exports_path(job_id, export_id)
    seen: set[str] = set()
    failures = 0
    with console.status(f"export {escape(export_id)}", spinner="dots") as spinner:
        while True:
            try:
                current = client.get(path)
                events = client.get(f"{path}/events", limit=EVENTS_PER_POLL)["data"]
                failures = 0
            except Unreachable as exc:
                failures += 1
                if failures >= MAX_POLL_FAILURES:
                    raise
                console.print(f"[yellow]{escape(exc.message)}; trying again[/]")
                time.sleep(interval)
                continue
            for event in reversed(events):  # newest first from the API; print oldest first
                if event["id"] not in seen:
                    seen.add(event["id"])
                    event_line(console, event)
            if current["status"] in FINAL:
                break
            spinner.update(f"export {escape(export_id)}: {status_text(current['status'])}")
            time.sleep(interval)
    _outcome(console, current)
    return current, EXPORT_EXIT_CODES.get(current["status"], EXIT_API_ERROR)


def _outcome(console: Console, export: dict) -> None:
    status = export["status"]
    took = (
        duration(export["finished_at"] - export["created_at"])
        if export.get("finished_at") and export.get("created_at")
        else None
    )
    if status == JobStatus.SUCCEEDED:
        console.print(
            f"[bold green]✔ export succeeded[/] {escape(export['id'])}: "
            f"{export_size_text(export)}" + (f" in {took}" if took else "")
        )
        console.print(export_table(export))
    elif status == JobStatus.FAILED:
        error = export.get("error") or {}
        console.print(
            f"[bold red]✘ export failed[/] ({escape(str(error.get('code') or 'error'))}): "
            f"{escape(str(error.get('message', '')))}"
        )
    else:
        console.print("[bold magenta]■ export cancelled[/]" + (f" after {took}" if took else ""))


def list_exports(
    job_id: JobArg,
    limit: Annotated[int, typer.Option(help="At most this many (1-100), newest first.")] = 20,
    after: Annotated[str | None, typer.Option(help="Continue after this export id.")] = None,
    json_: Json = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """A job's exports, newest first: format and options, status, files and size."""
    with LatheClient.from_options(api_url, api_key) as client:
        page = client.get(_exports_path(job_id), limit=limit, after=after)
    if json_:
        print_json(page)
        return
    console = make_console()
    console.print(exports_table(page["data"]) if page["data"] else f"no exports of {job_id}")
    if page.get("has_more"):
        console.print(f"[dim]more: --after {page['last_id']}[/]")


def cancel_export(
    job_id: JobArg,
    export_id: ExportArg,
    json_: Json = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Cancel a queued or running export; nothing of it is kept."""
    with LatheClient.from_options(api_url, api_key) as client:
        cancelled = client.post(f"{_exports_path(job_id, export_id)}/cancel")
    if json_:
        print_json(cancelled)
    else:
        make_console().print(f"{cancelled['id']}: {status_text(cancelled['status'])}")


def download(
    job_id: JobArg,
    export_id: ExportArg,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Directory (default ./EXPORT_ID)."),
    ] = None,
    force: Force = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Download a succeeded export's files into a directory, each under its name. Run it
    again after an interruption: finished files that check out are kept, a broken one
    continues from its .part. Prints the directory."""
    out = output or Path(export_id)
    console = make_console(stderr=True)
    with LatheClient.from_options(api_url, api_key) as client:
        record = client.get(_exports_path(job_id, export_id))
        if record["status"] != JobStatus.SUCCEEDED:
            raise ClientError(
                f"{export_id} is {record['status']}; only a succeeded export has files"
            )
        download_export(client, record, out, console, force)
    print(out)


def download_export(
    client: LatheClient, export: dict, out: Path, console: Console, force: bool
) -> None:
    """Every file of the export into `out` under its filename, each resumable and checked
    against its SHA-256 (app/client/downloads.py). A file already there with the right
    SHA-256 is kept; one that differs is replaced with --force only, and that is checked
    for every file before any byte is fetched."""
    if out.exists() and not out.is_dir():
        raise ClientError(f"{out} exists and is not a directory")
    files = export.get("files") or []
    if not files:
        raise ClientError(f"{export['id']} has no files (deleted since?)")
    plan: list[tuple[dict, Path]] = []
    for entry in files:
        target = out / _relative(entry["filename"], export["id"])
        record = {"id": entry["id"], "filename": entry["filename"], "bytes": entry["bytes"]}
        if target.is_file():
            if _same_file(client, record, target):
                console.print(f"[dim]kept {escape(str(target))} (its SHA-256 checks out)[/]")
                continue
            if not force:
                raise ClientError(f"{target} exists with other content (--force to replace it)")
        elif target.exists():
            raise ClientError(f"{target} exists and is not a file")
        plan.append((record, target))
    with transfer_progress(console) as progress:
        for record, target in plan:
            target.parent.mkdir(parents=True, exist_ok=True)
            download_file(client, record, target, progress)
    console.print(
        f"[green]downloaded and checked[/] {len(plan)} of {len(files)} files "
        f"({export_size_text(export)}) into [bold]{escape(str(out))}[/]"
    )
    for hint in _how_to_use(export, out):
        console.print(f"  {escape(hint)}")


def _relative(filename: str, export_id: str) -> PurePosixPath:
    """The file's path in the export's folder, which must stay inside it."""
    path = PurePosixPath(filename)
    if (
        not filename
        or "\\" in filename
        or path.is_absolute()
        or any(part in ("", ".", "..") for part in filename.split("/"))
    ):
        raise ClientError(f"{export_id} has a file named {filename!r}, which is not a plain path")
    return path


def _same_file(client: LatheClient, record: dict, target: Path) -> bool:
    """Whether `target` already is the file: its size, then its SHA-256 against the file's
    ETag (asked for with a one-byte range, so nothing big is sent)."""
    if target.stat().st_size != record["bytes"]:
        return False
    if record["bytes"] == 0:
        return True
    try:
        with client.stream(
            "GET", f"/v1/files/{record['id']}/content", headers={"Range": "bytes=0-0"}
        ) as resp:
            expected = etag_digest(resp.headers.get("etag"))
    except APIError:
        return False
    if expected is None:
        return False
    digest = hashlib.sha256()
    with target.open("rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == expected


def _how_to_use(export: dict, out: Path) -> list[str]:
    if export.get("format") == "gguf":
        gguf = next((f["filename"] for f in export["files"] if f["filename"].endswith(".gguf")), "")
        name = (export.get("model") or "lathe-model").replace(":", "-").lower()
        hints = [f"ollama create {name} -f {out / 'Modelfile'}"]
        if gguf:
            hints.append(f"llama-cli -m {out / gguf}")
        return hints
    return [
        f"a Hugging Face folder: from_pretrained({str(out)!r}) loads it, vllm serve {out} serves it"
    ]


__all__ = ["cancel_export", "download", "export", "list_exports"]
