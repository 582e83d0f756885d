"""Encoder base models at the API: the kind read from config.json or declared, LoRA targets
by family, the 400 for a file an encoder cannot learn from, and the kind in /v1/models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.domain.jobs import JobStatus
from app.main import create_app
from app.models import Job, Team
from tests.api.conftest import TeamClient
from tests.api.datasets import CHAT, jsonl
from tests.conftest import create_team_key, settings_from

# What bert-base-uncased's config.json holds, at a tiny size (transformers' BertConfig
# writes these keys; the API reads the file as plain JSON).
TINY_BERT_CONFIG = {
    "architectures": ["BertForPreTraining"],
    "model_type": "bert",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 256,
    "vocab_size": 1000,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}
TINY_ROBERTA_CONFIG = {
    "architectures": ["RobertaForMaskedLM"],
    "model_type": "roberta",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 514,
}
NEWS = jsonl(
    [
        {"text": f"story {i}", "label": topic}
        for i, topic in enumerate(["World", "Sports", "Business", "Sci/Tech"] * 3)
    ]
)


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def encoder_env(api_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The API's stack with encoders declared as an operator would: by a directory holding
    the model (here only its config.json: the API reads nothing else), by name alone in
    models_dir, declared causal over its config, and on S3 (not read: declared)."""
    home = tmp_path_factory.mktemp("encoder-home")
    models = tmp_path_factory.mktemp("encoder-models")
    bert = write_config(models / "tiny-bert", TINY_BERT_CONFIG)
    write_config(home / "models" / "tiny-roberta", TINY_ROBERTA_CONFIG)
    base_models = [
        {"name": "tiny-bert", "path": str(bert)},
        {"name": "tiny-roberta"},  # models_dir/tiny-roberta
        {"name": "bert-as-decoder", "path": str(bert), "kind": "causal"},
        {"name": "s3-distilbert", "path": "s3://models/distilbert", "kind": "encoder",
         "architecture": "distilbert", "hidden_size": 64, "num_layers": 2},
        {"name": "tiny-random-llama", "kind": "causal", "hidden_size": 64, "num_layers": 2,
         "vocab_size": 384, "parameters": 130000},
    ]  # fmt: skip
    return {**api_env, "LATHE_HOME": str(home), "LATHE_BASE_MODELS": json.dumps(base_models)}


@pytest.fixture(scope="module")
def encoder_api(encoder_env: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_from(encoder_env))) as client:
        yield client


@pytest.fixture
def team(encoder_api: TestClient, encoder_env: dict[str, str]) -> TeamClient:
    return TeamClient(*create_team_key(encoder_env, "encoders"), encoder_api)


def create(team: TeamClient, model: str, training_file: str, **body):
    return team.post(
        "/v1/fine_tuning/jobs", json={"model": model, "training_file": training_file, **body}
    )


def creation_data(team: TeamClient, job_id: str) -> dict:
    """What the job was created with, as its "Validating" event shows it."""
    events = team.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    return next(e["data"] for e in events if e["message"].startswith("Validating"))


def team_jobs(sessions, team: TeamClient) -> int:
    with sessions() as session:
        team_pk = select(Team.pk).where(Team.id == team.id).scalar_subquery()
        return session.scalar(select(func.count()).where(Job.team_pk == team_pk))


def test_a_chat_file_on_an_encoder_is_refused_naming_model_and_format(team, sessions) -> None:
    chat = team.upload(CHAT).json()["id"]
    before = team_jobs(sessions, team)

    resp = create(team, "tiny-bert", chat)

    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_format_for_model", "training_file")
    message = error["message"]
    assert "'tiny-bert' is an encoder (bert)" in message
    assert f"training_file {chat!r} is chat" in message
    assert '{"text", "label"}' in message
    assert team_jobs(sessions, team) == before  # nothing stored
    assert team.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_a_classification_job_on_bert_adapts_query_and_value_by_default(team) -> None:
    news = team.upload(NEWS).json()["id"]

    resp = create(team, "tiny-bert", news, max_seq_length=128)

    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "queued"
    data = creation_data(team, resp.json()["id"])
    assert data["lora"]["target_modules"] == ["query", "value"]
    assert 0 < data["memory_gb"] < 8


def test_an_encoder_named_only_by_its_directory_in_models_dir_is_read(team) -> None:
    news = team.upload(NEWS).json()["id"]
    resp = create(team, "tiny-roberta", news)
    assert resp.status_code == 200, resp.text
    assert creation_data(team, resp.json()["id"])["lora"]["target_modules"] == ["query", "value"]
    assert create(team, "tiny-roberta", team.upload(CHAT).json()["id"]).status_code == 400


def test_the_jobs_own_target_modules_win(team) -> None:
    news = team.upload(NEWS).json()["id"]
    resp = create(team, "tiny-bert", news, lora={"target_modules": ["query", "key", "value"]})
    assert resp.status_code == 200, resp.text
    data = creation_data(team, resp.json()["id"])
    assert data["lora"]["target_modules"] == ["query", "key", "value"]


def test_a_declared_kind_wins_over_config_json(team) -> None:
    chat = team.upload(CHAT).json()["id"]
    resp = create(team, "bert-as-decoder", chat)
    assert resp.status_code == 200, resp.text
    assert creation_data(team, resp.json()["id"])["lora"]["target_modules"] == ["all-linear"]


def test_a_model_on_s3_goes_by_its_declaration(team) -> None:
    news = team.upload(NEWS).json()["id"]
    resp = create(team, "s3-distilbert", news)
    assert resp.status_code == 200, resp.text
    assert creation_data(team, resp.json()["id"])["lora"]["target_modules"] == ["q_lin", "v_lin"]
    refused = create(team, "s3-distilbert", team.upload(CHAT).json()["id"])
    assert refused.json()["error"]["message"].startswith("model 's3-distilbert' is an encoder")


def test_a_classifier_needs_less_memory_than_a_chat_job_on_the_same_decoder(team) -> None:
    """A classifier has no vocabulary logits: with the same shape and settings, the
    estimate is smaller than the chat job's."""
    chat = create(team, "bert-as-decoder", team.upload(CHAT).json()["id"], max_seq_length=512)
    news = create(team, "bert-as-decoder", team.upload(NEWS).json()["id"], max_seq_length=512)
    chat_gb = creation_data(team, chat.json()["id"])["memory_gb"]
    news_gb = creation_data(team, news.json()["id"])["memory_gb"]
    assert news_gb < chat_gb


def test_only_an_encoders_input_is_counted_up_to_its_position_limit(team) -> None:
    """The worker cuts an encoder's input at 512 (BERT's positions), not a decoder's: past
    512 tokens the encoder's estimate stays put, the same shape declared causal grows."""

    def memory_gb(model: str, file_id: str, max_seq_length: int) -> float:
        resp = create(team, model, file_id, max_seq_length=max_seq_length)
        assert resp.status_code == 200, resp.text
        return creation_data(team, resp.json()["id"])["memory_gb"]

    news = team.upload(NEWS).json()["id"]
    assert memory_gb("tiny-bert", news, 512) == memory_gb("tiny-bert", news, 4096)
    assert memory_gb("bert-as-decoder", news, 512) < memory_gb("bert-as-decoder", news, 4096)


def test_models_show_their_kind_and_a_fine_tuned_model_its_bases(team, sessions) -> None:
    job_id = create(team, "tiny-bert", team.upload(NEWS).json()["id"]).json()["id"]
    with sessions() as session:  # as if it had trained
        job = session.scalar(select(Job).where(Job.id == job_id))
        job.status, job.fine_tuned_model = JobStatus.SUCCEEDED.value, f"ft:tiny-bert:{job_id}"
        session.commit()

    models = {m["id"]: m for m in team.get("/v1/models").json()["data"]}

    assert {name: model["kind"] for name, model in models.items()} == {
        "tiny-bert": "encoder",
        "tiny-roberta": "encoder",
        "bert-as-decoder": "causal",
        "s3-distilbert": "encoder",
        "tiny-random-llama": "causal",
        f"ft:tiny-bert:{job_id}": "encoder",
    }
    assert team.get("/v1/models/tiny-bert").json()["kind"] == "encoder"


def test_config_json_is_read_again_when_it_changes(tmp_path: Path) -> None:
    """The API reads a model's config.json once per version of the file (its mtime): a
    model replaced in place is seen without a restart."""
    import os

    from app.config import BaseModelSpec, Settings
    from app.services.base_models import describe

    folder = write_config(tmp_path / "model", TINY_BERT_CONFIG)
    settings = Settings(home=tmp_path)
    spec = BaseModelSpec(name="m", path=str(folder))
    first = describe(settings, spec)
    assert (first.kind, first.architecture, first.max_positions) == ("encoder", "bert", 512)
    assert first.shape is not None and first.shape.hidden_size == 64

    config = folder / "config.json"
    config.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = describe(settings, spec)
    assert (second.kind, second.architecture, second.target_modules) == (
        "causal",
        "llama",
        ["all-linear"],
    )
    assert second.shape is None  # no shape declared or read: the estimate guesses

    config.write_text("{not json")
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    assert describe(settings, spec).kind == "causal"  # unreadable: the defaults
