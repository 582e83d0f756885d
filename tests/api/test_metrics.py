"""GET /metrics and the JSON logs, on real Postgres (a database of this module's own, so
the counts are exact): jobs made through the API and moved on by the services a worker
uses, worker rows as heartbeats write them. Also checks that every metric the Grafana
dashboard (deploy/grafana/lathe-dashboard.json) queries is one /metrics exposes."""

from __future__ import annotations

import io
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from app.db import make_engine, make_sessionmaker
from app.domain.jobs import JobStatus
from app.logs import bind, log_context, make_handler
from app.main import create_app
from app.models import Job, Worker
from app.services.lifecycle import transition
from app.services.usage import record_gpu_seconds
from tests.api.datasets import CHAT
from tests.conftest import create_team_key, settings_from

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "lathe-dashboard.json"
MODEL = "tiny-random-llama"
JOB_ROUTE = "/v1/fine_tuning/jobs/{job_id}"


@pytest.fixture(scope="module")
def metrics_env(api_env: dict[str, str], postgres_server) -> Iterator[dict[str, str]]:
    from app.migrate import upgrade

    url = postgres_server.create_database("lathe_metrics")
    upgrade(url)
    yield {**api_env, "LATHE_DATABASE_URL": url, "LATHE_GPU_CLASSES": '{"cpu": 8, "big": 80}'}
    postgres_server.drop_database(url)


@pytest.fixture(scope="module")
def client(metrics_env: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_from(metrics_env))) as client:
        yield client


@pytest.fixture(scope="module")
def sessions(metrics_env: dict[str, str]):
    engine = make_engine(metrics_env["LATHE_DATABASE_URL"])
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def pool(client: TestClient, metrics_env: dict[str, str], sessions) -> dict:
    """Two teams; jobs in every state; five workers. Returns what /metrics should show."""
    team_id, key = create_team_key(metrics_env, "metrics")
    idle_team_id, _ = create_team_key(metrics_env, "idle")
    auth = {"Authorization": f"Bearer {key}"}
    upload = client.post(
        "/v1/files", headers=auth, files={"file": ("t.jsonl", CHAT)}, data={"purpose": "fine-tune"}
    )
    file_id = upload.json()["id"]

    def create(**body) -> str:
        resp = client.post(
            "/v1/fine_tuning/jobs",
            headers=auth,
            json={"model": MODEL, "training_file": file_id, **body},
        )
        assert resp.status_code == 200, resp.text
        return resp.json()["id"]

    queued = [create(), create()]  # the tiny model fits both classes
    pinned = create(gpu_class="big")
    paused, cancelled = create(), create()
    assert client.post(f"/v1/fine_tuning/jobs/{paused}/pause", headers=auth).status_code == 200
    assert client.post(f"/v1/fine_tuning/jobs/{cancelled}/cancel", headers=auth).status_code == 200
    running, succeeded, failed = create(), create(), create()

    # The worker's side: claim, end, meter (as worker.job_runner does), then fix the
    # timestamps so the histograms' values are exact.
    at = int(time.time())
    timeline = {  # job: (final status, created, started, finished, GPU seconds)
        running: (None, at - 50, at - 40, None, 0.0),
        succeeded: (JobStatus.SUCCEEDED, at - 4000, at - 3700, at - 100, 3600.0),
        failed: (JobStatus.FAILED, at - 500, at - 495, at - 375, 120.0),
    }
    with sessions() as session:
        for job_id, (final, created, started, finished, seconds) in timeline.items():
            job = session.scalar(select(Job).where(Job.id == job_id))
            assert transition(
                session,
                job,
                JobStatus.RUNNING,
                "started",
                worker="w-busy@host",
                attempt=1,
                started_at=started,
                dispatched_class="cpu",
            )
            if final is not None:
                assert transition(session, job, final, "ended", finished_at=finished)
                record_gpu_seconds(session, job_id, seconds, 24.0)
            session.execute(update(Job).where(Job.id == job_id).values(created_at=created))
        now = time.time()
        for worker_id, gpu_class, status, last_seen, current in (
            ("w-idle@host", "cpu", "active", now, None),
            ("w-busy@host", "cpu", "active", now, running),
            ("w-drain@host", "big", "draining", now, None),
            ("w-silent@host", "big", "active", now - 3600, None),  # past its lease: lost
            ("w-old@host", "cpu", "stopped", now - 7200, None),
        ):
            session.add(
                Worker(
                    id=worker_id,
                    host="host",
                    gpu_name="test",
                    gpu_class=gpu_class,
                    memory_gb=8.0 if gpu_class == "cpu" else 80.0,
                    status=status,
                    current_job=current,
                    jobs_done=0,
                    last_seen=last_seen,
                )
            )
        session.commit()
    return {
        "team_id": team_id,
        "idle_team_id": idle_team_id,
        "auth": auth,
        "job_ids": [*queued, pinned, paused, cancelled, running, succeeded, failed],
        "running": running,
    }


def scrape(client: TestClient, headers: dict[str, str] | None = None) -> dict:
    """/metrics parsed: {sample name: {frozenset(labels): value}}."""
    resp = client.get("/metrics", headers=headers or {})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[frozenset, float]] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[name][frozenset(labels.items())]


def test_pool_series_come_from_the_database(client: TestClient, pool: dict) -> None:
    samples = scrape(client)
    assert value(samples, "lathe_database_up") == 1
    jobs = {dict(k)["status"]: v for k, v in samples["lathe_jobs"].items()}
    assert jobs == {
        "validating_files": 0,
        "queued": 3,
        "paused": 1,
        "running": 1,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 1,
    }
    # The unpinned queued jobs fit both classes and count in each; the pinned one in "big".
    depth = {dict(k)["gpu_class"]: v for k, v in samples["lathe_queue_depth"].items()}
    assert depth == {"cpu": 2, "big": 3}
    assert value(samples, "lathe_dispatches_pending", gpu_class="cpu") == 0

    workers = {
        (dict(k)["state"], dict(k)["gpu_class"]): v for k, v in samples["lathe_workers"].items()
    }
    assert workers == {
        ("active", "cpu"): 2,
        ("draining", "big"): 1,
        ("lost", "big"): 1,
        ("stopped", "cpu"): 1,
    }
    assert value(samples, "lathe_workers_busy", gpu_class="cpu") == 1
    assert value(samples, "lathe_workers_busy", gpu_class="big") == 0

    usage = {dict(k)["team_id"]: v for k, v in samples["lathe_team_gpu_seconds_total"].items()}
    assert usage[pool["team_id"]] == 3720.0
    assert usage[pool["idle_team_id"]] == 0.0


def test_job_histograms_are_built_from_the_job_timestamps(client: TestClient, pool: dict) -> None:
    samples = scrape(client)
    duration = "lathe_job_duration_seconds"
    assert value(samples, f"{duration}_count", status="succeeded") == 1
    assert value(samples, f"{duration}_sum", status="succeeded") == 3600
    assert value(samples, f"{duration}_bucket", status="succeeded", le="1800.0") == 0
    assert value(samples, f"{duration}_bucket", status="succeeded", le="3600.0") == 1
    assert value(samples, f"{duration}_bucket", status="failed", le="60.0") == 0
    assert value(samples, f"{duration}_bucket", status="failed", le="300.0") == 1
    assert value(samples, f"{duration}_count", status="cancelled") == 0  # it never ran

    wait = "lathe_dispatch_latency_seconds"  # created -> started, finished jobs only
    assert value(samples, f"{wait}_count", gpu_class="cpu") == 2
    assert value(samples, f"{wait}_sum", gpu_class="cpu") == 300 + 5
    assert value(samples, f"{wait}_bucket", gpu_class="cpu", le="5.0") == 1
    assert value(samples, f"{wait}_bucket", gpu_class="cpu", le="300.0") == 2
    assert value(samples, f"{wait}_bucket", gpu_class="cpu", le="+Inf") == 2


def test_http_latency_is_labelled_by_route_template_never_by_id(
    client: TestClient, pool: dict
) -> None:
    for job_id in pool["job_ids"]:
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=pool["auth"]).status_code == 200
    client.get("/v1/fine_tuning/jobs/ftjob-nosuchjob", headers=pool["auth"])
    client.get(f"/no/such/path/{uuid.uuid4().hex}")
    samples = scrape(client)
    http = "lathe_http_request_duration_seconds"
    count = value(samples, f"{http}_count", method="GET", route=JOB_ROUTE, status="200")
    assert count >= len(pool["job_ids"])
    assert value(samples, f"{http}_count", method="GET", route=JOB_ROUTE, status="404") >= 1
    assert value(samples, f"{http}_count", method="GET", route="unmatched", status="404") >= 1
    assert value(samples, f"{http}_bucket", method="GET", route=JOB_ROUTE, status="200", le="+Inf")
    routes = {dict(labels)["route"] for labels in samples[f"{http}_count"]}
    assert "/v1/files" in routes
    assert not any(job_id in route for route in routes for job_id in pool["job_ids"])
    assert not any("nosuchjob" in route or "/no/such" in route for route in routes)


def test_metrics_is_not_in_the_openapi_document(client: TestClient) -> None:
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_the_metrics_token_is_required_when_set(metrics_env: dict[str, str]) -> None:
    settings = settings_from({**metrics_env, "LATHE_METRICS_TOKEN": "scrape-me"})
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics").status_code == 401
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_metrics_token"
        assert value(scrape(client, {"Authorization": "Bearer scrape-me"}), "lathe_database_up")


def test_a_database_outage_is_a_series_not_a_failed_scrape(metrics_env: dict[str, str]) -> None:
    gone = "postgresql+psycopg://postgres@127.0.0.1:1/lathe"
    with TestClient(create_app(settings_from({**metrics_env, "LATHE_DATABASE_URL": gone}))) as c:
        c.get("/healthz")
        samples = scrape(c)
    assert value(samples, "lathe_database_up") == 0
    assert "lathe_jobs" not in samples
    assert (
        value(
            samples,
            "lathe_http_request_duration_seconds_count",
            **{"method": "GET", "route": "/healthz", "status": "200"},
        )
        == 1
    )


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The root logger's records, as `LATHE_LOG_FORMAT=json` writes them."""
    stream = io.StringIO()
    handler = make_handler("json", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def records(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_request_log_lines_are_json_with_the_team_job_and_request_ids(
    client: TestClient, pool: dict, json_log: io.StringIO
) -> None:
    job_id = pool["running"]
    resp = client.get(
        f"/v1/fine_tuning/jobs/{job_id}", headers={**pool["auth"], "X-Request-ID": "req-42"}
    )
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "req-42"
    access = [r for r in records(json_log) if r["logger"] == "lathe.access"]
    assert len(access) == 1, access
    line = access[0]
    assert line["team_id"] == pool["team_id"]
    assert line["job_id"] == job_id
    assert line["request_id"] == "req-42"
    assert (line["route"], line["status"], line["level"]) == (JOB_ROUTE, 200, "INFO")
    assert line["time"] and line["duration_ms"] >= 0
    # A request id of its own when the client's is missing or unfit for a log.
    other = client.get("/v1/files", headers={**pool["auth"], "X-Request-ID": "bad id\x01"})
    assert re.fullmatch(r"[0-9a-f]{32}", other.headers["x-request-id"])


def test_worker_log_lines_carry_the_job_team_and_worker(json_log: io.StringIO) -> None:
    with log_context(job_id="ftjob-abc", worker="gpu0@host"):
        bind(team_id="team-xyz")  # worker.job_runner binds it once the job is read
        logging.getLogger("worker.job_runner").warning("training slowly")
    logging.getLogger("worker.job_runner").warning("between jobs")
    inside, outside = records(json_log)[-2:]
    assert inside["message"] == "training slowly"
    assert (inside["job_id"], inside["team_id"], inside["worker"]) == (
        "ftjob-abc",
        "team-xyz",
        "gpu0@host",
    )
    assert "job_id" not in outside


def test_the_grafana_dashboard_queries_only_exposed_metrics(client: TestClient, pool: dict) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    client.get("/v1/files", headers=pool["auth"])  # some HTTP series
    exposed = set(scrape(client))
    titles = set()
    for panel in dashboard["panels"]:
        titles.add(panel["title"])
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            used = set(re.findall(r"\blathe_[a-z0-9_]+", target["expr"]))
            assert used, target["expr"]  # only Lathe's series (and PromQL functions)
            assert used <= exposed, (panel["title"], used - exposed)
    for wanted in (
        "Jobs by status",
        "Queue depth",
        "Dispatch latency",
        "Job durations",
        "GPU hours by team",
        "HTTP p95",
        "5xx",
        "Workers by state",
    ):
        assert any(wanted in title for title in titles), wanted
