"""Multi-GPU jobs at the API, on Postgres: `gpus` and `parallelism` stored and shown, the
batch split among the GPUs, auto parallelism by the per-GPU memory estimate, the 400s (each
with its param, nothing stored), the hosts' GPU counts bounding what is accepted, and the
CLI's options. Each test that depends on the pool gets a database of its own, so the worker
rows it inserts are the pool's only ones."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import httpx
import pytest
from fastapi.testclient import TestClient
from rich.console import Console
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from app.cli import app as cli
from app.client.config import Target
from app.client.http import LatheClient
from app.client.render import job_panel, jobs_table
from app.config import TINY_RANDOM_LLAMA, Settings
from app.db import make_engine, make_sessionmaker
from app.domain.hyperparameters import auto_batch_size
from app.main import create_app
from app.models import Job, Team, Worker
from app.schemas import QuantizationIn, TrainingIn
from app.services.base_models import describe
from app.services.jobs import job_memory_gb
from tests.api.conftest import TeamClient
from tests.api.datasets import CHAT, chat_rows
from tests.api.test_dpo_jobs import PREFERENCE, dpo
from tests.api.test_encoder_models import NEWS, TINY_BERT_CONFIG, write_config
from tests.conftest import create_team_key, settings_from

BIG = "llama-7b"  # declared, never read: a 7B decoder for the memory figures
BATCH = 8


@dataclass
class Pool:
    team: TeamClient
    sessions: sessionmaker[Session]
    settings: Settings

    def add_host(self, gpu_class: str, gpus: int, memory_gb: float = 8.0) -> str:
        """A worker row, as a host's heartbeat writes it."""
        worker_id = f"w-{uuid.uuid4().hex[:8]}@host"
        with self.sessions() as session:
            session.add(
                Worker(
                    id=worker_id,
                    host="host",
                    gpu_name="test",
                    gpu_class=gpu_class,
                    memory_gb=memory_gb,
                    gpus=gpus,
                    status="active",
                    jobs_done=0,
                    last_seen=time.time(),
                )
            )
            session.commit()
        return worker_id

    def create(self, **body) -> httpx.Response:
        body.setdefault("model", TINY_RANDOM_LLAMA)
        body.setdefault("training_file", self.upload(CHAT))
        return self.team.post("/v1/fine_tuning/jobs", json=body)

    def upload(self, content: bytes) -> str:
        resp = self.team.upload(content)
        assert resp.status_code == 200, resp.text
        return resp.json()["id"]

    def jobs(self) -> int:
        with self.sessions() as session:
            team_pk = select(Team.pk).where(Team.id == self.team.id).scalar_subquery()
            return session.scalar(select(func.count()).where(Job.team_pk == team_pk))

    def row(self, job_id: str) -> Job:
        with self.sessions() as session:
            return session.scalar(select(Job).where(Job.id == job_id))


@pytest.fixture(scope="module")
def base_models(tmp_path_factory: pytest.TempPathFactory) -> str:
    bert = write_config(tmp_path_factory.mktemp("multi-gpu-models") / "tiny-bert", TINY_BERT_CONFIG)
    return json.dumps(
        [
            Settings().base_models[0].model_dump(),  # tiny-random-llama, as deployed
            {"name": BIG, "path": "s3://models/llama-7b", "kind": "causal",
             "parameters": 7_000_000_000},
            {"name": "tiny-bert", "path": str(bert)},
        ]
    )  # fmt: skip


@pytest.fixture
def new_pool(api_env, postgres_server, base_models) -> Iterator[Callable[..., Pool]]:
    """Makes a pool on a database of its own: `declared` its LATHE_GPU_CLASSES (None: none
    declared, as docker-compose.yml ships), no worker yet."""
    with ExitStack() as stack:

        def make(declared: dict[str, float] | None = None) -> Pool:
            name = f"lathe_gpus_{uuid.uuid4().hex[:8]}"
            url = postgres_server.create_database(name)
            stack.callback(postgres_server.drop_database, url)
            from app.migrate import upgrade

            upgrade(url)
            env = {k: v for k, v in api_env.items() if k != "LATHE_GPU_CLASSES"}
            env |= {"LATHE_DATABASE_URL": url, "LATHE_BASE_MODELS": base_models}
            if declared is not None:
                env["LATHE_GPU_CLASSES"] = json.dumps(declared)
            settings = settings_from(env)
            client = stack.enter_context(TestClient(create_app(settings)))
            engine = make_engine(url)
            stack.callback(engine.dispose)
            team = TeamClient(*create_team_key(env, "gpus"), client)
            return Pool(team, make_sessionmaker(engine), settings)

        yield make


# --- stored and shown ---------------------------------------------------------------------


def test_a_two_gpu_job_is_stored_and_shown_with_its_gpus_and_parallelism(new_pool) -> None:
    pool = new_pool({"cpu": 8})
    pool.add_host("duo", gpus=2)
    single = pool.create(hyperparameters={"batch_size": BATCH})
    assert single.status_code == 200, single.text

    created = pool.create(gpus=2, hyperparameters={"batch_size": BATCH})

    assert created.status_code == 200, created.text
    job = created.json()
    assert (job["gpus"], job["parallelism"], job["devices"]) == (2, "ddp", None)
    assert (job["preemptions"], job["preemptible"]) == (0, True)
    assert job["hyperparameters"]["batch_size"] == BATCH
    assert pool.team.get(f"/v1/fine_tuning/jobs/{job['id']}").json() == job
    row = pool.row(job["id"])
    assert (row.gpus, row.parallelism) == (2, "ddp")
    events = pool.team.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    data = next(e["data"] for e in events if e["message"].startswith("Validating"))
    assert (data["gpus"], data["parallelism"], data["memory_gb"]) == (2, "ddp", row.memory_gb)
    # One GPU: no parallelism, and the figure as before multi-GPU jobs.
    assert (single.json()["gpus"], single.json()["parallelism"]) == (1, None)
    facts = describe(pool.settings, pool.settings.base_model(TINY_RANDOM_LLAMA))
    lora = {"r": 8, "target_modules": facts.target_modules}
    alone = job_memory_gb(facts, lora, BATCH, 1024, QuantizationIn(), TrainingIn())
    assert pool.row(single.json()["id"]).memory_gb == round(alone, 3)
    # Per GPU: the whole tiny model, half the batch's activations, NCCL's buffers.
    assert row.memory_gb == round(
        job_memory_gb(facts, lora, BATCH, 1024, QuantizationIn(), TrainingIn(), gpus=2), 3
    )
    assert row.memory_gb != pool.row(single.json()["id"]).memory_gb
    workers = pool.team.get("/v1/workers").json()["data"]
    assert [(w["gpu_class"], w["gpus"]) for w in workers] == [("duo", 2)]


def test_the_devices_show_while_the_job_runs_only(new_pool) -> None:
    pool = new_pool({"cpu": 8})
    pool.add_host("duo", gpus=2)
    job_id = pool.create(gpus=2, hyperparameters={"batch_size": 2}).json()["id"]
    with pool.sessions() as session:
        row = session.scalar(select(Job).where(Job.id == job_id))
        row.devices = [0, 1]  # as a claim sets them; the job still queued
        session.commit()
    assert pool.team.get(f"/v1/fine_tuning/jobs/{job_id}").json()["devices"] is None
    with pool.sessions() as session:
        session.scalar(select(Job).where(Job.id == job_id)).status = "running"
        session.commit()
    assert pool.team.get(f"/v1/fine_tuning/jobs/{job_id}").json()["devices"] == [0, 1]


def test_an_auto_batch_size_is_rounded_up_to_a_multiple_of_the_gpus(new_pool) -> None:
    pool = new_pool({"cpu": 8})
    pool.add_host("quad", gpus=4)
    auto = auto_batch_size(len(chat_rows()))
    assert auto % 3 != 0, "the test needs an auto size that three GPUs do not split"

    job = pool.create(gpus=3).json()

    assert job["hyperparameters"]["batch_size"] == -(-auto // 3) * 3
    assert pool.create(gpus=4).json()["hyperparameters"]["batch_size"] == -(-auto // 4) * 4


# --- refused: 400 with the param, nothing stored -------------------------------------------


def refused(resp: httpx.Response, code: str, param: str) -> str:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    return error["message"]


def test_a_batch_size_the_gpus_do_not_split_is_refused_where_it_was_given(new_pool) -> None:
    pool = new_pool({"cpu": 8})
    pool.add_host("quad", gpus=4)

    top = pool.create(gpus=4, hyperparameters={"batch_size": 6})
    block = pool.create(
        gpus=4, method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 6}}}
    )

    message = refused(top, "batch_size_not_divisible", "hyperparameters.batch_size")
    assert "batch_size 6 does not split among gpus 4" in message
    assert "multiple of 4 (e.g. 8)" in message
    refused(block, "batch_size_not_divisible", "method.supervised.hyperparameters.batch_size")
    assert pool.jobs() == 0


def test_a_parallelism_for_one_gpu_is_refused(new_pool) -> None:
    pool = new_pool({"cpu": 8})
    for body in ({"parallelism": "ddp"}, {"parallelism": "fsdp", "gpus": 1}):
        message = refused(pool.create(**body), "invalid_value", "parallelism")
        assert "several GPUs" in message
    refused(pool.create(gpus=2, parallelism="tensor"), "invalid_value", "parallelism")
    refused(pool.create(gpus=65), "invalid_value", "gpus")
    refused(pool.create(gpus=0), "invalid_value", "gpus")
    assert pool.jobs() == 0


def test_fsdp_is_refused_for_dpo_and_for_a_classifier_which_train_under_ddp(new_pool) -> None:
    pool = new_pool({"cpu": 8})
    pool.add_host("duo", gpus=2, memory_gb=1000)
    pairs = pool.upload(PREFERENCE)
    news = pool.upload(NEWS)

    dpo_fsdp = pool.create(
        training_file=pairs, method=dpo(batch_size=2), gpus=2, parallelism="fsdp"
    )
    bert_fsdp = pool.create(model="tiny-bert", training_file=news, gpus=2, parallelism="fsdp")
    llama_news = pool.create(training_file=news, gpus=2, parallelism="fsdp")

    assert "method 'dpo' trains under ddp only" in refused(
        dpo_fsdp, "unsupported_parallelism", "parallelism"
    )
    for resp in (bert_fsdp, llama_news):
        assert "a classifier" in refused(resp, "unsupported_parallelism", "parallelism")
    assert pool.jobs() == 0
    # Under DDP, or left to the server (which picks DDP for them), they are accepted.
    dpo_auto = pool.create(training_file=pairs, method=dpo(batch_size=2), gpus=2)
    bert_ddp = pool.create(model="tiny-bert", training_file=news, gpus=2, parallelism="ddp")
    assert dpo_auto.status_code == 200, dpo_auto.text
    assert bert_ddp.status_code == 200, bert_ddp.text
    assert dpo_auto.json()["parallelism"] == bert_ddp.json()["parallelism"] == "ddp"


def test_more_gpus_than_any_host_has_is_refused_naming_the_largest(new_pool) -> None:
    pool = new_pool({"cpu": 8})  # a declared class: hosts of one GPU
    assert "largest host this pool has seen has 1 (gpu_class 'cpu')" in refused(
        pool.create(gpus=2), "insufficient_gpus", "gpus"
    )
    pool.add_host("quad", gpus=4)
    pool.add_host("quad", gpus=2)  # the class's largest host counts

    message = refused(pool.create(gpus=8), "insufficient_gpus", "gpus")
    pinned = refused(pool.create(gpus=2, gpu_class="cpu"), "insufficient_gpus", "gpus")

    assert "asks for 8 GPUs of one host" in message
    assert "largest host this pool has seen has 4 (gpu_class 'quad')" in message
    assert "largest host of gpu_class 'cpu' seen has 1" in pinned
    assert pool.jobs() == 0
    assert pool.create(gpus=4).status_code == 200


def test_a_pool_that_knows_no_class_accepts_a_multi_gpu_job_which_waits(new_pool) -> None:
    pool = new_pool(None)

    created = pool.create(gpus=8, hyperparameters={"batch_size": 8})

    assert created.status_code == 200, created.text
    assert (created.json()["status"], created.json()["parallelism"]) == ("queued", "ddp")
    events = pool.team.get(f"/v1/fine_tuning/jobs/{created.json()['id']}/events").json()
    assert any(e["message"].startswith("No worker of a fitting GPU class") for e in events["data"])


# --- auto parallelism: DDP while it fits, else FSDP ------------------------------------------


def figures(settings: Settings) -> dict[str, float]:
    """The 7B job's per-GPU figure on two GPUs under each parallelism, as the API reckons."""
    facts = describe(settings, settings.base_model(BIG))
    lora = {"r": 8, "target_modules": facts.target_modules}
    return {
        p: job_memory_gb(
            facts, lora, BATCH, 1024, QuantizationIn(), TrainingIn(), gpus=2, parallelism=p
        )
        for p in ("ddp", "fsdp")
    }


def test_auto_parallelism_is_fsdp_when_a_declared_class_fits_only_the_sharded_job(
    new_pool, base_models
) -> None:
    env = {"LATHE_BASE_MODELS": base_models}
    gb = figures(settings_from(env))
    assert gb["fsdp"] + 1 < gb["ddp"], gb
    middle = (gb["ddp"] + gb["fsdp"]) / 2
    pool = new_pool({"mid": middle})  # declared; its hosts announce two GPUs
    pool.add_host("mid", gpus=2, memory_gb=1.0)
    body = {"model": BIG, "gpus": 2, "hyperparameters": {"batch_size": BATCH}}

    auto = pool.create(**body)
    ddp = pool.create(**body, parallelism="ddp")

    assert auto.status_code == 200, auto.text
    assert auto.json()["parallelism"] == "fsdp"
    assert pool.row(auto.json()["id"]).memory_gb == round(gb["fsdp"], 3)
    message = refused(ddp, "insufficient_gpu_memory", "max_seq_length")
    assert f"about {gb['ddp']:.1f} GB of GPU memory on each GPU" in message
    assert "largest class with hosts of 2 GPUs, 'mid'" in message
    # A class large enough for DDP: auto takes it, pinned or not.
    pool.add_host("big", gpus=2, memory_gb=gb["ddp"] + 1)
    assert pool.create(**body).json()["parallelism"] == "ddp"
    assert pool.create(**body, gpu_class="mid").json()["parallelism"] == "fsdp"
    assert pool.create(**body, gpu_class="big").json()["parallelism"] == "ddp"


# --- the CLI ------------------------------------------------------------------------------


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The bodies `lathe jobs create` posts, to a mock server that accepts them."""
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"id": "ftjob-new", "status": "validating_files"})

    def mock(cls, api_url: str | None, api_key: str | None) -> LatheClient:
        return cls(Target("http://lathe.test", "k"), transport=httpx.MockTransport(handler))

    monkeypatch.setattr(LatheClient, "from_options", classmethod(mock))
    return bodies


def test_the_cli_sends_gpus_and_parallelism(sent: list[dict]) -> None:
    base = ["jobs", "create", "-m", "tiny-random-llama", "-t", "file-abc"]

    two = CliRunner().invoke(cli, [*base, "--gpus", "2", "--parallelism", "fsdp"])
    plain = CliRunner().invoke(cli, base)
    alone = CliRunner().invoke(cli, [*base, "--parallelism", "ddp"])

    assert two.exit_code == 0, two.output
    assert (sent[0]["gpus"], sent[0]["parallelism"]) == (2, "fsdp")
    assert plain.exit_code == 0, plain.output
    assert "gpus" not in sent[1] and "parallelism" not in sent[1]
    assert alone.exit_code == 2 and len(sent) == 2, "refused before anything is sent"
    assert "--gpus" in alone.output


def test_the_cli_shows_a_jobs_gpus_devices_and_marks() -> None:
    job = {
        "id": "ftjob-1",
        "status": "running",
        "model": "m",
        "created_at": 0,
        "finished_at": None,
        "gpus": 4,
        "parallelism": "fsdp",
        "devices": [4, 5, 6, 7],
        "preemptions": 2,
        "preemptible": False,
    }
    console = Console(width=200, record=True)
    console.print(job_panel(job, None))
    console.print(jobs_table([job]))
    text = console.export_text()
    lines = {line.strip("│ ").split("  ", 1)[0]: line for line in text.splitlines()}
    assert "4 (fsdp), devices 4, 5, 6, 7" in lines["GPUs"]
    assert "preempted 2 times, not preemptible" in lines["preemption"]
    plain = {**job, "gpus": 1, "parallelism": None, "devices": None, "preemptions": 0,
             "preemptible": True}  # fmt: skip
    console = Console(width=200, record=True)
    console.print(job_panel(plain, None))
    assert "preemption" not in console.export_text()
