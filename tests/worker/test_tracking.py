"""Experiment tracking from the job process (worker.tracking, JobHooks' wiring): a real
`mlflow server` (tests/tracking_server.py) receives a run's params, per-step metrics and
the adapter; a server that stops mid-run costs one warning and never an exception; W&B in
offline mode writes the run to disk (read back from its .wandb file) without a network."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sqlalchemy import select, update

from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.migrate import upgrade
from app.models import Job, JobEvent, Team
from app.schemas import JobCreate
from app.services.files import store_upload
from app.services.jobs import create_job
from app.services.teams import create_team
from app.storage import open_store
from tests.tracking_server import free_port, running_mlflow_server
from tests.wandb_offline import read_finished_run
from worker.job_hooks import JobHooks
from worker.tracking import Tracking, wandb_tracker
from worker.tracking.mlflow_tracker import BOUNDED_HTTP

DATA = Path(__file__).resolve().parents[2] / "app" / "data"
BASE = "tiny-random-llama"


@pytest.fixture(autouse=True)
def mlflow_http_env() -> Iterator[None]:
    """Tracking sets MLflow's HTTP bounds in the environment of the (job) process; this
    one is pytest's, so they are put back as they were."""
    before = {name: os.environ.get(name) for name in BOUNDED_HTTP}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def a_job(integrations: list[dict], method: str = "dpo") -> Job:
    """A job as the worker reads it (not stored: Tracking needs only its fields)."""
    return Job(
        id=f"ftjob-{uuid.uuid4().hex[:24]}",
        model=BASE,
        method=method,
        hyperparameters={
            "n_epochs": 2,
            "batch_size": 4,
            "learning_rate_multiplier": 0.5,
            "beta": 0.1,
        },
        lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["all-linear"]},
        quantization={"type": "nf4", "double_quant": True, "compute_dtype": "auto"},
        training={"packing": True},
        max_seq_length=256,
        seed=7,
        suffix="tracked",
        training_file="file-train",
        validation_file="file-valid",
        parent={
            "fine_tuned_model": f"ft:{BASE}:research:sft:abcd1234",
            "job": "ftjob-parent",
            "checkpoint": None,
            "storage_key": "teams/t/files/file-adapter",
            "archive": "adapter",
        },
        lineage=[BASE, f"ft:{BASE}:research:sft:abcd1234"],
        integrations=integrations,
        team=Team(id="team-research", name="research"),
    )


def mlflow_integration() -> dict:
    return {"type": "mlflow", "mlflow": {"experiment": f"exp-{uuid.uuid4().hex[:8]}"}}


def rows(steps: range) -> list[dict]:
    """Metrics rows as the training loop sends them: DPO's rewards, a None, the totals."""
    return [
        {
            "step": step,
            "train_loss": 0.7 / step,
            "valid_loss": None,
            "learning_rate": 1e-4,
            "epoch": step / 10,
            "total_steps": 10,
            "train_reward_accuracy": 0.5 + step / 100,
            "train_reward_margin": step / 10,
        }
        for step in steps
    ]


def adapter_archive(directory: Path) -> Path:
    archive = directory / "adapter.tar.gz"
    archive.write_bytes(os.urandom(2048))
    return archive


def test_a_run_logs_params_per_step_metrics_and_the_adapter_to_mlflow(
    mlflow_tracking_uri: str, tmp_path: Path
) -> None:
    job = a_job([mlflow_integration()])
    settings = Settings(home=tmp_path, mlflow_tracking_uri=mlflow_tracking_uri)
    warnings: list[str] = []
    tracking = Tracking.for_job(job, settings, tmp_path, on_warning=warnings.append)

    runs = tracking.start()
    for row in rows(range(1, 6)):
        tracking.log_metrics(row)
    tracking.log_report("throughput", {"tokens_per_second": 1234.5})
    archive = adapter_archive(tmp_path)
    tracking.log_artifact(archive)
    tracking.finish("succeeded")

    assert warnings == []
    assert set(runs) == {"mlflow"}
    started = runs["mlflow"]
    assert started["url"] == (
        f"{mlflow_tracking_uri}/#/experiments/{started['experiment_id']}/runs/{started['run_id']}"
    )
    client = MlflowClient(tracking_uri=mlflow_tracking_uri)
    run = client.get_run(started["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == job.id
    assert run.data.tags["lathe.job_id"] == job.id
    assert run.data.tags["lathe.team"] == "research"
    assert run.data.tags["lathe.status"] == "succeeded"
    params = run.data.params
    assert params["method"] == "dpo"
    assert params["base_model"] == BASE
    assert params["hyperparameters.beta"] == "0.1"
    assert params["hyperparameters.n_epochs"] == "2"
    assert float(params["learning_rate"]) == pytest.approx(
        settings.base_model(BASE).learning_rate * 0.5
    )
    assert params["lora.r"] == "8"
    assert params["lora.target_modules"] == '["all-linear"]'
    assert params["training.packing"] == "True"
    assert params["parent.fine_tuned_model"] == f"ft:{BASE}:research:sft:abcd1234"
    assert "parent.storage_key" not in params  # the object store's key stays Lathe's
    history = client.get_metric_history(started["run_id"], "train_loss")
    assert [(m.step, m.value) for m in history] == [
        (s, pytest.approx(0.7 / s)) for s in range(1, 6)
    ]
    accuracy = client.get_metric_history(started["run_id"], "train_reward_accuracy")
    assert [m.step for m in accuracy] == [1, 2, 3, 4, 5]
    assert set(run.data.metrics) == {
        "train_loss",
        "learning_rate",
        "epoch",
        "train_reward_accuracy",
        "train_reward_margin",
    }  # no valid_loss (None), no step or total_steps
    assert "adapter.tar.gz" in [a.path for a in client.list_artifacts(started["run_id"])]
    downloaded = client.download_artifacts(started["run_id"], "adapter.tar.gz", str(tmp_path / "d"))
    assert Path(downloaded).read_bytes() == archive.read_bytes()
    assert [a.path for a in client.list_artifacts(started["run_id"], "lathe")] == [
        "lathe/throughput.json"
    ]


def test_a_resumed_attempt_continues_the_jobs_mlflow_run(
    mlflow_tracking_uri: str, tmp_path: Path
) -> None:
    job = a_job([mlflow_integration()], method="supervised")
    settings = Settings(home=tmp_path, mlflow_tracking_uri=mlflow_tracking_uri)
    warnings: list[str] = []
    client = MlflowClient(tracking_uri=mlflow_tracking_uri)

    first = Tracking.for_job(job, settings, tmp_path, on_warning=warnings.append)
    run_id = first.start()["mlflow"]["run_id"]
    for row in rows(range(1, 3)):
        first.log_metrics(row)
    first.finish("paused")
    assert client.get_run(run_id).info.status == "SCHEDULED"

    second = Tracking.for_job(job, settings, tmp_path, on_warning=warnings.append)
    assert second.start()["mlflow"]["run_id"] == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    for row in rows(range(3, 5)):
        second.log_metrics(row)
    second.finish("succeeded")

    assert warnings == []
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert steps == [1, 2, 3, 4]
    experiment = client.get_run(run_id).info.experiment_id
    assert len(client.search_runs([experiment])) == 1


def test_a_tracking_server_that_stops_mid_run_costs_one_warning_and_never_an_exception(
    tmp_path: Path,
) -> None:
    job = a_job([mlflow_integration()])
    warnings: list[str] = []
    with running_mlflow_server(tmp_path / "server") as server:
        settings = Settings(home=tmp_path, mlflow_tracking_uri=server.uri)
        tracking = Tracking.for_job(job, settings, tmp_path, on_warning=warnings.append)
        run_id = tracking.start()["mlflow"]["run_id"]
        for row in rows(range(1, 3)):
            tracking.log_metrics(row)
        server.stop()

        began = time.monotonic()
        for row in rows(range(3, 11)):
            tracking.log_metrics(row)
        tracking.log_report("throughput", {"tokens_per_second": 1.0})
        tracking.log_artifact(adapter_archive(tmp_path))
        tracking.finish("succeeded")
        rest_of_run = time.monotonic() - began

    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("MLflow tracking stopped: ")
    assert warnings[0].endswith("; training goes on")
    assert not tracking.active
    # Bounded retries: seconds (about 2 here), where MLflow's defaults take minutes.
    assert rest_of_run < 60, rest_of_run
    assert run_id


class Listener:
    """A TCP port that counts who connects to it: W&B's host, which offline must not."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def wandb_host() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.close()


def test_an_offline_wandb_run_holds_the_config_metrics_and_adapter_without_a_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wandb_host: Listener
) -> None:
    monkeypatch.delenv("WANDB_DIR", raising=False)
    job = a_job(
        [
            {
                "type": "wandb",
                "wandb": {"project": "lathe-tests", "name": "dpo-run", "tags": ["style"]},
            }
        ]
    )
    settings = Settings(home=tmp_path, wandb_mode="offline", wandb_base_url=wandb_host.url)
    warnings: list[str] = []
    workdir = tmp_path / "work"
    tracking = Tracking.for_job(job, settings, workdir, on_warning=warnings.append)

    runs = tracking.start()
    for row in rows(range(1, 4)):
        tracking.log_metrics(row)
    tracking.log_report("throughput", {"tokens_per_second": 1234.5})
    tracking.log_artifact(adapter_archive(tmp_path))
    tracking.finish("succeeded")
    tracking.log_metrics(rows(range(4, 5))[0])  # too late: no run to take it, no error

    assert warnings == []
    assert runs == {"wandb": {"url": None, "run_id": job.id}}  # offline: no page yet
    run = read_finished_run(workdir)
    assert (run.run_id, run.project, run.display_name) == (job.id, "lathe-tests", "dpo-run")
    assert run.tags == ["style", "lathe/finetune", f"lathe/{BASE}", f"lathe/{job.id}"]
    assert run.config["hyperparameters"]["beta"] == 0.1
    assert run.config["method"] == "dpo"
    assert run.config["lineage"] == [BASE, f"ft:{BASE}:research:sft:abcd1234"]
    assert [(h["_step"], h["train_loss"]) for h in run.history] == [
        (s, pytest.approx(0.7 / s)) for s in range(1, 4)
    ]
    assert run.history[0]["train_reward_accuracy"] == pytest.approx(0.51)
    assert "total_steps" not in run.history[0] and "valid_loss" not in run.history[0]
    assert run.artifacts == [
        {"name": f"{job.id}-adapter", "type": "model", "files": ["adapter.tar.gz"]}
    ]
    assert run.exit_code == 0
    assert wandb_host.connections == 0


def test_a_wandb_host_that_cannot_be_reached_is_a_warning_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    # wandb-core retries until init_timeout (20 s in the worker): a shorter wait here.
    monkeypatch.setattr(wandb_tracker, "INIT_TIMEOUT_S", 5.0)
    job = a_job([{"type": "wandb", "wandb": {"project": "lathe-tests"}}])
    settings = Settings(
        home=tmp_path,
        wandb_api_key="k" * 40,
        wandb_base_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
    )
    warnings: list[str] = []
    tracking = Tracking.for_job(job, settings, tmp_path, on_warning=warnings.append)

    assert tracking.start() == {}
    for row in rows(range(1, 4)):
        tracking.log_metrics(row)
    tracking.log_artifact(adapter_archive(tmp_path))
    tracking.finish("succeeded")

    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("Weights & Biases tracking stopped: ")
    assert not tracking.active


def test_integrations_the_worker_is_not_configured_for_are_skipped_with_a_warning(
    tmp_path: Path,
) -> None:
    job = a_job(
        [
            mlflow_integration(),
            {"type": "wandb", "wandb": {"project": "p"}},
            {"type": "neptune", "neptune": {}},
        ]
    )
    warnings: list[str] = []
    tracking = Tracking.for_job(job, Settings(home=tmp_path), tmp_path, on_warning=warnings.append)

    assert tracking.start() == {}
    tracking.log_metrics(rows(range(1, 2))[0])
    tracking.log_artifact(adapter_archive(tmp_path))
    tracking.finish("failed")

    assert warnings == [
        "MLflow tracking skipped: this worker has no LATHE_MLFLOW_TRACKING_URI; training goes on",
        "Weights & Biases tracking skipped: this worker has no LATHE_WANDB_API_KEY "
        "(nor LATHE_WANDB_MODE=offline); training goes on",
        "Tracking skipped for integration type 'neptune': unknown to this worker; training goes on",
    ]


def test_a_job_without_integrations_tracks_nothing_and_says_nothing(tmp_path: Path) -> None:
    warnings: list[str] = []
    tracking = Tracking.for_job(
        a_job([]), Settings(home=tmp_path), tmp_path, on_warning=warnings.append
    )
    assert tracking.start() == {}
    tracking.finish("succeeded")
    assert (tracking.trackers, warnings) == ([], [])


# JobHooks: the job process's callbacks, on the embedded stores (SQLite, a directory).


@pytest.fixture
def stored_job(tmp_path: Path) -> Iterator[tuple[Settings, object, Job]]:
    """A job in a SQLite database, loaded as the job process loads it."""
    settings = Settings(home=tmp_path)
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    store = open_store(settings.resolved_storage_url)
    with sessions() as session:
        team, _ = create_team(session, "trackers")
        data = (DATA / "sample_chat_valid.jsonl").read_bytes()
        upload = store_upload(
            session, store, team, "t.jsonl", "fine-tune", io.BytesIO(data), settings.max_file_bytes
        )
        job_id = create_job(
            session, settings, team, JobCreate(model=BASE, training_file=upload.id)
        ).id
    yield settings, sessions, job_id
    engine.dispose()


def load(sessions, job_id: str, integrations: list[dict]) -> Job:
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(integrations=integrations))
        session.commit()
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job.team.name  # loaded while the session is open, as job_training does
        return job


def events(sessions, job: Job) -> list[JobEvent]:
    with sessions() as session:
        return list(
            session.scalars(select(JobEvent).where(JobEvent.job_pk == job.pk).order_by(JobEvent.pk))
        )


def test_job_hooks_send_metrics_rows_and_reports_to_the_run_and_show_where_it_is(
    stored_job, mlflow_tracking_uri: str, tmp_path: Path
) -> None:
    base_settings, sessions, job_id = stored_job
    settings = base_settings.model_copy(update={"mlflow_tracking_uri": mlflow_tracking_uri})
    job = load(sessions, job_id, [mlflow_integration()])
    store = open_store(settings.resolved_storage_url)
    hooks = JobHooks(job, settings, sessions, store, f"ft:{BASE}:trackers::x", fence=())
    training = hooks.training_hooks()

    hooks.start_tracking(Tracking.for_job(job, settings, tmp_path))
    for row in rows(range(1, 4)):
        training.on_metrics(row)
    training.on_report("throughput", "1234 tokens/s", {"tokens_per_second": 1234.0})
    hooks.tracking.finish("succeeded")

    with sessions() as session:
        stats = session.scalar(select(Job.stats).where(Job.id == job_id))
    run = stats["tracking"]["mlflow"]
    assert set(run) == {"url", "run_id", "experiment_id"}
    assert stats["throughput"] == {"tokens_per_second": 1234.0}
    [announced] = [e for e in events(sessions, job) if e.message.startswith("Tracking this run")]
    assert announced.message == f"Tracking this run: MLflow {run['url']}"
    assert announced.data["kind"] == "tracking"
    client = MlflowClient(tracking_uri=mlflow_tracking_uri)
    history = client.get_metric_history(run["run_id"], "train_reward_margin")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(s / 10)) for s in (1, 2, 3)]
    assert [a.path for a in client.list_artifacts(run["run_id"], "lathe")] == [
        "lathe/throughput.json"
    ]


def test_job_hooks_make_a_tracker_that_cannot_start_a_warn_event(
    stored_job, tmp_path: Path
) -> None:
    base_settings, sessions, job_id = stored_job
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = base_settings.model_copy(update={"mlflow_tracking_uri": down})
    job = load(sessions, job_id, [mlflow_integration()])
    store = open_store(settings.resolved_storage_url)
    hooks = JobHooks(job, settings, sessions, store, f"ft:{BASE}:trackers::x", fence=())

    hooks.start_tracking(Tracking.for_job(job, settings, tmp_path))
    hooks.training_hooks().on_metrics(rows(range(1, 2))[0])
    hooks.tracking.finish("succeeded")

    warned = [e.message for e in events(sessions, job) if e.level == "warn"]
    tracking_warnings = [m for m in warned if "tracking" in m]
    assert tracking_warnings == [
        "MLflow tracking stopped: ConnectionRefusedError: [Errno 111] Connection refused; "
        "training goes on"
    ]
    with sessions() as session:
        stats = session.scalar(select(Job.stats).where(Job.id == job_id)) or {}
    assert "tracking" not in stats


@pytest.mark.parametrize(
    ("tracking_uri", "shown"),
    [
        (
            "https://svc:s3cret@mlflow.example.com:8443/base/",
            "https://mlflow.example.com:8443/base",
        ),
        ("http://token@[::1]:5000", "http://[::1]:5000"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_an_mlflow_run_url_never_shows_the_tracking_uris_credentials(
    tracking_uri: str, shown: str
) -> None:
    """The URL goes to the team (job, events, dashboard): the operator's credentials in
    LATHE_MLFLOW_TRACKING_URI stay out of it."""
    from worker.tracking.job_facts import JobFacts
    from worker.tracking.mlflow_tracker import MlflowTracker

    facts = JobFacts(job_id="ftjob-1", team="t", base_model="m", method="supervised")
    tracker = MlflowTracker(tracking_uri, "experiment", None, facts)
    tracker.run_id = "abc"
    assert tracker._run_url("3") == f"{shown}/#/experiments/3/runs/abc"
