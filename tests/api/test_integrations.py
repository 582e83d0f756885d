"""Experiment tracking at the API: OpenAI's W&B integration and Lathe's MLflow one, refused
when the deployment has no such tracker (naming the setting), stored and shown otherwise,
with the run's URL once the worker reports it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from openai._models import construct_type
from openai.types.fine_tuning import FineTuningJob as OpenAIFineTuningJob
from sqlalchemy import select, update

from app.main import create_app
from app.models import Job
from tests.api.conftest import TeamClient
from tests.api.datasets import CHAT
from tests.api.test_dpo_jobs import team_jobs
from tests.conftest import create_team_key, settings_from

MODEL = "tiny-random-llama"
WANDB = {
    "type": "wandb",
    "wandb": {"project": "lathe-tests", "name": "first", "tags": ["sft", "tiny"]},
}
MLFLOW = {"type": "mlflow", "mlflow": {"experiment": "lathe-tests"}}


@pytest.fixture(scope="module")
def tracked_api(api_env: dict[str, str]) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """The API of a deployment with both trackers: W&B offline (no key), an MLflow URI
    (never contacted by the API)."""
    env = {
        **api_env,
        "LATHE_WANDB_MODE": "offline",
        "LATHE_MLFLOW_TRACKING_URI": "http://mlflow.invalid:5000",
    }
    with TestClient(create_app(settings_from(env))) as client:
        yield client, env


@pytest.fixture
def tracked_team(tracked_api) -> TeamClient:
    client, env = tracked_api
    return TeamClient(*create_team_key(env, "tracked"), client)


def create(team: TeamClient, **body):
    training = team.upload(CHAT).json()["id"]
    return team.post(
        "/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": training, **body}
    )


@pytest.mark.parametrize(
    ("integration", "variable"),
    [(WANDB, "LATHE_WANDB_API_KEY"), (MLFLOW, "LATHE_MLFLOW_TRACKING_URI")],
    ids=["wandb", "mlflow"],
)
def test_an_integration_the_deployment_lacks_is_refused_naming_its_setting(
    team, sessions, integration, variable
) -> None:
    before = team_jobs(sessions, team)

    resp = create(team, integrations=[integration])

    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("integration_not_configured", "integrations")
    assert "not configured on this deployment" in error["message"]
    assert variable in error["message"]
    assert team_jobs(sessions, team) == before


def test_no_integrations_need_no_tracker(team) -> None:
    for integrations in (None, []):
        job = create(team, integrations=integrations).json()
        assert job["integrations"] == []


def test_configured_integrations_are_stored_and_shown_in_openais_shape(
    tracked_team, sessions
) -> None:
    resp = create(tracked_team, integrations=[WANDB, MLFLOW])

    assert resp.status_code == 200, resp.text
    job = resp.json()
    wandb = {"project": "lathe-tests", "name": "first", "entity": None, "tags": ["sft", "tiny"]}
    mlflow = {"experiment": "lathe-tests", "run_name": None}
    assert job["integrations"] == [
        {"type": "wandb", "wandb": wandb, "url": None},
        {"type": "mlflow", "mlflow": mlflow, "url": None},
    ]
    with sessions() as session:
        stored = session.scalar(select(Job.integrations).where(Job.id == job["id"]))
    assert stored == [{"type": "wandb", "wandb": wandb}, {"type": "mlflow", "mlflow": mlflow}]


def test_the_runs_urls_reported_by_the_worker_are_shown(tracked_team, sessions) -> None:
    job = create(tracked_team, integrations=[WANDB, MLFLOW]).json()
    tracking = {
        "wandb": {"url": "https://wandb.example/runs/abc", "run_id": "abc"},
        "mlflow": {"url": "http://mlflow.invalid:5000/#/runs/r1", "run_id": "r1",
                   "experiment_id": "1"},
    }  # fmt: skip
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(stats={"tracking": tracking}))
        session.commit()

    shown = tracked_team.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["integrations"]

    assert [entry["url"] for entry in shown] == [
        "https://wandb.example/runs/abc",
        "http://mlflow.invalid:5000/#/runs/r1",
    ]


def test_the_openai_sdk_reads_the_integrations(tracked_team) -> None:
    """OpenAI's model validates a W&B job as is (the url is kept as an extra field); with
    Lathe's MLflow entry too, the SDK's own response parsing (lenient) keeps both."""
    wandb_only = create(tracked_team, integrations=[WANDB]).json()
    parsed = OpenAIFineTuningJob.model_validate(wandb_only)
    assert parsed.integrations[0].wandb.project == "lathe-tests"
    assert parsed.integrations[0].wandb.tags == ["sft", "tiny"]
    assert parsed.integrations[0].url is None  # type: ignore[attr-defined]

    both = create(tracked_team, integrations=[WANDB, MLFLOW]).json()
    lenient = construct_type(type_=OpenAIFineTuningJob, value=both)
    assert [i.type for i in lenient.integrations] == ["wandb", "mlflow"]


@pytest.mark.parametrize(
    ("integrations", "param"),
    [
        ([{"type": "wandb", "wandb": {}}], "integrations.0.wandb.project"),
        ([{"type": "wandb", "wandb": {"project": ""}}], "integrations.0.wandb.project"),
        ([{"type": "wandb", "wandb": {"project": "p" * 129}}], "integrations.0.wandb.project"),
        (
            [{"type": "wandb", "wandb": {"project": "p", "tags": ["t" * 65]}}],
            "integrations.0.wandb.tags.0",
        ),
        ([{"type": "mlflow", "mlflow": {}}], "integrations.0.mlflow.experiment"),
        ([{"type": "mlflow", "mlflow": {"experiment": "e", "x": 1}}], "integrations.0.mlflow.x"),
        ([{"type": "comet", "comet": {}}], "integrations.0.type"),
        ([{"type": "wandb"}], "integrations.0"),
        ([{"type": "wandb", "mlflow": {"experiment": "e"}}], "integrations.0"),
        ([WANDB, MLFLOW, WANDB], "integrations"),
    ],
)
def test_bad_integrations_are_refused_with_the_field_named(
    tracked_team, sessions, integrations, param
) -> None:
    before = team_jobs(sessions, tracked_team)
    resp = create(tracked_team, integrations=integrations)
    assert resp.status_code == 400, resp.text
    assert (resp.json()["error"]["code"], resp.json()["error"]["param"]) == (
        "invalid_value",
        param,
    )
    assert team_jobs(sessions, tracked_team) == before


def test_a_second_integration_of_one_type_is_refused(tracked_team, sessions) -> None:
    other = {"type": "wandb", "wandb": {"project": "elsewhere"}}
    resp = create(tracked_team, integrations=[WANDB, other])
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("duplicate_integration", "integrations")
