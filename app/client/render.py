"""What the `lathe` command shows: Rich markup, tables and panels for people, raw JSON for
scripts (--json). The commands (app/client/jobs.py, files.py, ...) fetch; this module
draws. Times and numbers as text come from app.formatting, shared with the dashboard."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from app.domain.jobs import JobStatus
from app.domain.workers import WorkerState
from app.formatting import duration, number, size, when

STATUS_STYLE = {
    JobStatus.VALIDATING_FILES: "cyan",
    JobStatus.QUEUED: "cyan",
    JobStatus.RUNNING: "blue",
    JobStatus.PAUSED: "yellow",
    JobStatus.SUCCEEDED: "green",
    JobStatus.FAILED: "red",
    JobStatus.CANCELLED: "magenta",
}
WORKER_STYLE = {
    WorkerState.ACTIVE: "green",
    WorkerState.LOST: "red",
    WorkerState.DRAINING: "yellow",
    WorkerState.DRAINED: "yellow",
}
LEVEL_STYLE = {"warn": "yellow", "warning": "yellow", "error": "red"}
MAX_MATRIX_CLASSES = 20  # a wider confusion matrix is unreadable in a terminal


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


def jobs_table(jobs: list[dict]) -> Table:
    """`lathe jobs list`: one row a job, newest first as the API lists them."""
    table = Table("id", "model", "status", "GPUs", "created", "finished", "fine-tuned model")
    for job in jobs:
        table.add_row(
            job["id"],
            job["model"],
            status_text(job["status"]),
            str(job.get("gpus") or 1),
            when(job["created_at"]),
            when(job.get("finished_at")),
            job.get("fine_tuned_model") or "-",
        )
    return table


def _kv(rows: list[tuple[str, Any]]) -> Table:
    """Label and value rows; an empty value leaves its row out."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        if value not in (None, "", [], {}):
            table.add_row(key, value if isinstance(value, str) else str(value))
    return table


def job_panel(job: dict, queue: dict | None) -> Panel:
    """`lathe jobs get`: the job object, with its place in line (`queue`, the job's
    /queue view) while it waits or runs."""
    rows: list[tuple[str, Any]] = [
        ("status", status_text(job["status"])),
        ("model", escape(job["model"])),
        ("fine-tuned model", escape(job.get("fine_tuned_model") or "")),
        ("created", when(job["created_at"])),
        ("finished", when(job["finished_at"]) if job.get("finished_at") else None),
    ]
    if job.get("finished_at"):
        rows.append(("took", duration(job["finished_at"] - job["created_at"])))
    if job.get("estimated_finish") and job["status"] == JobStatus.RUNNING:
        rows.append(("estimated finish", when(job["estimated_finish"])))
    if queue and job["status"] in (JobStatus.QUEUED, JobStatus.RUNNING):
        rows += _queue_rows(queue)
    if job.get("error"):
        error = job["error"]
        rows.append(
            (
                "error",
                f"[red]{escape(str(error.get('code')))}: {escape(str(error.get('message')))}[/]",
            )
        )
    hp = job.get("hyperparameters") or {}
    rows += [
        ("method", method_text(job)),
        ("lineage", escape(lineage_text(job))),
        ("parent job", _parent_text(job.get("parent"))),
        ("training file", job.get("training_file")),
        ("validation file", job.get("validation_file")),
        (
            "hyperparameters",
            f"epochs {hp.get('n_epochs')}, batch size {hp.get('batch_size')}, "
            f"lr multiplier {hp.get('learning_rate_multiplier')}",
        ),
        (
            "training",
            ", ".join(f"{k}={v}" for k, v in (job.get("training") or {}).items() if v is not None),
        ),
        ("GPUs", gpus_text(job)),
        ("preemption", preemption_text(job)),
        ("seed", job.get("seed")),
        ("trained tokens", number(job["trained_tokens"]) if job.get("trained_tokens") else None),
    ]
    rows += tracker_rows(job)
    rows += _stats_rows(job.get("stats") or {})
    return Panel(_kv(rows), title=f"[bold]{job['id']}[/]", expand=False)


def method_text(job: dict) -> str:
    """ "supervised", or "dpo (beta 0.1)": OpenAI's method object, its beta in
    method.dpo.hyperparameters."""
    method = job.get("method") if isinstance(job.get("method"), dict) else {}
    kind = method.get("type") if isinstance(method.get("type"), str) else "supervised"
    if kind != "dpo":
        return escape(kind)
    options = method.get("dpo") if isinstance(method.get("dpo"), dict) else {}
    hp = options.get("hyperparameters") if isinstance(options.get("hyperparameters"), dict) else {}
    beta = hp.get("beta", (job.get("hyperparameters") or {}).get("beta"))
    return f"dpo (beta {beta:g})" if isinstance(beta, int | float) else "dpo"


def gpus_text(job: dict) -> str:
    """ "1", or "4 (fsdp), devices 0, 1, 2, 3" while a multi-GPU job runs."""
    gpus = job.get("gpus") if isinstance(job.get("gpus"), int) else 1
    text = str(gpus)
    if isinstance(job.get("parallelism"), str):
        text += f" ({escape(job['parallelism'])})"
    devices = job.get("devices")
    if isinstance(devices, list) and devices:
        text += ", devices " + ", ".join(str(d) for d in devices)
    return text


def preemption_text(job: dict) -> str:
    """Empty for a preemptible job never preempted; else the count and the mark."""
    parts = []
    if isinstance(job.get("preemptions"), int) and job["preemptions"] > 0:
        times = "once" if job["preemptions"] == 1 else f"{job['preemptions']} times"
        parts.append(f"preempted {times}")
    if job.get("preemptible") is False:
        parts.append("not preemptible (an administrator's mark)")
    return ", ".join(parts)


def lineage_text(job: dict) -> str:
    """ "base → ft:... → ft:... → this job" for a job that trains on from a fine-tuned
    model (its `lineage`: the base model, then each ancestor's output, oldest first);
    empty for a job from a base model."""
    lineage = [m for m in job.get("lineage") or [] if isinstance(m, str)]
    if not job.get("parent") or not lineage:
        return ""
    return " → ".join([*lineage, "this job"])


def _parent_text(parent: object) -> str | None:
    if not isinstance(parent, dict):
        return None
    text = escape(str(parent.get("job") or "-"))
    if parent.get("checkpoint"):
        text += f" (checkpoint {escape(str(parent['checkpoint']))})"
    return text


TRACKER_NAMES = {"wandb": "W&B", "mlflow": "MLflow"}


def tracker_rows(job: dict) -> list[tuple[str, Any]]:
    """One row per experiment tracker the job logs to: where (W&B entity/project, MLflow
    experiment), the run's name, and the run's URL once the worker has started it (the job
    object's integrations[].url, else stats.tracking)."""
    stats = job.get("stats") if isinstance(job.get("stats"), dict) else {}
    tracking = stats.get("tracking") if isinstance(stats.get("tracking"), dict) else {}
    rows: list[tuple[str, Any]] = []
    for entry in job.get("integrations") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            continue
        kind = entry["type"]
        options = entry.get(kind) if isinstance(entry.get(kind), dict) else {}
        run = tracking.get(kind) if isinstance(tracking.get(kind), dict) else {}
        if kind == "wandb":
            where = "/".join(str(options[k]) for k in ("entity", "project") if options.get(k))
        else:
            where = str(options.get("experiment") or "")
        name = options.get("name") or options.get("run_name")
        parts = [where] if where else []
        if name:
            parts.append(f"run {name}")
        parts.append(str(entry.get("url") or run.get("url") or "no run yet"))
        rows.append((f"{TRACKER_NAMES.get(kind, kind)} tracking", escape(", ".join(parts))))
    return rows


def _queue_rows(queue: dict) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    if queue.get("position") is not None:
        rows.append(("queue position", str(queue["position"])))
    if queue.get("eligible_gpu_classes"):
        rows.append(("GPU classes", ", ".join(queue["eligible_gpu_classes"])))
    if queue.get("estimated_start"):
        rows.append(("estimated start", when(queue["estimated_start"])))
    if queue.get("worker"):
        rows.append(("worker", queue["worker"]))
    if queue.get("waiting_for"):  # no worker of a fitting class is online
        rows.append(("waiting for", f"[yellow]{escape(queue['waiting_for'])}[/]"))
    return rows


def _stats_rows(stats: dict) -> list[tuple[str, Any]]:
    """What the worker measured: the datasets' tokens, the adapter's size, throughput."""
    rows: list[tuple[str, Any]] = []
    tokens = stats.get("tokens") or {}
    for name in ("train", "valid"):
        if name in tokens:
            t = tokens[name]
            text = (
                f"{number(t.get('tokens'))} tokens per epoch, {number(t.get('examples'))} examples"
            )
            if t.get("truncated"):
                text += f", {number(t['truncated'])} truncated"
            if t.get("dropped"):
                text += f", {number(t['dropped'])} dropped"
            rows.append((f"{name} data", text))
    model = stats.get("model") or {}
    if model.get("trainable_parameters"):
        share = ""
        if model.get("total_parameters"):
            share = f" ({100 * model['trainable_parameters'] / model['total_parameters']:.2f}%)"
        rows.append(("trainable params", f"{number(model['trainable_parameters'])}{share}"))
    throughput = stats.get("throughput") or {}
    if throughput:
        rows.append(("tokens/s", number(throughput.get("tokens_per_second"), 5)))
        if throughput.get("peak_memory_gb") is not None:
            source = throughput.get("peak_memory_source")
            rows.append(
                (
                    "peak memory",
                    f"{number(throughput['peak_memory_gb'], 3)} GB"
                    + (f" ({source})" if source else ""),
                )
            )
        rows.append(("device", throughput.get("device")))
    sample = stats.get("sample") or {}
    if sample.get("completion") is not None:
        rows.append(("sample answer", escape(str(sample["completion"]))[:300]))
    report = stats.get("classification")
    if isinstance(report, dict):
        rows.append(("classification", classification_summary(report)))
    return rows


def score(value: object) -> str:
    """A score to three decimals, so a column of them lines up."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:.3f}"


def classification_summary(report: dict) -> str:
    text = f"accuracy {score(report.get('accuracy'))}, macro-F1 {score(report.get('macro_f1'))}"
    if isinstance(report.get("examples"), int):
        text += f" on {number(report['examples'])} validation examples"
    if isinstance(report.get("step"), int):
        text += f" (step {report['step']})"
    return text


def classification_section(stats: dict) -> list[RenderableType]:
    """A classifier's final validation report (the job's `stats.classification`): a heading
    with its figures, per class precision, recall, F1 and support, then the confusion
    matrix, rows the true class and columns the predicted one. Class names are the user's
    labels, so they go in as Text: a label such as "[red]x" is shown as written, never read
    as markup."""
    report = stats.get("classification")
    if not isinstance(report, dict):
        return []
    heading = Text.assemble(("classification", "bold"), ": ", classification_summary(report))
    per_class = Table()
    per_class.add_column("class")
    for name in ("precision", "recall", "F1", "support"):
        per_class.add_column(name, justify="right")
    for c in report.get("per_class") or []:
        if isinstance(c, dict):
            per_class.add_row(
                Text(str(c.get("class", ""))),
                score(c.get("precision")),
                score(c.get("recall")),
                score(c.get("f1")),
                number(c.get("support")),
            )
    section: list[RenderableType] = [heading, per_class]
    classes = [str(c) for c in report.get("classes") or []]
    matrix = report.get("confusion_matrix")
    n = len(classes)
    if not (
        isinstance(matrix, list)
        and len(matrix) == n
        and all(isinstance(row, list) and len(row) == n for row in matrix)
    ):
        return section
    if n > MAX_MATRIX_CLASSES:
        section.append(
            Text(
                f"The {n}-class confusion matrix is on the dashboard's job page and in "
                "`lathe jobs get --json` (stats.classification)."
            )
        )
        return section
    confusion = Table()
    confusion.add_column(Text("true \\ predicted", style="dim"))
    for name in classes:
        confusion.add_column(Text(name), justify="right")
    for i, (name, row) in enumerate(zip(classes, matrix, strict=True)):
        cells = []
        for j, count in enumerate(row):
            # The diagonal is what was right; an off-diagonal count is a confusion.
            style = "bold green" if i == j else ("red" if count else "dim")
            cells.append(Text(str(count), style=style))
        confusion.add_row(Text(name, style="bold"), *cells)
    section += [Text("confusion matrix: rows the true class, columns the predicted one"), confusion]
    return section


def export_options_text(export: dict) -> str:
    """ "merged, bfloat16, NF4 base" or "gguf, q8_0, original base", and the checkpoint's
    step when the export is of a checkpoint."""
    if export.get("format") == "gguf":
        parts = ["gguf", str(export.get("quantization") or "-")]
    else:
        parts = ["merged", str(export.get("dtype") or "-")]
    parts.append("NF4 base" if export.get("base_weights", "nf4") == "nf4" else "original base")
    if export.get("step_number") is not None:
        parts.append(f"step {export['step_number']}")
    return ", ".join(parts)


def export_size_text(export: dict) -> str:
    files = export.get("files") or []
    total = sum(f.get("bytes") or 0 for f in files)
    return f"{len(files)} file{'' if len(files) == 1 else 's'}, {size(total)}"


def exports_table(exports: list[dict]) -> Table:
    """`lathe jobs exports`: one row an export, newest first."""
    table = Table("id", "options", "status", "files", "model", "created", "finished")
    for e in exports:
        table.add_row(
            e["id"],
            escape(export_options_text(e)),
            status_text(e["status"]),
            _export_files_cell(e),
            escape(e.get("model") or "-"),
            when(e.get("created_at")),
            when(e.get("finished_at")),
        )
    return table


def export_table(export: dict) -> Table:
    """A finished export's files: its name in the folder, size and file id."""
    table = Table("file", "size", "file id")
    for f in export.get("files") or []:
        table.add_row(Text(str(f["filename"])), size(f.get("bytes")), f["id"])
    return table


def _export_files_cell(export: dict) -> str:
    if export.get("files"):
        return export_size_text(export)
    error = export.get("error") if isinstance(export.get("error"), dict) else None
    if error:
        return f"[red]{escape(str(error.get('code') or 'error'))}[/]"
    return "-"
