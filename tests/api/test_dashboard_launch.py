"""The dashboard's launch form (/jobs/new), its clone link and the files page, in-process on
Postgres, Redis and S3: the form's defaults and limits come from JobCreate, an upload goes
through the file service and a refused one shows its line, errors land on their fields
(pydantic's and the services' `param`), Check shows the estimate, Submit creates the job;
a job's settings fill the form; the files page lists and deletes, refusing a file in use.
The browser run is tests/e2e/test_dashboard_launch.py."""

from __future__ import annotations

import re

import pytest

from app.schemas.jobs import JobCreate
from tests.api.datasets import CHAT
from tests.api.html_query import Element, parse
from tests.api.test_dashboard import MODEL, browser_for, csrf_of, signed_in

BAD = CHAT + b'{"messages": [{"role": "user", "content": "hi"}]}\n' + b"not json\n"


@pytest.fixture
def browser(api, team):
    with signed_in(api, team.key) as client:
        yield client


def page(html: str) -> Element:
    return parse(html)


def field(soup: Element, name: str) -> Element:
    found = soup.select_one(f'[data-field="{name}"]')
    assert found is not None, f"no field {name}"
    return found


def post_form(browser, data: dict, files: dict | None = None):
    form = browser.get("/jobs/new")
    body = {"csrf": csrf_of(form.text), "model": MODEL, "method": "supervised", "packing": "on"}
    body.update(data)
    return browser.post("/jobs/new", data=body, files=files or {"training_upload": ("", b"")})


def test_the_form_shows_the_schemas_defaults_and_limits(browser) -> None:
    resp = browser.get("/jobs/new")
    assert resp.status_code == 200
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
    soup = page(resp.text)
    assert soup.select_one('script[src="/static/upload.js"]') is not None
    schema = JobCreate.model_json_schema()["$defs"]
    lora_r = schema["LoraIn"]["properties"]["r"]
    assert field(soup, "lora_r").select_one("input")["value"] == str(lora_r["default"])
    assert soup.select_one("#limits-lora_r").text.strip() == (
        f"default {lora_r['default']}; {lora_r['minimum']} to {lora_r['maximum']}"
    )
    assert soup.select_one("#limits-n_epochs").text.strip() == "default auto; 1 to 50"
    assert "above 0, up to 2" in soup.select_one("#limits-beta").text
    assert soup.select_one("#limits-max_seq_length").text.startswith("default 1024; 16 to 32768")
    assert soup.select_one("#packing").has_attr("checked")
    assert [o["value"] for o in soup.select("#priority option")] == ["low", "normal", "high"]
    assert soup.select_one("#priority option[selected]")["value"] == "normal"
    assert MODEL in [o["value"] for o in soup.select("#model option")]
    assert "cpu (8 GB)" in soup.select_one("#gpu_class").text
    # Every other page keeps "no script at all".
    assert "script-src" not in browser.get("/jobs").headers["content-security-policy"]


def test_the_form_needs_a_session_and_its_token(api, browser, team) -> None:
    resp = browser_for(api).get("/jobs/new")
    assert resp.status_code == 303 and resp.headers["location"].startswith("/login")
    before = team.get("/v1/fine_tuning/jobs").json()["data"]
    resp = browser.post(
        "/jobs/new", data={"csrf": "forged", "model": MODEL}, files={"x": ("", b"")}
    )
    assert (resp.status_code, resp.headers["location"]) == (303, "/jobs/new?notice=bad_csrf")
    assert team.get("/v1/fine_tuning/jobs").json()["data"] == before


def test_upload_and_submit_create_the_job_and_go_to_its_page(browser, team) -> None:
    resp = post_form(
        browser,
        {
            "action": "submit",
            "n_epochs": "1",
            "batch_size": "2",
            "max_seq_length": "128",
            "lora_r": "4",
            "suffix": "from-form",
            "seed": "7",
            "priority": "high",
        },
        {"training_upload": ("chat.jsonl", CHAT)},
    )
    assert resp.status_code == 303, page(resp.text).select("[role=alert]")
    job_id = resp.headers["location"].removeprefix("/jobs/")
    job = team.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert (job["model"], job["seed"], job["max_seq_length"]) == (MODEL, 7, 128)
    assert job["hyperparameters"]["n_epochs"] == 1 and job["hyperparameters"]["batch_size"] == 2
    assert job["lora"]["r"] == 4 and job["training"]["packing"] is True
    uploaded = team.get(f"/v1/files/{job['training_file']}").json()
    assert (uploaded["filename"], uploaded["purpose"]) == ("chat.jsonl", "fine-tune")
    assert "<code>from-form</code>" in browser.get(f"/jobs/{job_id}").text  # the suffix


def test_an_upload_shows_the_servers_verdict_beside_the_file(browser, team) -> None:
    resp = post_form(browser, {"action": "upload"}, {"training_upload": ("chat.jsonl", CHAT)})
    assert resp.status_code == 200
    soup = page(resp.text)
    verdict = soup.select_one("#verdict-training_upload")
    assert "chat.jsonl is valid" in verdict.text and "12 examples" in verdict.text
    chosen = soup.select_one("#training_file option[selected]")["value"]
    assert chosen.startswith("file-") and chosen in verdict.text
    assert team.get(f"/v1/files/{chosen}").json()["filename"] == "chat.jsonl"
    # The other fields come back as they were sent.
    assert soup.select_one("#model option[selected]")["value"] == MODEL


def test_a_refused_upload_shows_its_line_and_stores_nothing(browser, team) -> None:
    before = len(team.get("/v1/files").json()["data"])
    resp = post_form(
        browser,
        {"action": "submit", "suffix": "kept"},
        {"training_upload": ("bad.jsonl", BAD)},
    )
    assert resp.status_code == 400
    soup = page(resp.text)
    verdict = soup.select_one('[data-field="training_file"] #verdict-training_upload')
    assert verdict["role"] == "alert"
    assert "bad.jsonl" in verdict.text and re.search(r"line 1[34]\b", verdict.text), verdict.text
    assert soup.select_one("#suffix")["value"] == "kept"
    assert len(team.get("/v1/files").json()["data"]) == before
    assert team.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_a_schema_error_lands_on_its_field_with_the_form_refilled(browser, team) -> None:
    train = team.upload(CHAT).json()["id"]
    resp = post_form(
        browser,
        {
            "action": "submit",
            "training_file": train,
            "n_epochs": "99",
            "lora_dropout": "x",
            "suffix": "has space",
        },
    )
    assert resp.status_code == 400
    soup = page(resp.text)
    epochs = field(soup, "n_epochs")
    assert "invalid" in epochs["class"]
    assert "less than or equal to 50" in epochs.select_one(".field-error").text
    assert epochs.select_one("input")["value"] == "99"
    assert "enter a number" in field(soup, "lora_dropout").select_one(".field-error").text
    assert field(soup, "suffix").select_one(".field-error") is not None
    assert field(soup, "lora_r").select_one(".field-error") is None
    assert soup.select_one("#training_file option[selected]")["value"] == train


def test_a_services_refusal_lands_on_the_field_its_param_names(browser, team) -> None:
    train = team.upload(CHAT).json()["id"]
    resp = post_form(
        browser, {"action": "submit", "training_file": train, "gpu_class": "no-such-class"}
    )
    assert resp.status_code == 400
    message = field(page(resp.text), "gpu_class").select_one(".field-error").text
    assert "gpu_class 'no-such-class' is not in this pool" in message
    # batch_size_not_divisible names method.supervised.hyperparameters.batch_size.
    resp = post_form(
        browser, {"action": "submit", "training_file": train, "batch_size": "3", "gpus": "2"}
    )
    assert resp.status_code == 400
    message = field(page(resp.text), "batch_size").select_one(".field-error").text
    assert "multiple of 2" in message
    resp = post_form(browser, {"action": "submit", "model": ""})
    soup = page(resp.text)
    assert field(soup, "model").select_one(".field-error").text == "Choose a model."
    assert "upload one" in field(soup, "training_file").select_one(".field-error").text
    assert team.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_check_shows_the_estimate_and_the_classes_that_fit(browser, team) -> None:
    train = team.upload(CHAT).json()["id"]
    resp = post_form(browser, {"action": "check", "training_file": train, "max_seq_length": "128"})
    assert resp.status_code == 200
    soup = page(resp.text)
    small = float(soup.select_one("#memory-gb").text)
    assert 0 < small < 8
    row = soup.select_one('#fitting-classes tr[data-class="cpu"]')
    assert "fits" in row["class"]
    bigger = post_form(
        browser,
        {"action": "check", "training_file": train, "max_seq_length": "4096", "batch_size": "64"},
    )
    assert float(page(bigger.text).select_one("#memory-gb").text) > small
    assert team.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was created


def test_a_form_without_its_length_is_refused_unread(browser, team) -> None:
    """A chunked body states no length, and Starlette would spool its file parts to disk
    without a limit: refused before the form is read."""
    form = browser.get("/jobs/new")

    def chunks():
        yield f"csrf={csrf_of(form.text)}&action=submit&model={MODEL}".encode()

    resp = browser.post(
        "/jobs/new",
        content=chunks(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert resp.status_code == 411
    assert "Content-Length" in resp.text
    assert team.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_check_refuses_what_submit_would_on_its_field(browser, team) -> None:
    """Check runs create_job's own checks (plan_job), the validation file's too."""
    train = team.upload(CHAT).json()["id"]
    missing = {"training_file": train, "validation_file": "file-nosuchfile"}
    for action in ("check", "submit"):
        resp = post_form(browser, {"action": action, **missing})
        assert resp.status_code == 400, action
        error = field(page(resp.text), "validation_file").select_one(".field-error")
        assert "validation_file 'file-nosuchfile' does not exist" in error.text, action
    assert team.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_run_again_fills_the_form_with_the_jobs_settings(browser, team, other_team) -> None:
    train = team.upload(CHAT).json()["id"]
    valid = team.upload(CHAT, name="valid.jsonl").json()["id"]
    resp = team.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": MODEL,
            "training_file": train,
            "validation_file": valid,
            "hyperparameters": {"n_epochs": 2, "batch_size": 4},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
            "training": {"packing": False, "eval_steps": 3},
            "max_seq_length": 256,
            "priority": "low",
            "suffix": "again",
            "seed": 42,
        },
    )
    job = resp.json()
    job_page = page(browser.get(f"/jobs/{job['id']}").text)
    assert job_page.select_one("#run-again")["href"] == f"/jobs/new?from={job['id']}"
    soup = page(browser.get(f"/jobs/new?from={job['id']}").text)
    assert job["id"] in soup.select_one("#cloned-from").text
    inputs = {
        name: soup.select_one(f"#{name}")
        for name in (
            "n_epochs",
            "batch_size",
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "max_seq_length",
            "suffix",
            "seed",
            "eval_steps",
        )
    }
    assert {k: v["value"] for k, v in inputs.items()} == {
        "n_epochs": "2",
        "batch_size": "4",
        "lora_r": "4",
        "lora_alpha": "8",
        "lora_dropout": "0.1",
        "max_seq_length": "256",
        "suffix": "again",
        "seed": "42",
        "eval_steps": "3",
    }
    assert not soup.select_one("#packing").has_attr("checked")
    assert soup.select_one("#priority option[selected]")["value"] == "low"
    assert soup.select_one("#training_file option[selected]")["value"] == train
    assert soup.select_one("#validation_file option[selected]")["value"] == valid
    assert soup.select_one("#model option[selected]")["value"] == MODEL
    # Another team's job is not theirs to copy.
    with signed_in(browser, other_team.key) as other:
        assert other.get(f"/jobs/new?from={job['id']}").status_code == 404


def test_the_files_page_lists_files_and_refuses_to_delete_one_in_use(browser, team) -> None:
    used = team.upload(CHAT, name="used.jsonl").json()["id"]
    spare = team.upload(CHAT, name="spare.jsonl").json()["id"]
    job = team.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": used}).json()
    resp = browser.get("/files")
    assert resp.status_code == 200
    soup = page(resp.text)
    row = soup.select_one(f'tr[data-file="{used}"]')
    assert "used.jsonl" in row.text and "chat" in row.text and "12" in row.text
    assert row.select_one(f'.used-by a[data-job="{job["id"]}"]') is not None
    assert "training" in row.select_one(".used-by").text
    assert soup.select_one(f'tr[data-file="{spare}"] .used-by a') is None

    refused = browser.post(f"/files/{used}/delete", data={"csrf": csrf_of(resp.text)})
    assert refused.status_code == 400
    assert f"in use by job {job['id']}" in page(refused.text).select_one("#files-error").text
    assert team.get(f"/v1/files/{used}").status_code == 200

    forged = browser.post(f"/files/{spare}/delete", data={"csrf": "forged"})
    assert forged.headers["location"] == "/files?notice=bad_csrf"
    deleted = browser.post(f"/files/{spare}/delete", data={"csrf": csrf_of(resp.text)})
    assert (deleted.status_code, deleted.headers["location"]) == (303, "/files?notice=file_deleted")
    assert team.get(f"/v1/files/{spare}").status_code == 404
    assert "The file was deleted." in browser.get(deleted.headers["location"]).text
