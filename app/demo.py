"""`make demo`: an embedded server, a QLoRA job on tiny-random-llama, the adapter fetched.

It is a client like any other: it talks to the server over HTTP only.
"""

from __future__ import annotations

import csv
import io
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import select

from app.config import TINY_RANDOM_LLAMA, get_settings
from app.db import make_engine, make_sessionmaker
from app.domain.jobs import FINAL_STATES, JobStatus
from app.lifetime import child_env, stop_child
from app.migrate import upgrade
from app.models import Team
from app.services.teams import create_team, issue_key

DATA = Path(__file__).parent / "data"
SPARK = "▁▂▃▄▅▆▇█"
console = Console()


def demo_key() -> str:
    settings = get_settings()
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    with make_sessionmaker(engine)() as session:
        team = session.scalar(select(Team).where(Team.name == "demo"))
        if team is None:
            _, key = create_team(session, "demo")
        else:
            key = issue_key(session, team)
            session.commit()
    engine.dispose()
    return key


def wait_ready(client: httpx.Client, server: subprocess.Popen, deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready in time")


def sparkline(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[int((v - lo) / span * (len(SPARK) - 1))] for v in values)


def follow_job(client: httpx.Client, job_id: str) -> dict:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(JobStatus.QUEUED, total=None, loss="")
        while True:
            job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            events = client.get(
                f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1}
            ).json()["data"]
            latest = events[0] if events else None
            if latest and latest["type"] == "metrics":
                data = latest["data"]
                progress.update(
                    task,
                    total=data["total_steps"],
                    completed=data["step"],
                    loss=f"loss {data['train_loss']:.3f}",
                )
            progress.update(task, description=job["status"])
            if job["status"] in FINAL_STATES:
                return job
            time.sleep(0.5)


def _fmt(value: str, spec: str = ".4f") -> str:
    return format(float(value), spec) if value else "-"


def show_results(client: httpx.Client, job: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for file_id in job["result_files"]:
        meta = client.get(f"/v1/files/{file_id}").json()
        path = out_dir / meta["filename"]
        path.write_bytes(client.get(f"/v1/files/{file_id}/content").content)
        paths[meta["filename"]] = path
    with tarfile.open(paths["adapter.tar.gz"]) as tar:
        members = ", ".join(tar.getnames())
    console.print(f"adapter: {paths['adapter.tar.gz']} ({members})")
    rows = list(csv.DictReader(io.StringIO(paths["metrics.csv"].read_text())))
    losses = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    table = Table("step", "train_loss", "valid_loss", "learning_rate", title="metrics.csv")
    for r in rows[:: max(1, len(rows) // 8)] + ([rows[-1]] if len(rows) > 1 else []):
        table.add_row(
            r["step"], _fmt(r["train_loss"]), _fmt(r["valid_loss"]), _fmt(r["learning_rate"], ".2e")
        )
    console.print(table)
    console.print(f"loss {sparkline(losses)}  {losses[0]:.3f} -> {losses[-1]:.3f}")
    if losses[-1] >= losses[0]:
        raise SystemExit("the training loss did not fall")
    console.print(f"[green]the loss fell by {100 * (1 - losses[-1] / losses[0]):.0f}%[/green]")


def run_demo(port: int) -> None:
    settings = get_settings()
    if not settings.embedded:
        raise SystemExit("the demo runs the embedded server: unset LATHE_BROKER_URL")
    key = demo_key()
    base_url = f"http://127.0.0.1:{port}"
    # The server (and its worker) dies with the demo, even a killed one (app/lifetime.py).
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=open(settings.home / "demo-server.log", "w"),
    )
    try:
        with httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as client:
            console.print(f"starting the embedded server on {base_url} ...")
            wait_ready(client, server)
            uploaded = {}
            for name in ("sample_chat.jsonl", "sample_chat_valid.jsonl"):
                with (DATA / name).open("rb") as fh:
                    resp = client.post(
                        "/v1/files", data={"purpose": "fine-tune"}, files={"file": (name, fh)}
                    )
                resp.raise_for_status()
                uploaded[name] = resp.json()["id"]
                console.print(f"uploaded {name}: {uploaded[name]}")
            started = time.monotonic()
            resp = client.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": TINY_RANDOM_LLAMA,
                    "training_file": uploaded["sample_chat.jsonl"],
                    "validation_file": uploaded["sample_chat_valid.jsonl"],
                    "hyperparameters": {"n_epochs": 3, "batch_size": 8},
                    "suffix": "demo",
                    "seed": 42,
                    "lora": {"r": 8, "alpha": 16},
                },
            )
            resp.raise_for_status()
            job = follow_job(client, resp.json()["id"])
            console.print(f"job {job['id']} {job['status']} in {time.monotonic() - started:.1f} s")
            if job["status"] != JobStatus.SUCCEEDED:
                raise SystemExit(f"the job did not succeed: {job['error']}")
            console.print(
                f"fine-tuned model: {job['fine_tuned_model']}, "
                f"{job['trained_tokens']} tokens trained"
            )
            show_results(client, job, settings.home / "demo-output")
    finally:
        stop_child(server, signal.SIGTERM, grace_s=30)
