"""`lathe jobs`: create, list, get, watch, cancel, pause, resume and download; the export
commands (export, exports, export-download, export-cancel) are app/client/exports.py's. The
commands only; what they draw is in app/client/render.py."""

from __future__ import annotations

import io
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from app.client import exports
from app.client.downloads import download_file
from app.client.files import describe_upload, transfer_progress, upload_file
from app.client.http import ClientError, LatheClient, handles_errors
from app.client.options import ApiKey, ApiUrl, Json
from app.client.render import (
    classification_section,
    job_panel,
    jobs_table,
    make_console,
    print_json,
    status_text,
)
from app.client.watch import watch_job
from app.compat import tarfile  # filter="data" on Python 3.11.2 too
from app.domain.jobs import JobStatus


class Method(StrEnum):
    SUPERVISED = "supervised"
    DPO = "dpo"


class Parallelism(StrEnum):
    DDP = "ddp"
    FSDP = "fsdp"


jobs_app = typer.Typer(help="Create, follow and manage fine-tuning jobs.", no_args_is_help=True)
FILE_ID = re.compile(r"^file-[A-Za-z0-9]+$")
ADAPTER = "adapter.tar.gz"


def _file_id(client: LatheClient, value: str, console: Console) -> str:
    """A `file-...` id as is; a local path uploaded first (with a progress bar)."""
    path = Path(value).expanduser()
    if FILE_ID.match(value) and not path.exists():
        return value
    if not path.is_file():
        raise ClientError(f"{value} is neither a file id (file-...) nor a local file")
    record = upload_file(client, path, console)
    describe_upload(record, console)
    return record["id"]


@jobs_app.command("create")
@handles_errors
def create(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Base model (see /v1/models), or a fine-tuned model (ft:...) or checkpoint "
            "of yours to train on from.",
        ),
    ],
    train: Annotated[
        str,
        typer.Option(
            "--train", "-t", help="Training data: a local JSONL (uploaded first) or a file id."
        ),
    ],
    valid: Annotated[
        str | None,
        typer.Option("--valid", "-v", help="Validation data: a local JSONL or a file id."),
    ] = None,
    method: Annotated[
        Method | None,
        typer.Option(
            help="supervised (chat/completion/text files) or dpo (preference pairs); "
            "the hyperparameters then go in the method's block.",
            show_default=False,
        ),
    ] = None,
    beta: Annotated[
        float | None,
        typer.Option(help="DPO's pull towards the reference model, (0, 2] (default 0.1)."),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="n_epochs, 1-50 (default: auto).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="1-256 (default: auto).")] = None,
    learning_rate_multiplier: Annotated[
        float | None, typer.Option(help="On the base model's rate, (0, 10] (default: auto).")
    ] = None,
    lora_r: Annotated[int | None, typer.Option(help="Adapter rank, 1-256 (default 8).")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default 16).")] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="LoRA dropout (default 0.05).")] = None,
    target_modules: Annotated[
        str | None,
        typer.Option(help="Comma-separated module names, or all-linear (default: the model's)."),
    ] = None,
    max_seq_length: Annotated[
        int | None, typer.Option(help="Tokens per example (default 1024).")
    ] = None,
    packing: Annotated[
        bool | None,
        typer.Option(
            "--packing/--no-packing",
            help="Padding-free packed batches (default on).",
            show_default=False,
        ),
    ] = None,
    train_on_inputs: Annotated[
        bool | None,
        typer.Option(
            "--train-on-inputs/--no-train-on-inputs",
            help="Loss on prompts too (default off).",
            show_default=False,
        ),
    ] = None,
    eval_steps: Annotated[int | None, typer.Option(help="Evaluate every N steps.")] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the fine-tuned model's name.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    gpu_class: Annotated[str | None, typer.Option(help="Run only on this GPU class.")] = None,
    gpus: Annotated[
        int | None,
        typer.Option(
            help="GPUs of one host to train on at once, 1-64 (default 1); the batch size "
            "must split evenly among them.",
            show_default=False,
        ),
    ] = None,
    parallelism: Annotated[
        Parallelism | None,
        typer.Option(
            help="With --gpus > 1: ddp (each GPU holds the model) or fsdp (sharded); "
            "default: chosen by the server.",
            show_default=False,
        ),
    ] = None,
    priority: Annotated[
        str | None, typer.Option(help="low, normal or high, among your team's jobs.")
    ] = None,
    wandb_project: Annotated[
        str | None,
        typer.Option(help="Log the run to this Weights & Biases project.", show_default=False),
    ] = None,
    wandb_name: Annotated[str | None, typer.Option(help="The W&B run's name.")] = None,
    wandb_entity: Annotated[str | None, typer.Option(help="The W&B team or user.")] = None,
    wandb_tag: Annotated[
        list[str] | None,
        typer.Option(help="A W&B tag (repeat for more).", metavar="<str>", show_default=False),
    ] = None,
    mlflow_experiment: Annotated[
        str | None,
        typer.Option(
            help="Log the run to this experiment on the server's MLflow.", show_default=False
        ),
    ] = None,
    mlflow_run_name: Annotated[str | None, typer.Option(help="The MLflow run's name.")] = None,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Then watch it (as `jobs watch`).")
    ] = False,
    json_: Json = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Create a fine-tuning job. Local files are uploaded first; prints the job id."""
    console = make_console(stderr=True)  # stdout: the job id (or its JSON) only
    if beta is not None and method != Method.DPO:
        raise typer.BadParameter("--beta is DPO's; add --method dpo", param_hint="--beta")
    if parallelism is not None and (gpus or 1) < 2:
        raise typer.BadParameter(
            "--parallelism is for a job on several GPUs; add --gpus N (N >= 2)",
            param_hint="--parallelism",
        )
    body: dict[str, Any] = {"model": model}
    hyperparameters = _given(
        n_epochs=epochs,
        batch_size=batch_size,
        learning_rate_multiplier=learning_rate_multiplier,
        beta=beta,
    )
    if method is None:  # OpenAI's older place, as before --method
        body["hyperparameters"] = hyperparameters
    else:
        body["method"] = {"type": method.value}
        if hyperparameters:
            body["method"][method.value] = {"hyperparameters": hyperparameters}
    body["lora"] = _given(r=lora_r, alpha=lora_alpha, dropout=lora_dropout)
    if target_modules:
        body["lora"]["target_modules"] = [m.strip() for m in target_modules.split(",") if m.strip()]
    body["training"] = _given(
        packing=packing, train_on_inputs=train_on_inputs, eval_steps=eval_steps
    )
    body["integrations"] = _integrations(
        wandb_project, wandb_name, wandb_entity, wandb_tag, mlflow_experiment, mlflow_run_name
    )
    body = {k: v for k, v in body.items() if v not in ({}, [])}
    for name, value in (
        ("max_seq_length", max_seq_length),
        ("suffix", suffix),
        ("seed", seed),
        ("gpu_class", gpu_class),
        ("priority", priority),
        ("gpus", gpus),
        ("parallelism", parallelism.value if parallelism else None),
    ):
        if value is not None:
            body[name] = value
    with LatheClient.from_options(api_url, api_key) as client:
        body["training_file"] = _file_id(client, train, console)
        if valid:
            body["validation_file"] = _file_id(client, valid, console)
        job = client.post("/v1/fine_tuning/jobs", json=body)
        if not watch:
            if json_:
                print_json(job)
            else:
                console.print(f"created {job['id']} ({status_text(job['status'])})")
                print(job["id"])
            return
        console.print(f"created {job['id']}")
        job, code = watch_job(client, job["id"], console)
    if json_:
        print_json(job)
    raise typer.Exit(code)


def _given(**values: Any) -> dict[str, Any]:
    """The options given: one left out is the server's default, not sent."""
    return {k: v for k, v in values.items() if v is not None}


def _integrations(
    wandb_project: str | None,
    wandb_name: str | None,
    wandb_entity: str | None,
    wandb_tags: list[str] | None,
    mlflow_experiment: str | None,
    mlflow_run_name: str | None,
) -> list[dict[str, Any]]:
    """The request's `integrations` (OpenAI's shape; MLflow is Lathe's) from the flags."""
    integrations: list[dict[str, Any]] = []
    if wandb_project:
        wandb = _given(project=wandb_project, name=wandb_name, entity=wandb_entity)
        integrations.append({"type": "wandb", "wandb": wandb | _given(tags=wandb_tags or None)})
    elif wandb_name or wandb_entity or wandb_tags:
        raise typer.BadParameter("W&B logs to a project: add --wandb-project")
    if mlflow_experiment:
        mlflow = _given(experiment=mlflow_experiment, run_name=mlflow_run_name)
        integrations.append({"type": "mlflow", "mlflow": mlflow})
    elif mlflow_run_name:
        raise typer.BadParameter("MLflow logs to an experiment: add --mlflow-experiment")
    return integrations


@jobs_app.command("list")
@handles_errors
def list_jobs(
    limit: Annotated[int, typer.Option(help="At most this many (1-100), newest first.")] = 20,
    after: Annotated[str | None, typer.Option(help="Continue after this job id.")] = None,
    json_: Json = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """The team's jobs, newest first."""
    with LatheClient.from_options(api_url, api_key) as client:
        page = client.get("/v1/fine_tuning/jobs", limit=limit, after=after)
    if json_:
        print_json(page)
        return
    console = make_console()
    console.print(jobs_table(page["data"]) if page["data"] else "no jobs")
    if page.get("has_more"):
        console.print(f"[dim]more: --after {page['last_id']}[/]")


@jobs_app.command("get")
@handles_errors
def get(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID")],
    json_: Json = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """A job: status, model, hyperparameters, token counts and stats, place in line."""
    with LatheClient.from_options(api_url, api_key) as client:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}")
        if json_:
            print_json(job)
            return
        queue = None
        if job["status"] in (JobStatus.QUEUED, JobStatus.RUNNING):
            queue = client.get(f"/v1/fine_tuning/jobs/{job_id}/queue")
    console = make_console()
    console.print(job_panel(job, queue))
    for block in classification_section(job.get("stats") or {}):
        console.print(block)


@jobs_app.command("watch")
@handles_errors
def watch(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID")],
    json_: Annotated[
        bool, typer.Option("--json", help="At the end, print the job's JSON on stdout.")
    ] = False,
    record: Annotated[
        Path | None, typer.Option(hidden=True, help="Also save the output as an SVG.")
    ] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Follow a job live: a progress bar of steps with the loss and an ETA, its events,
    then the outcome. Exit code: 0 succeeded, 1 failed, 2 cancelled, 3 paused (4: an API
    error, 5: the server unreachable)."""
    console = make_console(stderr=json_)
    if record:  # for the docs: the screen as it ends, without the live redraws
        console = Console(
            record=True, file=io.StringIO(), width=120, force_terminal=False, highlight=False
        )
    with LatheClient.from_options(api_url, api_key) as client:
        job, code = watch_job(client, job_id, console, step_lines=False if record else None)
    if record:
        screen = make_console(stderr=json_)
        screen.file.write(console.export_text(clear=False, styles=screen.is_terminal))
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(console.export_svg(title=f"lathe jobs watch {job_id}"))
    if json_:
        print_json(job)
    raise typer.Exit(code)


def _action(job_id: str, verb: str, api_url: str | None, api_key: str | None, json_: bool) -> None:
    with LatheClient.from_options(api_url, api_key) as client:
        job = client.post(f"/v1/fine_tuning/jobs/{job_id}/{verb}")
    if json_:
        print_json(job)
    else:
        make_console().print(f"{job['id']}: {status_text(job['status'])}")


@jobs_app.command("cancel")
@handles_errors
def cancel(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID")],
    json_: Json = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Cancel an unfinished job."""
    _action(job_id, "cancel", api_url, api_key, json_)


@jobs_app.command("pause")
@handles_errors
def pause(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID")],
    json_: Json = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Pause a queued or running job; it keeps its checkpoint."""
    _action(job_id, "pause", api_url, api_key, json_)


@jobs_app.command("resume")
@handles_errors
def resume(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID")],
    json_: Json = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Put a paused job back in line; it continues from its last checkpoint."""
    _action(job_id, "resume", api_url, api_key, json_)


@jobs_app.command("download")
@handles_errors
def download(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Directory to unpack into (default ./JOB_ID-adapter)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Unpack into a directory that is not empty.")
    ] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Download a succeeded job's adapter and unpack it, ready for
    PeftModel.from_pretrained(base_model, DIR)."""
    out = output or Path(f"{job_id}-adapter")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise ClientError(f"{out} exists and is not an empty directory (--force to unpack anyway)")
    console = make_console(stderr=True)
    with LatheClient.from_options(api_url, api_key) as client:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}")
        if job["status"] != JobStatus.SUCCEEDED:
            raise ClientError(f"{job_id} is {job['status']}; only a succeeded job has an adapter")
        records = [client.get(f"/v1/files/{fid}") for fid in job.get("result_files") or []]
        adapter = next((r for r in records if r["filename"] == ADAPTER), None)
        if adapter is None:
            raise ClientError(f"{job_id} has no {ADAPTER} among its result files")
        # Beside the directory, so an interrupted download continues on the next run.
        archive = out.resolve().with_name(f".{out.resolve().name}.{ADAPTER}")
        with transfer_progress(console) as progress:
            download_file(client, adapter, archive, progress)
        out.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(archive, mode="r:*") as tar:
                names = tar.getnames()
                # "data": no absolute paths, no escaping the directory, no devices or links out.
                tar.extractall(out, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise ClientError(f"could not unpack {ADAPTER}: {exc}") from None
        finally:
            archive.unlink(missing_ok=True)
    console.print(
        f"[green]adapter[/] of {job['fine_tuned_model']} in [bold]{out}[/] ({len(names)} files)"
    )
    console.print(f"  PeftModel.from_pretrained(base_model, {str(out)!r})")
    print(out)


# Exports of a job's model (app/client/exports.py), next to the job commands.
jobs_app.command("export")(handles_errors(exports.export))
jobs_app.command("exports")(handles_errors(exports.list_exports))
jobs_app.command("export-download")(handles_errors(exports.download))
jobs_app.command("export-cancel")(handles_errors(exports.cancel_export))
