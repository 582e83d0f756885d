"""A real job on a real worker, watched live over SSE; its success is delivered as a signed
webhook to a local receiver by the API's own delivery loop."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.api.test_event_stream import messages
from tests.conftest import create_team_key
from tests.e2e.conftest import SMALL, submit, team_client, upload
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(live_api: str, stack_env: dict[str, str], workers) -> httpx.Client:
    _, key = create_team_key(stack_env, "hooks")
    with team_client(live_api, key) as client:
        yield client


def test_a_job_streams_live_and_its_success_reaches_the_webhook(api: httpx.Client) -> None:
    with Receiver(statuses=[502]) as receiver:  # the first attempt fails: retried
        hook = api.post("/v1/webhooks", json={"url": receiver.url}).json()
        job_id = submit(api, upload(api), n_epochs=2, gpu_class=SMALL)

        with api.stream(
            "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"}, timeout=300
        ) as resp:
            received = list(messages(resp.iter_lines()))

        *events, end = received
        bodies = [json.loads(m["data"]) for m in events]
        steps = [b["data"]["step"] for b in bodies if b["type"] == "metrics"]
        assert len(steps) >= 2 and steps == sorted(steps), "metrics arrived, in order"
        assert bodies[-1]["message"].startswith("The job has successfully completed")
        assert (end["event"], json.loads(end["data"])["status"]) == ("end", "succeeded")

        # Retried within the loop's base delay (LATHE_WEBHOOK_RETRY_BASE_SECONDS, 10 s).
        first, second = receiver.wait(2, timeout=60)

    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    event = openai.OpenAI(api_key="unused", base_url="http://unused").webhooks.unwrap(
        second.body, second.headers, secret=hook["secret"]
    )
    assert (event.type, event.data.id) == ("fine_tuning.job.succeeded", job_id)
    assert json.loads(second.body)["data"]["fine_tuned_model"].startswith("ft:tiny-random-llama")
    [delivery] = api.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"]
    assert (delivery["status"], delivery["attempts"]) == ("delivered", 2)
