"""Supervised fine-tuning, then DPO on top of it, through the official openai SDK, on the
production topology (Postgres, Redis, S3, a real `lathe worker`), tracked to a real
`mlflow server` and to W&B in offline mode; and a tracking server that dies mid-job."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from app.compat import tarfile  # filter="data" on Python 3.11.2 too
from app.migrate import upgrade
from tests.conftest import create_team_key, serve_in_thread
from tests.e2e.conftest import start_worker, stop_worker, wait_for, wait_ready
from tests.tracking_server import running_mlflow_server

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[2] / "app" / "data"
MODEL = "tiny-random-llama"
FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A tracking server of this module's own: the last test stops it mid-job."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-dpo")) as server:
        yield server


@pytest.fixture(scope="module")
def topology(
    stack_env: dict[str, str],
    postgres_server,
    mlflow_server,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[OpenAI, dict[str, str]]]:
    """The API and one worker on a database and broker of their own, with MLflow and W&B
    (offline) configured on both; an SDK client of a new team."""
    url = postgres_server.create_database("lathe_dpo")
    upgrade(url)
    env = {
        **stack_env,
        "LATHE_DATABASE_URL": url,
        "LATHE_BROKER_URL": stack_env["LATHE_BROKER_URL"][:-1] + "7",
        "LATHE_GPU_CLASSES": "{}",
        "LATHE_HEARTBEAT_SECONDS": "0.5",
        "LATHE_SCHEDULER_INTERVAL_SECONDS": "0.2",
        "LATHE_MLFLOW_TRACKING_URI": mlflow_server.uri,
        "LATHE_WANDB_MODE": "offline",
    }
    # W&B's offline runs are written where the worker's WANDB_DIR says (else in the job's
    # scratch directory, gone with it).
    wandb_dir = str(tmp_path_factory.mktemp("wandb"))
    log_path = tmp_path_factory.mktemp("dpo-worker") / "worker.log"
    worker = start_worker({**env, "WANDB_DIR": wandb_dir}, "cpu-dpo", "dpo@e2e", 4.0, log_path)
    try:
        wait_ready(worker, log_path)
        with serve_in_thread(env) as api:
            key = create_team_key(env, "dpo")[1]
            sdk = OpenAI(base_url=f"{api}/v1", api_key=key, max_retries=0)
            yield sdk, {**env, "WANDB_DIR": wandb_dir}
    finally:
        stop_worker(worker)
        postgres_server.drop_database(url)


def upload(sdk: OpenAI, name: str) -> str:
    return sdk.files.create(file=(DATA / name).open("rb"), purpose="fine-tune").id


def run_to_end(sdk: OpenAI, job_id: str):
    def finished():
        job = sdk.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in FINAL else None

    return wait_for(finished, 400, what=f"job {job_id} to finish")


def metrics_of(sdk: OpenAI, job_id: str) -> list[dict]:
    events = sdk.fine_tuning.jobs.list_events(job_id, limit=100)
    return sorted((e.data for e in events if e.type == "metrics"), key=lambda row: row["step"])


def test_sft_then_dpo_on_it_tracked_in_mlflow_and_wandb(topology, tmp_path: Path) -> None:
    sdk, env = topology
    sft = sdk.fine_tuning.jobs.create(
        model=MODEL,
        training_file=upload(sdk, "sample_chat.jsonl"),
        hyperparameters={"n_epochs": 1, "batch_size": 8},
        seed=5,
        extra_body={"lora": {"dropout": 0.0}, "max_seq_length": 256},
    )
    sft = run_to_end(sdk, sft.id)
    assert sft.status == "succeeded", sft.error

    dpo = sdk.fine_tuning.jobs.create(
        model=sft.fine_tuned_model,
        training_file=upload(sdk, "sample_preference.jsonl"),
        validation_file=upload(sdk, "sample_preference_valid.jsonl"),
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 3, "batch_size": 8}},
        },
        seed=5,
        extra_body={
            "lora": {"dropout": 0.0},
            "max_seq_length": 256,
            "integrations": [
                {"type": "wandb", "wandb": {"project": "lathe-e2e", "tags": ["dpo"]}},
                {"type": "mlflow", "mlflow": {"experiment": "lathe-e2e-dpo"}},
            ],
        },
    )
    raw = dpo.to_dict()
    assert raw["method"]["type"] == "dpo" and raw["method"]["dpo"]["hyperparameters"]["beta"] == 0.1
    assert raw["lineage"] == [MODEL, sft.fine_tuned_model]
    assert raw["parent"]["job"] == sft.id
    dpo = run_to_end(sdk, dpo.id)
    assert dpo.status == "succeeded", dpo.error

    rows = metrics_of(sdk, dpo.id)
    # The reference is the SFT model: policy and reference start equal (dropout 0), so the
    # first step's loss is -log(sigmoid(0)) = log 2 and its rewards are zero.
    first = rows[0]
    assert first["step"] == 1
    assert abs(first["train_loss"] - math.log(2)) < 1e-3, first
    assert abs(first["train_reward_margin"]) < 1e-3, first
    evaluated = [r for r in rows if r.get("valid_reward_accuracy") is not None]
    assert evaluated, rows
    assert evaluated[-1]["valid_reward_accuracy"] > 0.5, evaluated[-1]
    assert evaluated[-1]["valid_reward_margin"] > 0, evaluated[-1]

    # The adapter loads on the base with peft.
    files = {sdk.files.retrieve(fid).filename: fid for fid in dpo.result_files}
    with tarfile.open(
        fileobj=io.BytesIO(sdk.files.content(files["adapter.tar.gz"]).content)
    ) as tar:
        tar.extractall(tmp_path / "adapter", filter="data")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(Path(env["LATHE_HOME"]) / "models" / MODEL)
    assert any(
        "lora_B" in n
        for n, _ in PeftModel.from_pretrained(base, tmp_path / "adapter").named_parameters()
    )

    # MLflow has the run: params, per-step metrics, the adapter.
    from mlflow.tracking import MlflowClient

    tracking = dpo.to_dict()["stats"]["tracking"]
    client = MlflowClient(tracking_uri=env["LATHE_MLFLOW_TRACKING_URI"])
    run = client.get_run(tracking["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["hyperparameters.beta"] == "0.1"
    history = client.get_metric_history(run.info.run_id, "train_reward_margin")
    assert len(history) == len([r for r in rows if "train_reward_margin" in r])
    assert "adapter.tar.gz" in {a.path for a in client.list_artifacts(run.info.run_id)}
    shown = {i["type"]: i for i in dpo.to_dict()["integrations"]}
    assert shown["mlflow"]["url"] == tracking["mlflow"]["url"]
    assert tracking["wandb"]["run_id"]
    assert list(Path(env["WANDB_DIR"]).rglob("*.wandb")), "no offline W&B run written"


def test_a_tracking_server_that_stops_mid_job_leaves_the_job_succeeded(
    topology, mlflow_server
) -> None:
    sdk, _ = topology
    job = sdk.fine_tuning.jobs.create(
        model=MODEL,
        training_file=upload(sdk, "sample_chat.jsonl"),
        hyperparameters={"n_epochs": 4, "batch_size": 2},
        extra_body={
            "max_seq_length": 128,
            "integrations": [{"type": "mlflow", "mlflow": {"experiment": "lathe-e2e-down"}}],
        },
    )
    # Stopped once the run is tracked and training has logged a step.
    wait_for(lambda: metrics_of(sdk, job.id), 240, what="the first logged step")
    mlflow_server.stop()
    job = run_to_end(sdk, job.id)
    assert job.status == "succeeded", job.error
    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=100))
    warnings = [e.message for e in events if e.level == "warn"]
    assert any(m.startswith("MLflow tracking stopped") for m in warnings), warnings
