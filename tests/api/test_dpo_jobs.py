"""DPO jobs at the API: OpenAI's method={"type": "dpo"} with its beta, and the method and
the training file's format agreeing at creation (a 400 naming both, nothing stored)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from openai.types.fine_tuning import FineTuningJob as OpenAIFineTuningJob
from sqlalchemy import func, select

from app.main import create_app
from app.models import Job, Team
from tests.api.conftest import TeamClient
from tests.api.datasets import CHAT, jsonl
from tests.api.test_encoder_models import NEWS, TINY_BERT_CONFIG, write_config
from tests.conftest import create_team_key, settings_from

MODEL = "tiny-random-llama"


def preference_rows(n: int = 12) -> list[dict]:
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"{i} + {i} = {2 * i}."}],
            "non_preferred_output": [{"role": "assistant", "content": f"Maybe {2 * i}?"}],
        }
        for i in range(n)
    ]


PREFERENCE = jsonl(preference_rows())


def dpo(**hyperparameters) -> dict:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


def create(team: TeamClient, **body):
    return team.post("/v1/fine_tuning/jobs", json={"model": MODEL, **body})


def team_jobs(sessions, team: TeamClient) -> int:
    with sessions() as session:
        team_pk = select(Team.pk).where(Team.id == team.id).scalar_subquery()
        return session.scalar(select(func.count()).where(Job.team_pk == team_pk))


def stored(sessions, job_id: str) -> Job:
    with sessions() as session:
        return session.scalars(select(Job).where(Job.id == job_id)).one()


@pytest.fixture
def preference_id(team) -> str:
    upload = team.upload(PREFERENCE, name="pairs.jsonl")
    assert upload.status_code == 200, upload.text
    return upload.json()["id"]


def test_a_dpo_job_on_a_preference_file_is_queued_with_its_beta(
    team, sessions, preference_id
) -> None:
    resp = create(
        team,
        training_file=preference_id,
        method=dpo(beta=0.5, n_epochs=2, batch_size=4, learning_rate_multiplier=0.5),
    )

    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["status"] == "queued"
    resolved = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5, "beta": 0.5}
    assert job["method"] == {
        "type": "dpo",
        "supervised": None,
        "dpo": {"hyperparameters": resolved},
    }
    assert job["hyperparameters"] == resolved
    row = stored(sessions, job["id"])
    assert (row.method, row.hyperparameters["beta"], row.data_format) == (
        "dpo",
        0.5,
        "preference",
    )
    # The openai SDK reads the job as OpenAI's DPO job.
    parsed = OpenAIFineTuningJob.model_validate(job)
    assert parsed.method.type == "dpo"
    assert parsed.method.dpo.hyperparameters.beta == 0.5


@pytest.mark.parametrize(
    "method",
    [dpo(beta="auto"), dpo(n_epochs=1), {"type": "dpo"}, {"type": "dpo", "dpo": {}}],
    ids=["beta-auto", "beta-left-out", "no-block", "no-hyperparameters"],
)
def test_an_auto_beta_is_dpos_usual_0_1(team, sessions, preference_id, method) -> None:
    job = create(team, training_file=preference_id, method=method).json()
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.1
    assert stored(sessions, job["id"]).hyperparameters["beta"] == 0.1


def test_the_method_blocks_values_win_over_top_level_hyperparameters(team, preference_id) -> None:
    job = create(
        team,
        training_file=preference_id,
        hyperparameters={"n_epochs": 3, "batch_size": 2},
        method=dpo(batch_size=4),
    ).json()
    assert job["method"]["dpo"]["hyperparameters"]["n_epochs"] == 3
    assert job["method"]["dpo"]["hyperparameters"]["batch_size"] == 4


def test_a_supervised_job_has_no_beta(team, sessions) -> None:
    job = create(team, training_file=team.upload(CHAT).json()["id"]).json()
    assert job["method"]["type"] == "supervised" and job["method"]["dpo"] is None
    assert "beta" not in job["method"]["supervised"]["hyperparameters"]
    assert stored(sessions, job["id"]).method == "supervised"


def test_dpo_on_a_chat_file_is_refused_naming_both(team, sessions) -> None:
    chat = team.upload(CHAT).json()["id"]
    before = team_jobs(sessions, team)

    resp = create(team, training_file=chat, method=dpo(beta=0.2))

    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_method_for_file", "training_file")
    assert "method 'dpo'" in error["message"]
    assert f"training_file {chat!r} is chat" in error["message"]
    assert "preference" in error["message"]
    assert team_jobs(sessions, team) == before


@pytest.mark.parametrize("method", [None, {"type": "supervised"}])
def test_supervised_on_a_preference_file_is_refused_naming_both(
    team, sessions, preference_id, method
) -> None:
    before = team_jobs(sessions, team)
    body = {"training_file": preference_id} | ({"method": method} if method else {})

    resp = create(team, **body)

    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_method_for_file", "training_file")
    assert f"training_file {preference_id!r} is preference" in error["message"]
    assert "'supervised'" in error["message"] and "'dpo'" in error["message"]
    assert team_jobs(sessions, team) == before


def test_dpo_on_a_classification_file_is_refused(team, sessions) -> None:
    news = team.upload(NEWS).json()["id"]
    resp = create(team, training_file=news, method=dpo())
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_method_for_file"
    assert "is classification" in resp.json()["error"]["message"]


def test_a_chat_validation_file_fails_a_dpo_job(team, preference_id) -> None:
    chat = team.upload(CHAT).json()["id"]
    job = create(team, training_file=preference_id, validation_file=chat, method=dpo()).json()
    assert job["status"] == "failed"
    assert (job["error"]["code"], job["error"]["param"]) == (
        "invalid_validation_file",
        "validation_file",
    )


@pytest.mark.parametrize(
    ("method", "param"),
    [
        (dpo(beta=0), "method.dpo.hyperparameters.beta"),
        (dpo(beta=2.5), "method.dpo.hyperparameters.beta"),
        (dpo(beta="high"), "method.dpo.hyperparameters.beta"),
        (dpo(gamma=1), "method.dpo.hyperparameters.gamma"),
        ({"type": "dpo", "supervised": {}}, "method"),
        ({"type": "supervised", "dpo": {}}, "method"),
        ({"dpo": {}}, "method"),
    ],
)
def test_bad_dpo_methods_are_refused_with_the_field_named(
    team, sessions, preference_id, method, param
) -> None:
    before = team_jobs(sessions, team)
    resp = create(team, training_file=preference_id, method=method)
    assert resp.status_code == 400, resp.text
    assert (resp.json()["error"]["code"], resp.json()["error"]["param"]) == (
        "invalid_value",
        param,
    )
    assert team_jobs(sessions, team) == before


# --- an encoder ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_api(api_env, tmp_path_factory) -> Iterator[tuple[TestClient, dict[str, str]]]:
    bert = write_config(tmp_path_factory.mktemp("dpo-models") / "tiny-bert", TINY_BERT_CONFIG)
    env = {**api_env, "LATHE_BASE_MODELS": f'[{{"name": "tiny-bert", "path": "{bert}"}}]'}
    with TestClient(create_app(settings_from(env))) as client:
        yield client, env


def test_dpo_on_an_encoder_is_refused_saying_it_needs_a_decoder(bert_api, sessions) -> None:
    client, env = bert_api
    team = TeamClient(*create_team_key(env, "dpo-bert"), client)
    pairs = team.upload(PREFERENCE).json()["id"]

    resp = team.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-bert", "training_file": pairs, "method": dpo()},
    )

    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_format_for_model", "training_file")
    assert "'tiny-bert' is an encoder (bert)" in error["message"]
    assert f"training_file {pairs!r} is preference" in error["message"]
    assert "DPO needs a model that writes text" in error["message"]
    assert team_jobs(sessions, team) == 0


def memory_gb(team: TeamClient, job_id: str) -> float:
    events = team.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    return next(e["data"]["memory_gb"] for e in events if e["message"].startswith("Validating"))


def test_a_dpo_step_is_estimated_as_twice_the_sequences_of_a_supervised_one(
    team, preference_id
) -> None:
    """Each pair's preferred and non-preferred answers go through the model in one batch."""
    chat = team.upload(CHAT).json()["id"]
    shape = {"max_seq_length": 512, "lora": {"r": 16}}
    pairs = create(team, training_file=preference_id, method=dpo(batch_size=4), **shape).json()
    single = create(team, training_file=chat, hyperparameters={"batch_size": 4}, **shape).json()
    double = create(team, training_file=chat, hyperparameters={"batch_size": 8}, **shape).json()

    assert memory_gb(team, pairs["id"]) == memory_gb(team, double["id"])
    assert memory_gb(team, pairs["id"]) > memory_gb(team, single["id"])
