"""The worker's row in the pool registry: what it is, a heartbeat, and drain handling.

The Celery parent process registers at start, beats every `heartbeat_seconds` from a
thread, and marks itself stopped at shutdown. The task's claim shows its job on the row
(app.services.lifecycle.claim). An operator's drain is seen on the next
beat: the worker stops consuming its class queue, finishes the job it has, then shows
`drained`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.domain.jobs import JobStatus
from app.domain.workers import WorkerState
from app.models import Job, Worker, now
from app.services import lifecycle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hardware:
    gpu_name: str
    gpu_class: str
    memory_gb: float
    gpus: int = 1
    """GPUs of the host this worker manages (jobs run side by side, a multi-GPU job on
    several)."""


def visible_gpus() -> list[str] | None:
    """The GPU indexes this worker may use: CUDA_VISIBLE_DEVICES when set, else None."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    return [d.strip() for d in visible.split(",") if d.strip()]


def class_from_gpu_name(name: str, memory_gb: float) -> str:
    """ "NVIDIA H100 80GB HBM3", 79.6 -> "h100-80gb": the model token plus its memory."""
    tokens = re.findall(r"[A-Za-z]+\d+[A-Za-z]*|\d+[A-Za-z]+", name.replace("NVIDIA", ""))
    model = next((t for t in tokens if not t.lower().endswith("gb")), name.split()[-1])
    stated = re.search(r"(\d+)\s*GB", name, re.IGNORECASE)  # "80GB" in the name wins
    return f"{model.lower()}-{stated.group(1) if stated else round(memory_gb)}gb"


def detect_hardware() -> Hardware:
    """The visible GPUs through nvidia-smi (no torch in the parent): the first one's name
    and memory, and how many; else the CPU. A host's GPUs are taken to be alike (a mixed
    host runs one worker per kind, each with its CUDA_VISIBLE_DEVICES)."""
    if shutil.which("nvidia-smi"):
        visible = visible_gpus()
        try:
            lines = (
                subprocess.run(
                    [
                        "nvidia-smi",
                        *(["-i", ",".join(visible)] if visible else []),
                        "--query-gpu=name,memory.total",
                        "--format=csv,noheader,nounits",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=True,
                )
                .stdout.strip()
                .splitlines()
            )
            name, mib = (part.strip() for part in lines[0].split(","))
            memory_gb = float(mib) / 1024
            return Hardware(
                name, class_from_gpu_name(name, memory_gb), round(memory_gb, 1), len(lines)
            )
        except (subprocess.SubprocessError, OSError, ValueError, IndexError):
            log.warning("nvidia-smi did not answer; registering as a CPU worker")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return Hardware("cpu", "cpu", round(memory, 1))


def resolve_hardware(settings: Settings) -> Hardware:
    """Detected hardware, with LATHE_WORKER_GPU_CLASS / _MEMORY_GB / _GPUS taking
    precedence (on a CPU worker, LATHE_WORKER_GPUS=N runs N jobs side by side, or a job's
    N ranks on gloo: how tests stand in for a multi-GPU host)."""
    found = detect_hardware()
    return Hardware(
        found.gpu_name,
        settings.worker_gpu_class or found.gpu_class,
        settings.worker_memory_gb or found.memory_gb,
        settings.worker_gpus or found.gpus,
    )


def worker_id() -> str:
    """The registry id of the worker this process serves (set by the worker's parent)."""
    return os.environ.get("LATHE_WORKER_ID") or socket.gethostname()


def default_worker_id(gpu_class: str) -> str:
    return f"lathe-{gpu_class}-{os.getpid()}@{socket.gethostname()}"


class Heartbeat:
    """Registers the worker and keeps its row alive from a daemon thread."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        worker_id: str,
        hardware: Hardware,
        on_drain,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.worker_id = worker_id
        self.hardware = hardware
        self.on_drain = on_drain  # called once when a drain is first seen
        self.draining = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lathe-heartbeat", daemon=True)

    def register(self) -> None:
        with self.sessions() as session:
            row = session.scalar(select(Worker).where(Worker.id == self.worker_id))
            if row is None:
                row = Worker(id=self.worker_id, jobs_done=0)
                session.add(row)
            row.host = socket.gethostname()
            row.gpu_name = self.hardware.gpu_name
            row.gpu_class = self.hardware.gpu_class
            row.memory_gb = self.hardware.memory_gb
            row.gpus = self.hardware.gpus
            row.status = WorkerState.ACTIVE
            row.current_job = None
            row.started_at = now()
            row.last_seen = time.time()
            self._requeue_orphans(session)
            session.commit()
        log.info("registered worker %s (%s)", self.worker_id, self.hardware)

    def _requeue_orphans(self, session: Session) -> None:
        """Jobs still `running` under this worker's id belonged to a previous incarnation
        that died (a restart within the lease): they go back in line, or fail once the
        job has lost its worker too often."""
        orphans = session.scalars(
            select(Job).where(Job.worker == self.worker_id, Job.status == JobStatus.RUNNING.value)
        ).all()
        for job in orphans:  # a restart is a loss like any other: it counts to the limit
            lifecycle.requeue(session, job, f"Worker {self.worker_id} restarted")
        # Runs that were stopping (paused, cancelled) when it died hold nothing any more.
        session.execute(
            update(Job)
            .where(Job.worker == self.worker_id, Job.devices.is_not(None))
            .values(devices=None)
        )

    def start(self) -> None:
        self.register()
        self._thread.start()

    def beat(self) -> None:
        with self.sessions() as session:
            row = session.scalar(select(Worker).where(Worker.id == self.worker_id))
            if row is None:  # removed by an operator: register again
                session.rollback()
                self.register()
                return
            row.last_seen = time.time()
            if row.status == WorkerState.LOST:  # we were silent too long but are alive: back in
                row.status = WorkerState.ACTIVE
            if row.status in (WorkerState.DRAINING, WorkerState.DRAINED):
                if not self.draining:
                    self.draining = True
                    self.on_drain()
                running = lifecycle.busy_gpus(session, self.worker_id).get(self.worker_id, 0)
                row.status = WorkerState.DRAINED if not running else WorkerState.DRAINING
            elif self.draining and row.status == WorkerState.ACTIVE:  # an operator undrained us
                self.draining = False
                self.on_drain(resume=True)
            session.commit()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                self.beat()
            except Exception:  # the database may be briefly away: try again next beat
                log.exception("heartbeat failed")

    def stop(self) -> None:
        self._stop.set()
        with self.sessions() as session:
            session.execute(
                update(Worker)
                .where(Worker.id == self.worker_id)
                .values(status=WorkerState.STOPPED, last_seen=time.time())
            )
            session.commit()
