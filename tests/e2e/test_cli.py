"""The `lathe` client CLI end to end: the real command (a subprocess, or Typer's CliRunner
for quick reads) against the production-shaped stack: login and its config file, uploads
with a progress bar and a bad line's message, a job created from a local file and watched
over server-sent events to success, --json outputs, the adapter downloaded and loaded with
peft, exit codes for a cancelled job and for API errors. Plus the SSE parser and the
watch's reconnect, against a mock transport."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from app.cli import app
from app.client.config import Target
from app.client.http import APIError, LatheClient
from app.client.sse import job_event_stream, parse_sse
from tests.conftest import create_team_key

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "app" / "data"
MODEL = "tiny-random-llama"
slow = pytest.mark.slow


def base_env(home: Path) -> dict[str, str]:
    """The environment without any LATHE_API_* of the caller's, with a private HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATHE_API_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / "config"), COLUMNS="200")
    return env


def lathe(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


@pytest.fixture(scope="module")
def team_key(e2e_env: dict[str, str]) -> str:
    return create_team_key(e2e_env, "cli")[1]


@pytest.fixture(scope="module")
def env(live_api: str, team_key: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The client's environment: server and key from LATHE_API_URL / LATHE_API_KEY."""
    home = tmp_path_factory.mktemp("cli-home")
    return {**base_env(home), "LATHE_API_URL": live_api, "LATHE_API_KEY": team_key}


def run_json(env: dict[str, str], *args: str):
    """A read command in this process (CliRunner), its --json output parsed."""
    result = CliRunner().invoke(app, [*args, "--json"], env=env)
    assert result.exit_code == 0, (result.exit_code, result.output)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def trained(env: dict[str, str], workers) -> dict:
    """One small job created from local files (uploaded first) and watched to success."""
    created = ok(
        lathe(
            env,
            "jobs",
            "create",
            "--model",
            MODEL,
            "--train",
            str(DATA / "sample_chat_valid.jsonl"),
            "--valid",
            str(DATA / "sample_chat_valid.jsonl"),
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--max-seq-length",
            "128",
            "--lora-r",
            "4",
            "--suffix",
            "cli",
        )
    )
    job_id = created.stdout.strip().splitlines()[-1]
    watched = lathe(env, "jobs", "watch", job_id, timeout=600)  # live: the job runs now
    return {"id": job_id, "created": created, "watched": watched}


# --- login and config ---------------------------------------------------------------------


@slow
def test_login_writes_a_private_config_that_later_commands_use(
    live_api: str, team_key: str, workers, tmp_path: Path
) -> None:
    env = base_env(tmp_path)  # no LATHE_API_* at all
    unconfigured = lathe(env, "jobs", "list")
    assert unconfigured.returncode == 5
    assert "lathe login" in unconfigured.stderr

    refused = lathe(env, "login", "--api-url", live_api, "--api-key", "lathe-not-a-key")
    assert refused.returncode == 4
    assert "invalid_api_key" in refused.stderr
    config = tmp_path / "config" / "lathe" / "config.toml"
    assert not config.exists()  # a key that does not work is not saved

    ok(lathe(env, "login", "--api-url", live_api + "/", "--api-key", team_key))
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert config.read_text() == f'api_url = "{live_api}"\napi_key = "{team_key}"\n'

    page = json.loads(ok(lathe(env, "jobs", "list", "--json")).stdout)
    assert page["object"] == "list"
    # The environment and options override the file.
    wrong = lathe({**env, "LATHE_API_KEY": "lathe-wrong"}, "workers")
    assert wrong.returncode == 4
    wrong = lathe(env, "usage", "--api-url", "http://127.0.0.1:9")
    assert wrong.returncode == 5
    assert "cannot reach http://127.0.0.1:9" in wrong.stderr


# --- files --------------------------------------------------------------------------------


@slow
def test_upload_shows_progress_and_the_file_id(env, workers, tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    with big.open("w") as fh:
        for i in range(20000):
            fh.write(json.dumps({"text": f"example {i}: " + "lorem ipsum dolor " * 4}) + "\n")
    # FORCE_COLOR makes Rich treat the pipe as a terminal, so the live bar is drawn.
    out = ok(lathe({**env, "FORCE_COLOR": "1"}, "files", "upload", str(big))).stdout
    assert "uploading big.jsonl" in out
    assert re.search(r"\d\.\d/2\.\d MB", out)  # the bar counts the bytes sent
    assert re.search(r"uploaded.* big.jsonl as .*file-[0-9a-f]+.* \(2\.\d MB, processed\)", out)

    uploaded = json.loads(ok(lathe(env, "files", "upload", str(big), "--json")).stdout)
    assert uploaded["id"].startswith("file-")
    assert uploaded["bytes"] == big.stat().st_size
    listed = run_json(env, "files", "list")
    assert uploaded["id"] in [f["id"] for f in listed["data"]]


@slow
def test_a_bad_dataset_line_is_reported_with_its_line_number(env, workers, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": 42}\n')
    result = lathe(env, "files", "upload", str(bad))
    assert result.returncode == 4
    assert "error 400 invalid_type" in result.stderr
    assert "line 3" in result.stderr
    assert "Traceback" not in result.stderr


# --- a job: create, watch, read, download -------------------------------------------------


@slow
def test_create_uploads_local_files_and_watch_follows_the_job_to_success(trained) -> None:
    created, watched = trained["created"], trained["watched"]
    assert trained["id"].startswith("ftjob-")
    assert created.stderr.count("uploaded sample_chat_valid.jsonl as file-") == 2
    assert watched.returncode == 0, (watched.stdout, watched.stderr)
    out = watched.stdout
    # Not a terminal: a line per step, then the bar's final state and the outcome.
    assert "Step 1/5: training loss=" in out
    assert "Step 5/5" in out
    assert "5/5 steps" in out
    assert "validation loss=" in out
    assert "✔ succeeded ft:tiny-random-llama:cli-" in out
    assert f"lathe jobs download {trained['id']}" in out


@slow
def test_json_outputs_parse(env, trained, workers) -> None:
    job = run_json(env, "jobs", "get", trained["id"])
    assert job["status"] == "succeeded"
    assert job["stats"]["throughput"]["tokens_per_second"] > 0
    assert job["hyperparameters"]["n_epochs"] == 1
    assert trained["id"] in [j["id"] for j in run_json(env, "jobs", "list")["data"]]
    assert set(workers.values()) <= {w["id"] for w in run_json(env, "workers")["data"]}
    usage = run_json(env, "usage")
    assert usage["object"] == "usage"
    assert usage["team"].startswith("cli-")
    assert run_json(env, "usage", "--period", "2020-01")["gpu_seconds"] == 0

    # watch on a finished job replays its events, then prints the job on stdout.
    replay = lathe(env, "jobs", "watch", trained["id"], "--json")
    assert replay.returncode == 0
    assert json.loads(replay.stdout)["fine_tuned_model"] == job["fine_tuned_model"]
    assert "Step 5/5" in replay.stderr


@slow
def test_get_shows_a_readable_panel(env, trained) -> None:
    out = ok(lathe(env, "jobs", "get", trained["id"])).stdout
    for label in (
        "succeeded",
        "ft:tiny-random-llama:cli-",
        "epochs 1, batch size 2",
        "tokens per epoch",
        "trainable params",
        "tokens/s",
        "peak memory",
    ):
        assert label in out, out


@slow
def test_download_unpacks_an_adapter_peft_loads(env, trained, e2e_env, tmp_path) -> None:
    out = tmp_path / "adapter"
    result = ok(lathe(env, "jobs", "download", trained["id"], "-o", str(out)))
    assert result.stdout.strip() == str(out)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    again = lathe(env, "jobs", "download", trained["id"], "-o", str(out))
    assert again.returncode == 6  # will not unpack over files

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(Path(e2e_env["LATHE_HOME"]) / "models" / MODEL)
    tuned = PeftModel.from_pretrained(base, out)
    assert any("lora_A" in name for name, _ in tuned.named_parameters())
    with torch.no_grad():
        logits = tuned(input_ids=torch.tensor([[1, 5, 9, 13]])).logits
    assert logits.shape[:2] == (1, 4)
    assert torch.isfinite(logits).all()


@slow
def test_watch_of_a_cancelled_job_exits_2(env, trained) -> None:
    job = run_json(env, "jobs", "get", trained["id"])
    created = ok(
        lathe(
            env,
            "jobs",
            "create",
            "--model",
            MODEL,
            "--train",
            job["training_file"],  # a file id is used as is
            "--epochs",
            "50",
            "--batch-size",
            "2",
            "--max-seq-length",
            "128",
            "--json",
        )
    )
    job_id = json.loads(created.stdout)["id"]
    assert "uploaded" not in created.stderr
    assert "cancelled" in ok(lathe(env, "jobs", "cancel", job_id)).stdout
    watched = lathe(env, "jobs", "watch", job_id)
    assert watched.returncode == 2, (watched.stdout, watched.stderr)
    assert "cancelled" in watched.stdout
    again = lathe(env, "jobs", "cancel", job_id)
    assert again.returncode == 4
    assert "job_not_cancellable" in again.stderr


@slow
def test_watch_of_a_paused_job_exits_3(env, trained) -> None:
    job = run_json(env, "jobs", "get", trained["id"])
    job_id = ok(
        lathe(env, "jobs", "create", "-m", MODEL, "-t", job["training_file"], "--epochs", "50")
    ).stdout.strip()
    assert "paused" in ok(lathe(env, "jobs", "pause", job_id)).stdout
    watched = lathe(env, "jobs", "watch", job_id)
    assert watched.returncode == 3, (watched.stdout, watched.stderr)
    assert f"lathe jobs resume {job_id}" in watched.stdout
    ok(lathe(env, "jobs", "cancel", job_id))


@slow
def test_api_errors_print_the_envelope_and_exit_4(env, workers) -> None:
    result = lathe(env, "jobs", "get", "ftjob-000000000000000000000000")
    assert result.returncode == 4
    assert result.stderr.startswith("error 404 job_not_found: ")
    assert "param: fine_tuning_job_id" in result.stderr
    watched = lathe(env, "jobs", "watch", "ftjob-000000000000000000000000")
    assert watched.returncode == 4


# --- no server needed ---------------------------------------------------------------------


def test_the_client_never_imports_torch() -> None:
    code = (
        "import sys, app.cli, app.client.commands\n"
        "heavy = {'torch', 'transformers', 'peft'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_sse_parser() -> None:
    lines = [
        "retry: 2000",
        "",
        ": keepalive",
        "id: ftevent-1",
        "event: fine_tuning.job.event",
        'data: {"id": "ftevent-1",',
        'data:  "message": "hi"}',
        "",
        "event: end",
        "data: {}",
        "",
    ]
    events = list(parse_sse(lines))
    assert [e.retry for e in events] == [2000, None, None]
    assert events[1].event == "fine_tuning.job.event"
    assert events[1].id == "ftevent-1"
    assert json.loads(events[1].data) == {"id": "ftevent-1", "message": "hi"}
    assert events[2].event == "end"


def test_watch_stream_reconnects_after_the_last_event() -> None:
    def message(n: int) -> bytes:
        event = {"id": f"ftevent-{n}", "type": "message", "message": f"event {n}"}
        return (
            f"id: ftevent-{n}\nevent: fine_tuning.job.event\ndata: {json.dumps(event)}\n\n".encode()
        )

    requests: list[httpx.Request] = []

    def dropped():
        yield message(1)
        yield message(2)
        raise httpx.ReadError("connection reset")

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        headers = {"content-type": "text/event-stream"}
        if len(requests) == 1:
            return httpx.Response(200, headers=headers, content=dropped())
        if len(requests) == 2:
            return httpx.Response(503, json={"error": {"message": "restarting", "code": None}})
        end = b'event: end\ndata: {"id": "ftjob-1", "status": "succeeded"}\n\n'
        return httpx.Response(200, headers=headers, content=message(2) + message(3) + end)

    client = LatheClient(Target("http://lathe.test", "k"), transport=httpx.MockTransport(handler))
    items = list(job_event_stream(client, "ftjob-1", reconnect_delay=0))
    kinds = [kind for kind, _ in items]
    assert kinds == ["event", "event", "reconnect", "reconnect", "event", "end"]
    assert [item["message"] for kind, item in items if kind == "event"] == [
        "event 1",
        "event 2",
        "event 3",  # event 2 sent again is not repeated
    ]
    assert items[-1][1]["status"] == "succeeded"
    assert "Last-Event-ID" not in requests[0].headers
    for request in requests[1:]:
        assert request.headers["Last-Event-ID"] == "ftevent-2"
        assert request.url.params["after"] == "ftevent-2"
        assert request.url.params["stream"] == "true"


def test_watch_stream_stops_with_the_servers_error_event_instead_of_reconnecting() -> None:
    """The server ends a stream with `error` when its key is revoked or the team disabled
    (app/api/event_stream.py): the client raises it at once, as the request's 401/403."""
    requests: list[httpx.Request] = []
    body = {
        "error": {
            "message": "invalid or revoked API key",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        content = f"event: error\ndata: {json.dumps(body)}\n\n".encode()
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=content)

    client = LatheClient(Target("http://lathe.test", "k"), transport=httpx.MockTransport(handler))
    with pytest.raises(APIError) as raised:
        list(job_event_stream(client, "ftjob-1", reconnect_delay=0))
    assert (raised.value.status, raised.value.code) == (401, "invalid_api_key")
    assert len(requests) == 1


def test_get_says_when_no_fitting_worker_is_online() -> None:
    from rich.console import Console

    from app.client.render import job_panel

    job = {"id": "ftjob-1", "status": "queued", "model": "m", "created_at": 0}
    queue = {"position": 1, "waiting_for": "no worker of class a100-80gb is online"}
    console = Console(width=200, record=True)
    console.print(job_panel(job, queue))
    text = console.export_text()
    assert "waiting for" in text
    assert "no worker of class a100-80gb is online" in text


# --- a classifier's report ----------------------------------------------------------------

MARKUP = "[red]evil[/]"  # a class name that Rich would take for markup
CLASSES = [MARKUP, "Sports", "World"]
# True evil: 2 right, 1 read as Sports; Sports: 3 right; World: 1 right, 2 read as evil.
MATRIX = [[2, 1, 0], [0, 3, 0], [2, 0, 1]]


def classified_job(status: str = "succeeded") -> dict:
    from app.domain.classification import classification_report

    labels = [
        i for i, row in enumerate(MATRIX) for j, count in enumerate(row) for _ in range(count)
    ]
    predicted = [j for row in MATRIX for j, count in enumerate(row) for _ in range(count)]
    report = classification_report(CLASSES, labels, predicted) | {"step": 12}
    return {
        "id": "ftjob-1",
        "status": status,
        "model": "tiny-bert",
        "fine_tuned_model": "ft:tiny-bert:cls",
        "created_at": 100,
        "finished_at": 160,
        "trained_tokens": 640,
        "stats": {"classification": report},
    }


def table_rows(text: str, width: int) -> list[list[str]]:
    """The rows of Rich tables in exported text with `width` cells, as stripped strings."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split("[│┃]", line)[1:-1]]
        if len(cells) == width:
            rows.append(cells)
    return rows


def test_watch_shows_a_classifiers_scores_then_its_report_and_confusion_matrix() -> None:
    import io

    from rich.console import Console

    from app.client.watch import watch_job

    job = classified_job()
    metrics = {
        "id": "ftevent-1",
        "type": "metrics",
        "level": "info",
        "created_at": 150,
        "message": "Step 12/12: training loss=0.5000, validation loss=0.9000",
        "data": {
            "step": 12,
            "total_steps": 12,
            "train_loss": 0.5,
            "valid_loss": 0.9,
            "valid_accuracy": 0.6667,
            "valid_macro_f1": 0.6429,
        },
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            body = (
                f"id: ftevent-1\nevent: fine_tuning.job.event\ndata: {json.dumps(metrics)}\n\n"
                f"event: end\ndata: {json.dumps(job)}\n\n"
            )
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=body.encode()
            )
        return httpx.Response(200, json={**job, "status": "running"})

    client = LatheClient(Target("http://lathe.test", "k"), transport=httpx.MockTransport(handler))
    console = Console(width=200, record=True, file=io.StringIO(), highlight=False)
    final, code = watch_job(client, "ftjob-1", console, step_lines=True)
    text = console.export_text()
    assert (final["status"], code) == ("succeeded", 0)
    assert "validation loss=0.9000, accuracy 0.667, macro-F1 0.643" in text  # the step line
    assert "valid accuracy 0.667, valid macro-F1 0.643" in text  # the outcome
    assert (
        "classification: accuracy 0.667, macro-F1 0.643 on 9 validation examples (step 12)" in text
    )
    assert table_rows(text, 5) == [
        ["class", "precision", "recall", "F1", "support"],
        [MARKUP, "0.500", "0.667", "0.571", "3"],  # the name as written, not as markup
        ["Sports", "0.750", "1.000", "0.857", "3"],
        ["World", "1.000", "0.333", "0.500", "3"],
    ]
    assert "confusion matrix: rows the true class, columns the predicted one" in text
    assert table_rows(text, 4) == [
        ["true \\ predicted", *CLASSES],
        [MARKUP, "2", "1", "0"],
        ["Sports", "0", "3", "0"],
        ["World", "2", "0", "1"],
    ]


def test_get_shows_a_classifiers_figures_and_leaves_out_a_matrix_too_wide_to_read() -> None:
    from rich.console import Console

    from app.client.render import MAX_MATRIX_CLASSES, classification_section, job_panel

    job = classified_job()
    console = Console(width=200, record=True)
    console.print(job_panel(job, None))
    panel = console.export_text()
    assert "classification" in panel
    assert "accuracy 0.667, macro-F1 0.643 on 9 validation examples (step 12)" in panel
    assert len(classification_section(job["stats"])) == 4  # heading, table, heading, matrix
    assert classification_section({}) == []

    n = MAX_MATRIX_CLASSES + 1
    wide = {
        "classes": [f"c{i}" for i in range(n)],
        "accuracy": 1.0,
        "macro_f1": 1.0,
        "per_class": [],
        "confusion_matrix": [[int(i == j) for j in range(n)] for i in range(n)],
    }
    console = Console(width=200, record=True)
    for block in classification_section({"classification": wide}):
        console.print(block)
    text = console.export_text()
    assert f"The {n}-class confusion matrix is on the dashboard" in text
    assert "predicted" not in text


# --- DPO, training on from a fine-tuned model, experiment tracking --------------------------

FT_MODEL = "ft:tiny-random-llama:sft:abc123"


def dpo_job(status: str = "succeeded") -> dict:
    """A DPO job trained on from an SFT job's model, logging to W&B and MLflow, as the API
    shows it."""
    return {
        "id": "ftjob-dpo",
        "status": status,
        "model": FT_MODEL,
        "fine_tuned_model": "ft:tiny-random-llama:dpo:def456",
        "created_at": 100,
        "finished_at": 160,
        "trained_tokens": 640,
        "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0},
        "method": {
            "type": "dpo",
            "dpo": {
                "hyperparameters": {
                    "n_epochs": 2,
                    "batch_size": 4,
                    "learning_rate_multiplier": 1.0,
                    "beta": 0.25,
                }
            },
        },
        "parent": {"fine_tuned_model": FT_MODEL, "job": "ftjob-sft", "checkpoint": None},
        "lineage": [MODEL, "ft:tiny-random-llama:first:000", FT_MODEL],
        "integrations": [
            {
                "type": "wandb",
                "wandb": {"project": "prefs", "entity": "acme", "name": "[red]run[/]", "tags": []},
                "url": "https://wandb.example/acme/prefs/runs/r1",
            },
            {"type": "mlflow", "mlflow": {"experiment": "prefs", "run_name": None}},
        ],
        "stats": {"tracking": {"mlflow": {"url": "http://mlflow.example/#/runs/m1"}}},
    }


def test_watch_shows_a_dpo_jobs_reward_accuracy_and_margin() -> None:
    import io

    from rich.console import Console

    from app.client.watch import watch_job

    job = dpo_job()
    rows = [
        {
            "step": 1,
            "total_steps": 2,
            "train_loss": 0.6931,
            "train_reward_accuracy": 0.0,
            "train_reward_margin": 0.0,
        },
        {
            "step": 2,
            "total_steps": 2,
            "train_loss": 0.61,
            "train_reward_accuracy": 0.75,
            "train_reward_margin": 0.4123,
            "valid_loss": 0.65,
            "valid_reward_accuracy": 0.8,
            "valid_reward_margin": 0.3,
        },
    ]
    events = [
        {
            "id": f"ftevent-{row['step']}",
            "type": "metrics",
            "level": "info",
            "created_at": 100 + row["step"],
            "message": f"Step {row['step']}/2: training loss={row['train_loss']:.4f}"
            + (f", validation loss={row['valid_loss']:.4f}" if "valid_loss" in row else ""),
            "data": row,
        }
        for row in rows
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            body = "".join(
                f"id: {e['id']}\nevent: fine_tuning.job.event\ndata: {json.dumps(e)}\n\n"
                for e in events
            )
            body += f"event: end\ndata: {json.dumps(job)}\n\n"
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=body.encode()
            )
        return httpx.Response(200, json={**job, "status": "running"})

    client = LatheClient(Target("http://lathe.test", "k"), transport=httpx.MockTransport(handler))
    console = Console(width=200, record=True, file=io.StringIO(), highlight=False)
    final, code = watch_job(client, "ftjob-dpo", console, step_lines=True)
    text = console.export_text()
    assert (final["status"], code) == ("succeeded", 0)
    assert (
        "Step 1/2: training loss=0.6931, reward accuracy 0.000, reward margin 0.000" in text
    )  # the first step: policy and reference are the same model
    assert (
        "Step 2/2: training loss=0.6100, validation loss=0.6500, reward accuracy 0.750, "
        "reward margin 0.412, valid reward accuracy 0.800, valid reward margin 0.300" in text
    )
    # The bar's last state: the training rewards beside the losses.
    assert "2/2 steps loss 0.61 · valid 0.65 · reward acc 0.750 · margin 0.412" in text
    # The outcome: the validation file's rewards.
    assert (
        "final loss 0.61, valid loss 0.65, valid reward accuracy 0.800, "
        "valid reward margin 0.300, in 1m 00s" in text
    )


def test_get_shows_the_method_lineage_and_tracking_runs() -> None:
    from rich.console import Console

    from app.client.render import job_panel

    console = Console(width=200, record=True)
    console.print(job_panel(dpo_job(), None))
    text = console.export_text()
    lines = {line.strip("│ ").split("  ", 1)[0]: line for line in text.splitlines()}
    assert "dpo (beta 0.25)" in lines["method"]
    assert f"{MODEL} → ft:tiny-random-llama:first:000 → {FT_MODEL} → this job" in lines["lineage"]
    assert "ftjob-sft" in lines["parent job"]
    # A run name that looks like Rich markup is shown as written.
    assert (
        "acme/prefs, run [red]run[/], https://wandb.example/acme/prefs/runs/r1"
        in lines["W&B tracking"]
    )
    assert "prefs, http://mlflow.example/#/runs/m1" in lines["MLflow tracking"]
    # A supervised job from a base model: no lineage, no trackers.
    plain = {"id": "ftjob-1", "status": "queued", "model": MODEL, "created_at": 0}
    console = Console(width=200, record=True)
    console.print(job_panel(plain, None))
    text = console.export_text()
    assert "supervised" in text and "lineage" not in text and "tracking" not in text


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


def test_create_sends_a_dpo_method_with_beta_from_a_fine_tuned_model(sent) -> None:
    result = CliRunner().invoke(
        app,
        [
            "jobs", "create", "-m", FT_MODEL, "-t", "file-abc", "--method", "dpo",
            "--beta", "0.2", "--epochs", "1", "--wandb-project", "prefs", "--wandb-tag", "a",
            "--wandb-tag", "b", "--mlflow-experiment", "exp",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "ftjob-new"
    assert sent == [
        {
            "model": FT_MODEL,  # sent as given: the server resolves it
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "beta": 0.2}}},
            "integrations": [
                {"type": "wandb", "wandb": {"project": "prefs", "tags": ["a", "b"]}},
                {"type": "mlflow", "mlflow": {"experiment": "exp"}},
            ],
            "training_file": "file-abc",
        }
    ]


def test_create_without_a_method_sends_the_hyperparameters_as_before(sent) -> None:
    result = CliRunner().invoke(
        app, ["jobs", "create", "-m", MODEL, "-t", "file-a", "--epochs", "2"]
    )
    assert result.exit_code == 0, result.output
    assert sent == [{"model": MODEL, "hyperparameters": {"n_epochs": 2}, "training_file": "file-a"}]
    result = CliRunner().invoke(
        app, ["jobs", "create", "-m", MODEL, "-t", "file-a", "--method", "dpo"]
    )
    assert result.exit_code == 0, result.output
    assert sent[-1] == {"model": MODEL, "method": {"type": "dpo"}, "training_file": "file-a"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--beta", "0.1"], "--method dpo"),
        (["--method", "supervised", "--beta", "0.1"], "--method dpo"),
        (["--wandb-name", "run"], "--wandb-project"),
        (["--mlflow-run-name", "run"], "--mlflow-experiment"),
        (["--method", "orpo"], "orpo"),
    ],
)
def test_create_refuses_options_that_need_another_before_any_request(sent, args, message) -> None:
    result = CliRunner().invoke(app, ["jobs", "create", "-m", MODEL, "-t", "file-a", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert sent == []
