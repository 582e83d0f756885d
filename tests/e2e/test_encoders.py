"""Encoder classifiers as an operator runs them: BERT- and RoBERTa-shaped base models saved
the way their hub checkpoints are (generated here, no download), declared by name and path
only, a four-topic news file, and a job through the official openai SDK. On the production
topology (Postgres, Redis, S3 and a real `lathe worker`) and on the embedded server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from app.compat import tarfile  # filter="data" on Python 3.11.2 too
from app.migrate import upgrade
from tests.conftest import create_team_key, serve_in_thread
from tests.e2e.conftest import free_port, start_worker, stop_worker, wait_for, wait_ready
from tests.e2e.processes import embedded_home, kill_all
from tests.encoders import build_tiny_bert, build_tiny_roberta

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[2] / "app" / "data"
FINAL = {"succeeded", "failed", "cancelled"}
CLASSES = ["Business", "Sci/Tech", "Sports", "World"]  # sorted: index i is class i
CHANCE = 1 / len(CLASSES)
ENCODER_CLASS = "cpu-encoders"
# Few steps on a tiny random encoder: enough to learn the topics' words well above chance.
HYPERPARAMETERS = {"n_epochs": 6, "batch_size": 8, "learning_rate_multiplier": 1.0}


@pytest.fixture(scope="module")
def encoder_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> directory: bert-base-shaped, roberta-base-shaped, and a BERT fine-tuned
    before with a 2-label head."""
    root = tmp_path_factory.mktemp("encoders")
    return {
        "tiny-bert": build_tiny_bert(root / "tiny-bert"),
        "tiny-roberta": build_tiny_roberta(root / "tiny-roberta"),
        "tiny-bert-2label": build_tiny_bert(root / "tiny-bert-2label", head_labels=2),
    }


def base_models_json(models: dict[str, Path]) -> str:
    """LATHE_BASE_MODELS as an operator writes it: a name, a path and a learning rate (high,
    as for the tiny Llama: random weights and few steps). The kind (encoder), the LoRA
    targets and the shape come from each model's config.json."""
    return json.dumps(
        [{"name": name, "path": str(path), "learning_rate": 1e-2} for name, path in models.items()]
    )


@pytest.fixture(scope="module")
def topology(
    stack_env: dict[str, str],
    postgres_server,
    encoder_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[OpenAI, dict[str, str]]]:
    """The API under uvicorn and one `lathe worker` on a database and broker of their own,
    with the encoders declared; an SDK client of a new team."""
    url = postgres_server.create_database("lathe_encoders")
    upgrade(url)
    env = {
        **stack_env,
        "LATHE_DATABASE_URL": url,
        "LATHE_BROKER_URL": stack_env["LATHE_BROKER_URL"][:-1] + "6",
        "LATHE_BASE_MODELS": base_models_json(encoder_models),
        "LATHE_GPU_CLASSES": "{}",
        "LATHE_HEARTBEAT_SECONDS": "0.5",
        "LATHE_SCHEDULER_INTERVAL_SECONDS": "0.2",
    }
    log_path = tmp_path_factory.mktemp("encoder-worker") / "worker.log"
    worker = start_worker(env, ENCODER_CLASS, "encoders@e2e", 4.0, log_path)
    try:
        wait_ready(worker, log_path)
        with serve_in_thread(env) as api:
            key = create_team_key(env, "encoders")[1]
            yield OpenAI(base_url=f"{api}/v1", api_key=key, max_retries=0), env
    finally:
        stop_worker(worker)
        postgres_server.drop_database(url)


def upload(sdk: OpenAI, name: str):
    return sdk.files.create(file=(DATA / name).open("rb"), purpose="fine-tune")


def train_news(sdk: OpenAI, model: str, **extra):
    """A news classifier on `model`, run to its end; the finished job."""
    train, valid = upload(sdk, "sample_news.jsonl"), upload(sdk, "sample_news_valid.jsonl")
    job = sdk.fine_tuning.jobs.create(
        model=model,
        training_file=train.id,
        validation_file=valid.id,
        hyperparameters=HYPERPARAMETERS,
        seed=1,
        extra_body={"max_seq_length": 64, **extra},
    )
    assert job.status == "queued"

    def finished():
        current = sdk.fine_tuning.jobs.retrieve(job.id)
        return current if current.status in FINAL else None

    return wait_for(finished, 400, what=f"the {model} job to finish")


def events_of(sdk: OpenAI, job_id: str) -> list:
    return list(sdk.fine_tuning.jobs.list_events(job_id, limit=100))


def assert_learned_the_topics(report: dict) -> None:
    assert report["classes"] == CLASSES
    assert report["examples"] == 40
    assert report["accuracy"] > CHANCE + 0.25, report
    matrix = report["confusion_matrix"]
    assert len(matrix) == 4 and all(len(row) == 4 for row in matrix)
    assert [sum(row) for row in matrix] == [10, 10, 10, 10]  # rows: the true class
    assert [c["class"] for c in report["per_class"]] == CLASSES


def test_a_bert_classifier_trains_through_the_sdk_and_loads_with_peft(
    topology, encoder_models: dict[str, Path], tmp_path: Path
) -> None:
    sdk, _ = topology
    job = train_news(sdk, "tiny-bert")
    assert job.status == "succeeded", job.error
    raw = job.to_dict()
    assert raw["lora"]["target_modules"] == ["query", "value"]  # BERT's default, from config
    report = raw["stats"]["classification"]
    assert_learned_the_topics(report)

    events = events_of(sdk, job.id)
    metrics = [e.data for e in events if e.type == "metrics"]
    assert any(m.get("valid_macro_f1") is not None for m in metrics)
    assert any(e.message.startswith("Classification on 40 validation examples") for e in events)

    files = {sdk.files.retrieve(fid).filename: fid for fid in job.result_files}
    archive = sdk.files.content(files["adapter.tar.gz"]).content
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp_path / "adapter", filter="data")
    classes = json.loads((tmp_path / "adapter" / "classes.json").read_text())
    assert classes == CLASSES
    saved = json.loads((tmp_path / "adapter" / "classification_report.json").read_text())
    assert saved["confusion_matrix"] == report["confusion_matrix"]

    # The adapter on the full-precision base, with no Lathe code: the classes it predicts
    # for the validation file agree with what the job measured on its 4-bit base.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(
        encoder_models["tiny-bert"], num_labels=len(classes)
    )
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(encoder_models["tiny-bert"])
    lines = (DATA / "sample_news_valid.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    inputs = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**inputs).logits.argmax(-1).tolist()
    right = sum(classes[p] == r["label"] for p, r in zip(predicted, rows, strict=True))
    accuracy = right / len(rows)
    assert abs(accuracy - report["accuracy"]) <= 0.1, (accuracy, report["accuracy"])


def test_a_roberta_classifier_trains(topology) -> None:
    sdk, _ = topology
    job = train_news(sdk, "tiny-roberta")
    assert job.status == "succeeded", job.error
    assert_learned_the_topics(job.to_dict()["stats"]["classification"])


def test_a_checkpoint_with_a_two_label_head_gets_a_new_head(topology) -> None:
    sdk, _ = topology
    job = train_news(sdk, "tiny-bert-2label")
    assert job.status == "succeeded", job.error
    assert_learned_the_topics(job.to_dict()["stats"]["classification"])
    messages = [e.message for e in events_of(sdk, job.id)]
    assert any("2 outputs" in m and "replaced" in m for m in messages), messages


def test_a_chat_file_on_an_encoder_is_refused_at_creation(topology) -> None:
    sdk, _ = topology
    chat = upload(sdk, "sample_chat_valid.jsonl")
    before = len(sdk.fine_tuning.jobs.list(limit=100).data)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.fine_tuning.jobs.create(model="tiny-bert", training_file=chat.id)
    assert info.value.code == "unsupported_format_for_model"
    assert "tiny-bert" in info.value.message and "chat" in info.value.message
    assert len(sdk.fine_tuning.jobs.list(limit=100).data) == before  # nothing stored


def test_the_embedded_server_trains_a_bert_classifier(
    encoder_models: dict[str, Path], tmp_path: Path
) -> None:
    env, key = embedded_home(tmp_path / "home", "embedded-encoders")
    env["LATHE_BASE_MODELS"] = base_models_json({"tiny-bert": encoder_models["tiny-bert"]})
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        sdk = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)

        def ready():
            try:
                return sdk.models.list().data
            except openai.APIConnectionError:
                return None

        models = wait_for(ready, 60, what="the embedded server")
        assert [(m.id, m.to_dict().get("kind")) for m in models] == [("tiny-bert", "encoder")]
        job = train_news(sdk, "tiny-bert")
        assert job.status == "succeeded", job.error
        assert_learned_the_topics(job.to_dict()["stats"]["classification"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        kill_all(tmp_path / "home")
