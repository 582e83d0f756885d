"""The whole path with the official openai SDK: upload, QLoRA on a real worker process,
events, checkpoints, and a downloaded adapter that peft loads on the base model."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from app.compat import tarfile  # filter="data" on Python 3.11.2 too
from tests.conftest import create_team_key
from tests.e2e.conftest import wait_for
from tests.openapi import schema_errors

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[2] / "app" / "data"
MODEL = "tiny-random-llama"
FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def sdk(live_api: str, stack_env: dict[str, str], workers) -> OpenAI:
    _, key = create_team_key(stack_env, "sdk")
    return OpenAI(base_url=f"{live_api}/v1", api_key=key, max_retries=0)


def finished(sdk: OpenAI, job_id: str):
    job = sdk.fine_tuning.jobs.retrieve(job_id)
    return job if job.status in FINAL else None


def test_qlora_job_end_to_end(
    sdk: OpenAI, stack_env: dict[str, str], live_api: str, tmp_path: Path
) -> None:
    train = sdk.files.create(file=(DATA / "sample_chat.jsonl").open("rb"), purpose="fine-tune")
    valid = sdk.files.create(
        file=(DATA / "sample_chat_valid.jsonl").open("rb"), purpose="fine-tune"
    )
    assert (train.status, train.bytes) == ("processed", (DATA / "sample_chat.jsonl").stat().st_size)
    job = sdk.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train.id,
        validation_file=valid.id,
        hyperparameters={"n_epochs": 2, "batch_size": 8},
        suffix="e2e",
        seed=3,
        extra_body={
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "quantization": {"type": "nf4", "double_quant": True},
            "max_seq_length": 256,
        },
    )
    assert job.status == "queued"
    job = wait_for(lambda: finished(sdk, job.id), 300, what="the job to finish")
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith(f"ft:{MODEL}:sdk-")
    assert job.trained_tokens > 0
    assert job.finished_at >= job.created_at
    assert len(job.result_files) == 2
    # Lathe's figures ride along as extra fields the SDK keeps.
    stats = job.to_dict()["stats"]
    assert stats["tokens"]["train"]["examples"] > 0
    assert stats["throughput"]["tokens_per_second"] > 0
    assert stats["model"]["trainable_parameters"] > 0
    assert stats["sample"]["source"] == "validation"
    assert job.to_dict()["training"]["packing"] is True
    # The finished job as sent, its events and checkpoints, match the served document.
    document = httpx.get(f"{live_api}/openapi.json").json()
    raw = sdk.fine_tuning.jobs.with_raw_response
    for name, body in (
        ("FineTuningJob", raw.retrieve(job.id).http_response.json()),
        ("ListPage_FineTuningJobEvent_", raw.list_events(job.id, limit=100).http_response.json()),
        (
            "ListPage_FineTuningJobCheckpoint_",
            sdk.fine_tuning.jobs.checkpoints.with_raw_response.list(job.id).http_response.json(),
        ),
    ):
        assert not schema_errors(document, name, body), (name, schema_errors(document, name, body))

    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e.data for e in events if e.type == "metrics"]
    assert metrics, [e.message for e in events]
    assert {"step", "train_loss", "learning_rate"} <= set(metrics[0])
    assert any(m.get("valid_loss") is not None for m in metrics)
    assert any(m.get("valid_mean_token_accuracy") is not None for m in metrics)
    assert events[0].message.startswith("The job has successfully completed")

    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(job.id).data
    assert len(checkpoints) == 2  # one per epoch
    assert checkpoints[0].step_number > checkpoints[1].step_number
    assert checkpoints[0].fine_tuned_model_checkpoint.startswith(job.fine_tuned_model)

    files = {sdk.files.retrieve(fid).filename: fid for fid in job.result_files}
    assert set(files) == {"adapter.tar.gz", "metrics.csv"}
    rows = list(csv.DictReader(io.StringIO(sdk.files.content(files["metrics.csv"]).text)))
    assert {"step", "train_loss", "valid_loss", "learning_rate"} <= set(rows[0])
    assert len(rows) == len(metrics)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])

    archive = sdk.files.content(files["adapter.tar.gz"]).content
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())
        tar.extractall(tmp_path / "adapter", filter="data")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(Path(stack_env["LATHE_HOME"]) / "models" / MODEL)
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert any("lora_A" in name for name, _ in tuned.named_parameters())

    assert job.fine_tuned_model in [m.id for m in sdk.models.list().data]


def test_bad_dataset_is_refused_with_a_line_number(sdk: OpenAI) -> None:
    bad = b'{"text": "fine"}\n{"text": "also fine"}\n{"text": 42}\n'
    with pytest.raises(openai.BadRequestError) as info:
        sdk.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert "line 3" in info.value.message
    assert info.value.code == "invalid_type"


def test_another_teams_job_is_404(sdk: OpenAI, live_api: str, stack_env) -> None:
    _, other_key = create_team_key(stack_env, "other")
    other = OpenAI(base_url=f"{live_api}/v1", api_key=other_key, max_retries=0)
    job = sdk.fine_tuning.jobs.list(limit=1).data[0]
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(job.training_file)
