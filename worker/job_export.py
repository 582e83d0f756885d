"""A claimed export, in its job process (worker.job_process): fetch the base model and the
adapter, merge them (worker.export.merge_adapter), convert to GGUF when asked
(worker.export.gguf), upload each file as the team's, and finish the export.

Memory follows one shard, not the model: the merge streams tensor by tensor, the converter
reads the merged shards lazily, and each file is uploaded from disk. A cancel is noticed
between tensors, while the converter runs (it is killed) and between uploads; nothing of a
stopped export is published. Every write carries the run's fence, as training's do.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import retry_db
from app.domain.jobs import JobStatus
from app.models import Job
from app.services import lifecycle
from app.services.events import add_event
from app.storage import ObjectStore
from worker.job_training import _fetch_parent
from worker.model_cache import BaseModelUnavailable, resolve_base_model
from worker.publish import result_file

log = logging.getLogger(__name__)
GIB = 1024**3


class StopCheck:
    """should_stop for the export's steps: True once the export is no longer running in this
    attempt (cancelled, or re-claimed elsewhere). Reads the row at most every `poll_seconds`;
    once True, stays True."""

    def __init__(self, sessions: sessionmaker[Session], job: Job, poll_seconds: float) -> None:
        self.sessions, self.pk, self.attempt = sessions, job.pk, job.attempt
        self.poll_seconds = poll_seconds
        self.last_poll = 0.0
        self.stopped = False

    def __call__(self) -> bool:
        if not self.stopped and time.monotonic() - self.last_poll >= self.poll_seconds:
            self.last_poll = time.monotonic()
            with self.sessions() as session:
                status, attempt = session.execute(
                    select(Job.status, Job.attempt).where(Job.pk == self.pk)
                ).one()
            self.stopped = status != JobStatus.RUNNING or attempt != self.attempt
        return self.stopped


def export_and_publish(
    job_id: str,
    settings: Settings,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    fence: tuple,
) -> str:
    from worker.export import TrainedQuantization, merge_adapter  # torch from here on
    from worker.export.stopping import ExportStopped
    from worker.training.qlora_model import resolve_device
    from worker.training.spec import QuantSpec

    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        session.refresh(job, ["team"])  # its files are named under the team's prefix
    spec, parent = job.export or {}, job.parent or {}
    base = settings.base_model(job.model)
    if base is None:
        raise BaseModelUnavailable(f"base model {job.model!r} is no longer configured")
    stop = StopCheck(sessions, job, settings.cancel_poll_seconds)
    note = _events(sessions, job)
    try:
        with tempfile.TemporaryDirectory(prefix=f"lathe-{job_id}-") as tmp:
            workdir = Path(tmp)
            base_path = resolve_base_model(base, settings)
            adapter_dir = _fetch_parent(store, parent, workdir / "adapter")
            gguf = spec.get("format") == "gguf"
            # A GGUF's converter reads 16-bit shards: float16 is what its f16 output holds.
            dtype = "float16" if gguf else spec.get("dtype", "bfloat16")
            merged = merge_adapter(
                base_path,
                adapter_dir,
                workdir / "merged",
                dtype=dtype,
                base_weights=spec.get("base_weights", "nf4"),
                quant=TrainedQuantization.from_spec(QuantSpec(**job.quantization)),
                chat_template=base.chat_template,
                max_shard_bytes=settings.export_shard_bytes,
                device=resolve_device(settings.device),
                should_stop=stop,
            )
            note(
                f"Merged the adapter into {merged.merged_layers} base weights "
                f"({merged.quantized_layers} through the NF4 round trip): "
                f"{len(merged.shards)} shard(s), {merged.total_bytes / GIB:.2f} GiB in "
                f"{merged.seconds:.1f} s",
                {"merged_layers": merged.merged_layers, "shards": merged.shards},
            )
            if gguf:
                paths = _convert(job, settings, spec, merged.out_dir, workdir, stop, note)
            else:
                paths = sorted(p for p in merged.out_dir.iterdir() if p.is_file())
            return publish_export(job, sessions, store, paths, fence, stop)
    except ExportStopped:
        with sessions() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
        return status or JobStatus.CANCELLED


def _convert(job, settings, spec, merged_dir, workdir, stop, note) -> list[Path]:
    from worker.export.gguf import export_gguf

    gguf = export_gguf(
        merged_dir,
        workdir / "gguf",
        quantization=spec["quantization"],
        name=gguf_name(job.model, (job.parent or {}).get("job") or job.id, spec),
        chat_template=settings.base_model(job.model).chat_template,
        should_stop=stop,
        llama_cpp_dir=settings.llama_cpp_dir,
    )
    shutil.rmtree(merged_dir)  # the disk it took is not needed while uploading
    note(
        f"Converted to GGUF {gguf.quantization} with llama.cpp's converter: "
        f"{gguf.gguf_bytes / GIB:.2f} GiB, {gguf.tensors} tensors in {gguf.seconds:.1f} s",
        {"tensor_types": gguf.tensor_types, "modelfile_template": gguf.modelfile_template},
    )
    for warning in gguf.warnings:
        note(warning, None, level="warn")
    return gguf.files


def gguf_name(base: str, source_job: str, spec: dict) -> str:
    """The GGUF's file name (without .gguf): the base, the job, the checkpoint's step."""
    name = f"{base.rsplit('/', 1)[-1]}-{source_job.split('-', 1)[-1][:8]}"
    if spec.get("step_number") is not None:
        name += f"-step-{spec['step_number']}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:100]


@retry_db
def publish_export(
    job: Job,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    paths: list[Path],
    fence: tuple,
    stop: StopCheck,
) -> str:
    """Upload each file, then in one transaction add their rows and finish the export; if
    it was cancelled meanwhile, delete what was uploaded and publish nothing."""
    from worker.export.stopping import ExportStopped

    records = []
    try:
        for path in paths:
            if stop():
                raise ExportStopped("cancelled while uploading")
            record = result_file(job, path)
            store.put_file(record.storage_key, path)
            records.append(record)
        with sessions() as session:
            session.add_all(records)
            total = sum(r.bytes for r in records)
            done = lifecycle.finish_export(
                session,
                session.get_one(Job, job.pk),
                result_files=[r.id for r in records],
                message=f"Export complete: {len(records)} file(s), {total / GIB:.2f} GiB",
                fence=fence,
            )
            if not done:
                session.rollback()
                raise ExportStopped("cancelled while publishing")
            session.commit()
    except BaseException:
        for record in records:
            store.delete(record.storage_key)
        raise
    return JobStatus.SUCCEEDED


def _events(sessions: sessionmaker[Session], job: Job):
    @retry_db
    def note(message: str, data: dict | None = None, level: str = "info") -> None:
        with sessions() as session:
            add_event(session, job.pk, message, level=level, data=data)
            session.commit()

    return note
