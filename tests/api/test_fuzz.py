"""The OpenAPI document fuzzed with schemathesis: every operation, with valid and hostile
input (schemathesis' coverage and fuzzing phases, positive and negative), on real Postgres,
Redis and S3. No request may get a 5xx, and every response must match the document: a
documented status code and content type, a body of the documented schema (every error in
the envelope), documented headers.

The app is create_app(settings_from(...)) as in tests/api/conftest.py, on a database of its
own (the admin operations create and change teams, which the other tests must not see) and
with a rate limit high enough that the fuzzing is not answered with 429s (tests/api/
test_ratelimit.py covers those).

Random ids only ever reach the "no such object" branch, so valid cases are sometimes pointed
at real objects (a file, queued jobs, another team, its key, a worker, the base model): the
handlers then run past the lookup with fuzzed parameters and bodies.

Examples per operation: LATHE_FUZZ_EXAMPLES (default 25). Generation is derandomized so CI
is reproducible; LATHE_FUZZ_RANDOM=1 explores new inputs on each run.
"""

from __future__ import annotations

import os
import random
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.config import TINY_RANDOM_LLAMA
from app.db import make_engine, make_sessionmaker
from app.main import create_app
from app.models import Worker
from app.services.admin_keys import create_admin_key
from tests.api.datasets import CHAT
from tests.conftest import create_team_key, settings_from
from tests.openapi import served_document

MAX_EXAMPLES = int(os.environ.get("LATHE_FUZZ_EXAMPLES", "25"))

# 400s that a schema-valid request may still get, because they depend on what exists (the
# team's objects, the pool, the deployment's settings), not on the request's form:
# (error code, the param it names) -> why the document cannot say it. Everything else the
# API refuses with 400 must be said in the document (minLength, pattern, enum, format,
# bounds), so generated clients and the docs match the validation (docs/api.md).
STATE_DEPENDENT_400 = {
    # The document gives each `after` its id pattern (`ftjob-` and 24 hex digits...), so a
    # valid case's cursor is well-formed; it names an object of the list or not.
    ("invalid_cursor", "after"): "a well-formed id that is not in this list",
    ("file_not_found", "training_file"): "a file id the team does not have",
    ("file_not_found", "validation_file"): "a file id the team does not have",
    ("invalid_file_purpose", "training_file"): "a file of the team with another purpose",
    ("invalid_file_purpose", "validation_file"): "a file of the team with another purpose",
    ("file_in_use", "file_id"): "a file an unfinished job trains on",
    ("model_not_found", "model"): "a model the deployment does not offer (its settings)",
    ("integration_not_configured", "integrations"): "a tracker the deployment has no settings for",
    ("invalid_method_for_file", "training_file"): "a method the team's training file does not fit",
    ("unknown_gpu_class", "gpu_class"): "a GPU class the pool does not have",
    ("insufficient_gpu_memory", "gpu_class"): "a class with less memory than the job needs",
    ("insufficient_gpu_memory", "max_seq_length"): "a job larger than the pool's GPUs",
    ("insufficient_gpus", "gpus"): "more GPUs than any host of the pool has",
    # Divisibility of the batch by `gpus` ties two fields, which JSON Schema cannot say.
    ("batch_size_not_divisible", "hyperparameters.batch_size"): "a batch not a multiple of gpus",
    (
        "batch_size_not_divisible",
        "method.supervised.hyperparameters.batch_size",
    ): "a batch not a multiple of gpus",
    ("batch_size_not_divisible", "method.dpo.hyperparameters.batch_size"): (
        "a batch not a multiple of gpus"
    ),
    ("unsupported_parallelism", "parallelism"): "fsdp for a method or model it does not cover",
    ("too_many_webhooks", None): "the team's webhook count",
    ("denied_url", "url"): "a host in the deployment's denied networks, as it resolves now",
}
# An upload refused for its file's content (the JSONL rules of docs/datasets.md, which a
# multipart schema cannot say) or its file name (control characters, length): param "file".
UPLOAD_CONTENT_400 = {
    "invalid_encoding",
    "nul_character",
    "invalid_json",
    "invalid_type",
    "invalid_value",
    "missing_key",
    "unknown_role",
    "no_assistant_message",
    "empty_value",
    "mixed_formats",
    "line_too_long",
    "empty_file",
    "invalid_filename",
}


@schemathesis.check
def valid_requests_not_refused(ctx, response, case) -> None:
    """A request the document calls valid (schemathesis' positive cases) is not answered
    400, except for STATE_DEPENDENT_400 and UPLOAD_CONTENT_400."""
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    if response.status_code != 400:
        return
    error = response.json().get("error") or {}
    if (error.get("code"), error.get("param")) in STATE_DEPENDENT_400:
        return
    if (case.method, case.path) == ("POST", "/v1/files") and error.get("param") == "file":
        if error.get("code") in UPLOAD_CONTENT_400:
            return
    raise AssertionError(
        f"a schema-valid request was refused with 400: {error.get('code')} "
        f"(param {error.get('param')!r}): {error.get('message')}"
    )


CHECKS = [
    valid_requests_not_refused,
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,  # an operation that declares a key answers 401 without one, or a bad one
]


# Read at collection: pytest makes one test per operation from it.
SPEC = served_document()
# Loaded eagerly rather than with schemathesis.pytest.from_fixture: that loader reads
# pytest's private Node._nodeid, which pytest 9.2 no longer has (AttributeError).
schema = schemathesis.openapi.from_dict(SPEC)


@pytest.fixture(scope="module")
def fuzz_env(api_env: dict[str, str], postgres_server) -> Iterator[dict[str, str]]:
    from app.migrate import upgrade

    url = postgres_server.create_database("lathe_fuzz")
    upgrade(url)
    yield {
        **api_env,
        "LATHE_DATABASE_URL": url,
        "LATHE_BROKER_URL": api_env["LATHE_BROKER_URL"][:-1] + "2",
        "LATHE_RATE_LIMIT_PER_MINUTE": "1000000",
    }
    postgres_server.drop_database(url)


@pytest.fixture(scope="module")
def fuzz_app(fuzz_env: dict[str, str]):
    app = create_app(settings_from(fuzz_env))
    assert app.openapi() == SPEC  # the document fuzzed is the one this app serves
    yield app
    # schemathesis started the app's lifespan at its first request; end it before the
    # database goes.
    asgi.shutdown_lifespans()


@dataclass
class World:
    """Credentials, and real objects for valid cases to point at."""

    team_auth: str  # the fuzzing team's key: all of /v1 but /v1/admin
    admin_auth: str
    ids: dict[str, list[str]]  # path parameter name -> ids of real objects
    file_id: str
    # Queued jobs for the operations that change a job's state, one set each, so that each
    # finds a job in the state it acts on (pause: queued; resume: paused), for a while.
    jobs_for: dict[str, list[str]]


@pytest.fixture(scope="module")
def world(fuzz_env: dict[str, str], fuzz_app) -> World:
    _, team_key = create_team_key(fuzz_env, "fuzz")
    # Admin operations act on another team, so a rotation or a disable never locks the
    # fuzzing team out.
    victim_id, _ = create_team_key(fuzz_env, "victim")
    worker_id = f"worker-fuzz-{uuid.uuid4().hex[:8]}"
    engine = make_engine(fuzz_env["LATHE_DATABASE_URL"])
    with make_sessionmaker(engine)() as session:
        _, admin_key = create_admin_key(session, f"fuzz-{uuid.uuid4().hex[:6]}")
        session.add(
            Worker(
                id=worker_id,
                host="fuzz",
                gpu_name="cpu",
                gpu_class="cpu",
                memory_gb=8,
                status="active",
                jobs_done=0,
                last_seen=time.time(),
            )
        )
        session.commit()
    engine.dispose()

    team = {"Authorization": f"Bearer {team_key}"}
    admin = {"Authorization": f"Bearer {admin_key}"}
    client = TestClient(fuzz_app)  # no lifespan: schemathesis runs the app's
    upload = client.post(
        "/v1/files",
        headers=team,
        files={"file": ("train.jsonl", CHAT)},
        data={"purpose": "fine-tune"},
    )
    assert upload.status_code == 200, upload.text
    file_id = upload.json()["id"]
    # Queued jobs (no scheduler runs here); the resume operation's are paused first.
    jobs_for: dict[str, list[str]] = {}
    for path in (
        "/v1/fine_tuning/jobs/{job_id}/cancel",
        "/v1/fine_tuning/jobs/{job_id}/pause",
        "/v1/fine_tuning/jobs/{job_id}/resume",
        "/v1/admin/jobs/{job_id}/cancel",
    ):
        for _ in range(2):
            job = client.post(
                "/v1/fine_tuning/jobs",
                headers=team,
                json={"model": TINY_RANDOM_LLAMA, "training_file": file_id},
            )
            assert job.status_code == 200, job.text
            job_id = job.json()["id"]
            if path.endswith("/resume"):
                paused = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=team)
                assert paused.status_code == 200, paused.text
            jobs_for.setdefault(path, []).append(job_id)
    keys = client.get(f"/v1/admin/teams/{victim_id}/keys", headers=admin)
    assert keys.status_code == 200, keys.text
    return World(
        team_auth=team["Authorization"],
        admin_auth=admin["Authorization"],
        ids={
            "file_id": [file_id],
            "job_id": [j for jobs in jobs_for.values() for j in jobs],
            "team_id": [victim_id],
            "key_id": [k["id"] for k in keys.json()["data"]],
            "worker_id": [worker_id],
            "model_id": [TINY_RANDOM_LLAMA],
        },
        file_id=file_id,
        jobs_for=jobs_for,
    )


def point_at_real_objects(case, world: World) -> None:
    """Valid cases only (a negative case must stay invalid): in about half of them, swap
    generated ids for real ones, and the job's model and file and the upload's purpose and
    content for accepted ones.

    The choices are a function of the case (not hypothesis draws: a `given` argument would
    turn schemathesis' coverage phase off), so a failure replays and shrinks the same.
    """
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    seed = zlib.crc32(repr((case.path_parameters, case.query, case.body)).encode())
    rng = random.Random(seed)
    headers = case.headers or {}
    if "Idempotency-Key" in headers and rng.random() < 0.75:
        # The generated keys repeat across cases (the coverage phase's always): mostly a
        # key of this case's own, so that retries with another body (422) stay the exception.
        headers["Idempotency-Key"] = f"fuzz-{seed:08x}"
    for name, value in list(case.path_parameters.items()):
        if name in world.ids and isinstance(value, str) and rng.random() < 0.5:
            pool = world.jobs_for.get(case.path) if name == "job_id" else None
            case.path_parameters[name] = rng.choice(pool or world.ids[name])
    body = case.body
    if case.method == "POST" and case.path == "/v1/fine_tuning/jobs" and isinstance(body, dict):
        if rng.random() < 0.5:
            body["model"] = TINY_RANDOM_LLAMA
            body["training_file"] = world.file_id
            body.pop("gpu_class", None)  # the pool has one class, "cpu"
            if body.get("validation_file") is not None:
                body["validation_file"] = world.file_id
    if case.method == "POST" and case.path == "/v1/files" and isinstance(body, dict):
        if rng.random() < 0.5:
            body["purpose"] = "fine-tune"
            if rng.random() < 0.5:
                body["file"] = CHAT


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=os.environ.get("LATHE_FUZZ_RANDOM") != "1",
    # Request bodies are large and slow to generate (JobCreate); that is the point here.
    suppress_health_check=list(HealthCheck),
)
def test_fuzz_openapi(case, fuzz_app, world: World) -> None:
    # The schema was loaded without the app (it needs this module's fixtures): bind it, as
    # schemathesis.openapi.from_asgi would have, so that the checks' own requests (ignored_auth
    # re-sends without a key) reach it too.
    case.operation.app = case.operation.schema.app = fuzz_app
    point_at_real_objects(case, world)
    auth = world.admin_auth if case.path.startswith("/v1/admin") else world.team_auth
    case.call_and_validate(headers={"Authorization": auth}, checks=CHECKS)


def _parameter(path: str, name: str) -> dict:
    operation = SPEC["paths"][path]["get"]
    return next(p for p in operation["parameters"] if p["name"] == name)["schema"]


def _property(component: str, name: str) -> dict:
    return SPEC["components"]["schemas"][component]["properties"][name]


@pytest.mark.parametrize(
    ("where", "refused", "accepted"),
    [
        # The requests the issue found valid by the document and refused by the API.
        (("/v1/fine_tuning/jobs", "after"), "x", "ftjob-" + "0" * 24),
        (("/v1/fine_tuning/jobs/{job_id}/events", "after"), "\x00", "ftevent-" + "a" * 24),
        (("/v1/fine_tuning/jobs/{job_id}/checkpoints", "after"), "", "ftckpt-" + "a" * 24),
        (("/v1/files", "after"), "file-\x00", "file-" + "1" * 24),
        (("/v1/admin/teams", "after"), "team-nope", "team-" + "b" * 24),
        (("/v1/admin/audit", "after"), "audit-nope", "audit-" + "c" * 24),
        (("/v1/usage", "period"), "", "2026-11"),
        (("/v1/admin/usage", "period"), "2026-13", "2026-01"),
        (("JobCreate", "model"), "", TINY_RANDOM_LLAMA),
        (("WebhookCreate", "url"), "0", "https://hooks.example.com/lathe"),
        (("WebhookCreate", "url"), "http://a..b/", "http://[::ffff:127.0.0.1]:8080/"),
        (("WebhookCreate", "url"), "https://user:pw@x.test/", "http://0:9/"),
    ],
)
def test_the_document_says_the_forms_the_api_refuses(where, refused, accepted) -> None:
    """Deterministic companions of valid_requests_not_refused: the forms the API refuses
    are schema-invalid in the served document, and real values are schema-valid."""
    from jsonschema import Draft202012Validator

    owner, name = where
    schema = _parameter(owner, name) if owner.startswith("/") else _property(owner, name)
    validator = Draft202012Validator(schema)
    assert not validator.is_valid(refused)
    assert validator.is_valid(accepted)
