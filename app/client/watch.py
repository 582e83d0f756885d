"""`lathe jobs watch`: a job's events as a live progress bar of steps, over server-sent
events (GET /v1/fine_tuning/jobs/{id}/events?stream=true)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from app.client.http import (
    EXIT_API_ERROR,
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PAUSED,
    LatheClient,
)
from app.client.render import LEVEL_STYLE, classification_section, score, status_text
from app.client.sse import Reconnecting, job_event_stream
from app.domain.jobs import JobStatus
from app.formatting import clock, duration, number

EXIT_CODES = {
    JobStatus.SUCCEEDED: EXIT_OK,
    JobStatus.FAILED: EXIT_FAILED,
    JobStatus.CANCELLED: EXIT_CANCELLED,
    JobStatus.PAUSED: EXIT_PAUSED,
}
PAUSED_MESSAGE = "Fine-tuning job paused"
# A classifier's evaluated steps: (metrics row key, what the watch calls it).
SCORES = (("valid_accuracy", "accuracy"), ("valid_macro_f1", "macro-F1"))
# A DPO job's rewards: how often, and by how much, the preferred answer's reward (against
# the reference model) beats the other's. Every logged step has the training ones.
TRAIN_REWARDS = (
    ("train_reward_accuracy", "reward accuracy"),
    ("train_reward_margin", "reward margin"),
)
VALID_REWARDS = (
    ("valid_reward_accuracy", "valid reward accuracy"),
    ("valid_reward_margin", "valid reward margin"),
)
FIGURES = (*SCORES, *TRAIN_REWARDS, *VALID_REWARDS)  # what a step's line adds to its message
# The bar's text, short: a classifier's latest validation scores, a DPO job's training
# rewards (they move every step; the validation ones are on the evaluated steps' lines).
ON_THE_BAR = (*SCORES, ("train_reward_accuracy", "reward acc"), ("train_reward_margin", "margin"))


@dataclass
class _Rate:
    """Seconds per step over the current run, from the events' own timestamps (so events
    replayed at once on connecting still give the real rate)."""

    first: tuple[int, float] | None = None
    last: tuple[int, float] | None = None

    def add(self, step: int, at: float) -> None:
        if self.first is None or (self.last and step < self.last[0]):  # resumed: a new run
            self.first = (step, at)
        self.last = (step, at)

    def eta(self, total: int | None) -> float | None:
        if not (self.first and self.last and total) or self.last[0] <= self.first[0]:
            return None
        per_step = (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])
        return per_step * max(total - self.last[0], 0)


def watch_job(
    client: LatheClient, job_id: str, console: Console, step_lines: bool | None = None
) -> tuple[dict, int]:
    """Follow the job to its end (or a pause); (final job object, exit code). Every
    step's line is printed when `step_lines`, by default when the console is not a
    terminal (a log file gets no live bar); else only evaluated steps'."""
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}")  # a 404 ends here, cleanly
    if step_lines is None:
        step_lines = not console.is_terminal
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TextColumn("{task.fields[loss]}"),
        TextColumn("{task.fields[eta]}"),
        console=console,
    )
    rate = _Rate()
    losses: dict[str, float] = {}  # the latest of each loss and score
    console.print(
        f"watching [bold]{job_id}[/] ({escape(job['model'])}, {status_text(job['status'])})"
    )
    with progress:
        task = progress.add_task(status_text(job["status"]), total=None, loss="", eta="")
        for kind, item in job_event_stream(client, job_id):
            if kind == "end":
                job = item
                break
            if kind == "reconnect":
                assert isinstance(item, Reconnecting)
                progress.console.print(
                    f"[yellow]connection lost ({escape(item.reason)}); reconnecting[/]"
                )
                continue
            event = item
            data = event.get("data") or {}
            if event.get("type") == "metrics" and "step" in data:
                rate.add(data["step"], event["created_at"])
                total = data.get("total_steps")
                for name in ("train_loss", "valid_loss", *(key for key, _ in FIGURES)):
                    if data.get(name) is not None:
                        losses[name] = data[name]
                loss = f"loss {number(losses.get('train_loss'), 5)}"
                if "valid_loss" in losses:
                    loss += f" · valid {number(losses['valid_loss'], 5)}"
                for key, label in ON_THE_BAR:
                    if key in losses:
                        loss += f" · {label} {score(losses[key])}"
                eta = rate.eta(total)
                progress.update(
                    task,
                    description=status_text(JobStatus.RUNNING),
                    completed=data["step"],
                    total=total,
                    loss=loss,
                    eta=f"ETA {duration(eta)}" if eta is not None else "",
                )
                if step_lines or data.get("valid_loss") is not None:
                    event_line(progress.console, event)
                continue
            event_line(progress.console, event)
            message = event.get("message", "")
            if message.startswith("Fine-tuning job started"):
                rate.first = None  # a new attempt: time paused or queued is not step time
                progress.update(task, description=status_text(JobStatus.RUNNING))
            elif message.startswith("Fine-tuning job resumed"):
                progress.update(task, description=status_text(JobStatus.QUEUED))
            elif message.startswith(PAUSED_MESSAGE):
                # A pause is not an end (the job may be resumed): stop watching only if the
                # job is still paused now, not when replaying an old pause.
                current = client.get(f"/v1/fine_tuning/jobs/{job_id}")
                if current["status"] == JobStatus.PAUSED:
                    job = current
                    progress.update(task, description=status_text(JobStatus.PAUSED))
                    break
        progress.update(task, description=status_text(job["status"]), eta="")
    _outcome(console, job, losses)
    for block in classification_section(job.get("stats") or {}):
        console.print(block)
    return job, EXIT_CODES.get(job["status"], EXIT_API_ERROR)


def event_line(console: Console, event: dict) -> None:
    style = LEVEL_STYLE.get(event.get("level", "info"))
    text = event.get("message", "")
    data = event.get("data") or {}
    if event.get("type") == "metrics" and "accuracy" not in text:
        # A classifier's evaluated step: its scores; a DPO step: its rewards (unless the
        # message has them already).
        scores = [
            f"{label} {score(data[key])}" for key, label in FIGURES if data.get(key) is not None
        ]
        text = ", ".join([text, *scores])
    message = escape(text)
    if style:
        message = f"[{style}]{message}[/]"
    console.print(f"[dim]{clock(event.get('created_at'))}[/] {message}")


def _outcome(console: Console, job: dict, losses: dict[str, float]) -> None:
    status = job["status"]
    took = (
        duration(job["finished_at"] - job["created_at"])
        if job.get("finished_at") and job.get("created_at")
        else None
    )
    if status == JobStatus.SUCCEEDED:
        parts = [f"trained tokens {number(job.get('trained_tokens'))}"]
        if "train_loss" in losses:
            parts.append(f"final loss {number(losses['train_loss'], 5)}")
        if "valid_loss" in losses:
            parts.append(f"valid loss {number(losses['valid_loss'], 5)}")
        for key, label in SCORES:
            if key in losses:
                parts.append(f"valid {label} {score(losses[key])}")
        # A DPO job's rewards: on the validation file when it has one, else the last step's.
        rewards = VALID_REWARDS if VALID_REWARDS[0][0] in losses else TRAIN_REWARDS
        for key, label in rewards:
            if key in losses:
                parts.append(f"{label} {score(losses[key])}")
        if took:
            parts.append(f"in {took}")
        console.print(
            f"[bold green]✔ succeeded[/] [bold]{escape(job.get('fine_tuned_model') or '')}[/]"
        )
        console.print("  " + ", ".join(parts))
        console.print(f"  adapter: [cyan]lathe jobs download {job['id']}[/]")
    elif status == JobStatus.FAILED:
        error = job.get("error") or {}
        code = error.get("code") or "error"
        console.print(f"[bold red]✘ failed[/] ({escape(code)}): {escape(error.get('message', ''))}")
    elif status == JobStatus.CANCELLED:
        console.print("[bold magenta]■ cancelled[/]" + (f" after {took}" if took else ""))
    elif status == JobStatus.PAUSED:
        console.print(
            f"[bold yellow]⏸ paused[/]: its checkpoint is kept; "
            f"[cyan]lathe jobs resume {job['id']}[/] puts it back in line"
        )
    else:
        console.print(f"stopped watching: the job is {status_text(status)}")
