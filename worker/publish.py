"""Publishing a trained job, in the job process: the adapter and the metrics CSV become the
job's result files, and the job succeeds, in one transaction.

The files are uploaded first; if the job was cancelled meanwhile (the succeed loses its
guarded move), they are deleted again and nothing is published.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from app.compat import tarfile  # filter="data" on Python 3.11.2 too
from app.db import retry_db
from app.domain.ids import new_id
from app.domain.jobs import JobStatus
from app.models import File, Job
from app.services import lifecycle
from app.storage import ObjectStore, file_key
from worker.training.spec import STEP_FIGURES, TrainingResult

METRICS_COLUMNS = [*STEP_FIGURES, "learning_rate", "epoch"]


@retry_db
def publish(
    job: Job,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    result: TrainingResult,
    workdir: Path,
    model_name: str,
    fence: tuple,
) -> str:
    adapter = workdir / "adapter.tar.gz"
    metrics = workdir / "metrics.csv"
    tar_directory(result.adapter_dir, adapter)
    _write_metrics_csv(result.metrics, metrics)
    records = []
    for path in (adapter, metrics):
        record = result_file(job, path)
        store.put_file(record.storage_key, path)
        records.append(record)
    with sessions() as session:
        session.add_all(records)
        done = lifecycle.succeed(
            session,
            session.get_one(Job, job.pk),
            model_name=model_name,
            trained_tokens=result.trained_tokens,
            result_files=[r.id for r in records],
            fence=fence,
        )
        if not done:  # cancelled while the results were uploading: publish nothing
            session.rollback()
            for record in records:
                store.delete(record.storage_key)
            return JobStatus.CANCELLED
        session.commit()
    return JobStatus.SUCCEEDED


def tar_directory(directory: Path, archive: Path) -> None:
    """The directory's files, flat, gzipped (an adapter; a Trainer checkpoint)."""
    tar_files([path for path in sorted(directory.iterdir()) if path.is_file()], archive)


def tar_files(paths: list[Path], archive: Path) -> None:
    """These files, flat (each under its name alone), gzipped."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in paths:
            tar.add(path, arcname=path.name)


def _write_metrics_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRICS_COLUMNS})


def result_file(job: Job, path: Path) -> File:
    """The row of a file the job produced (uploaded to its storage_key by the caller): the
    team's, purpose fine-tune-results, named like `path`, with its size and SHA-256."""
    with path.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256")
    file_id = new_id("file")
    return File(
        id=file_id,
        team_pk=job.team_pk,
        filename=path.name,
        purpose="fine-tune-results",
        bytes=path.stat().st_size,
        sha256=digest.hexdigest(),
        storage_key=file_key(job.team.id, file_id),
        status="processed",
    )
