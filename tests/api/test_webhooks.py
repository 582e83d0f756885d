"""Webhooks: registration, the outbox written with a job's outcome, signed delivery, retries."""

from __future__ import annotations

import json

import openai
import pytest

from app.config import Settings
from app.services.webhooks import CONNECTION_FAILED, deliver_due, retry_delay, sender_client
from tests.api.datasets import CHAT
from tests.conftest import settings_from
from tests.webhook_receiver import Receiver


def settings(api_env: dict[str, str], **overrides) -> Settings:
    return settings_from(
        {**api_env, **{f"LATHE_{k.upper()}": str(v) for k, v in overrides.items()}}
    )


def cancelled_job(team) -> str:
    file_id = team.upload(CHAT).json()["id"]
    job = team.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-random-llama", "training_file": file_id}
    ).json()
    assert team.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    return job["id"]


def test_a_cancelled_job_is_delivered_signed_as_openai_verifies_it(team, api_env, sessions) -> None:
    with Receiver() as receiver:
        created = team.post("/v1/webhooks", json={"url": receiver.url}).json()
        assert created["secret"].startswith("whsec_")
        assert created["event_types"] == [
            "fine_tuning.job.cancelled",
            "fine_tuning.job.failed",
            "fine_tuning.job.succeeded",
        ]
        job_id = cancelled_job(team)

        with sender_client(settings(api_env)) as client:
            assert deliver_due(sessions, client, settings(api_env)) == 1
        [delivery] = receiver.wait(1, timeout=5)

    # The official SDK verifies the signature and parses the event (Standard Webhooks).
    sdk = openai.OpenAI(api_key="unused", base_url="http://unused")
    event = sdk.webhooks.unwrap(delivery.body, delivery.headers, secret=created["secret"])
    assert event.type == "fine_tuning.job.cancelled"
    assert event.data.id == job_id
    assert json.loads(delivery.body)["data"]["status"] == "cancelled"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.unwrap(delivery.body + b" ", delivery.headers, secret=created["secret"])

    deliveries = team.get(f"/v1/webhooks/{created['id']}/deliveries").json()["data"]
    assert [(d["status"], d["attempts"], d["last_status_code"]) for d in deliveries] == [
        ("delivered", 1, 200)
    ]
    listed = team.get("/v1/webhooks").json()["data"]
    assert [w["id"] for w in listed] == [created["id"]] and "secret" not in listed[0]


def test_failed_deliveries_are_retried_with_backoff_then_given_up(team, api_env, sessions) -> None:
    now_settings = settings(api_env, webhook_retry_base_seconds=0, webhook_max_attempts=3)
    with Receiver(statuses=[500, 503]) as receiver:
        hook = team.post("/v1/webhooks", json={"url": receiver.url}).json()
        cancelled_job(team)
        with sender_client(now_settings) as client:
            # No delay between retries here: 500, 503, then 200 within one pass.
            assert deliver_due(sessions, client, now_settings) == 3
            assert deliver_due(sessions, client, now_settings) == 0, "delivered: none due"
        received = receiver.wait(3, timeout=5)
    assert len({r.headers["webhook-id"] for r in received}) == 1, "one event, retried"
    [delivery] = team.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"]
    assert (delivery["status"], delivery["attempts"]) == ("delivered", 3)

    # A receiver that never answers 2xx: given up after webhook_max_attempts.
    dead = team.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/nothing"}).json()
    cancelled_job(team)
    with sender_client(now_settings) as client:
        while deliver_due(sessions, client, now_settings):
            pass
    [gone] = team.get(f"/v1/webhooks/{dead['id']}/deliveries").json()["data"]
    assert (gone["status"], gone["attempts"]) == ("failed", 3)
    assert (gone["last_error"], gone["last_status_code"]) == (CONNECTION_FAILED, None)


def test_a_denied_address_is_not_called_and_does_not_block_others(team, api_env, sessions) -> None:
    strict = settings(api_env, webhook_denied_networks='["127.0.0.0/8"]')
    with Receiver() as receiver:
        team.post("/v1/webhooks", json={"url": receiver.url})
        cancelled_job(team)
        cancelled_job(team)
        with sender_client(strict) as client:
            assert deliver_due(sessions, client, strict) == 2, "both tried, neither blocks"
    assert receiver.received == []
    hook = team.get("/v1/webhooks").json()["data"][0]
    deliveries = team.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"]
    assert all("denied network" in d["last_error"] for d in deliveries)
    assert all(d["status"] == "pending" and d["attempts"] == 1 for d in deliveries)


def test_backoff_grows_by_three_and_is_capped() -> None:
    assert [retry_delay(n, 10) for n in (1, 2, 3)] == [10, 30, 90]
    assert retry_delay(20, 10) == 6 * 3600


def test_webhooks_only_for_the_event_types_asked_and_the_team(
    team, other_team, api_env, sessions
) -> None:
    with Receiver() as receiver:
        team.post(
            "/v1/webhooks", json={"url": receiver.url, "event_types": ["fine_tuning.job.succeeded"]}
        )
        other_team.post("/v1/webhooks", json={"url": receiver.url})
        cancelled_job(team)  # a cancel: not asked for; the other team's hook is not ours
        with sender_client(settings(api_env)) as client:
            assert deliver_due(sessions, client, settings(api_env)) == 0
    assert receiver.received == []


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"url": "ftp://example.com/x"}, "url", "invalid_url"),
        ({"url": "http:///nohost"}, "url", "invalid_url"),
        ({"url": "https://x.test", "event_types": ["job.done"]}, "event_types", "invalid_value"),
        ({"url": "https://x.test", "secret": "mine"}, "secret", "invalid_value"),
        ({"url": "https://user:pw@x.test/h"}, "url", "invalid_url"),
        ({"url": "http://a..b/"}, "url", "invalid_url"),
    ],
)
def test_bad_webhooks_are_refused(team, body: dict, param: str, code: str) -> None:
    resp = team.post("/v1/webhooks", json=body)
    assert resp.status_code == 400, resp.text
    assert (resp.json()["error"]["param"], resp.json()["error"]["code"]) == (param, code)


def test_another_teams_webhook_is_404_and_delete_removes_it(team, other_team) -> None:
    hook = team.post("/v1/webhooks", json={"url": "https://x.test/h"}).json()
    assert other_team.delete(f"/v1/webhooks/{hook['id']}").status_code == 404
    assert other_team.get(f"/v1/webhooks/{hook['id']}/deliveries").status_code == 404
    assert team.delete(f"/v1/webhooks/{hook['id']}").json()["deleted"] is True
    assert team.get("/v1/webhooks").json()["data"] == []
