"""`lathe jobs export`, `exports`, `export-download` and `export-cancel` against a real
uvicorn (on Postgres and moto's S3): the request the options make, the listing, --wait's
outcome and exit codes, and --output's download of every file into one directory, each
checked against its SHA-256 and resumable. No worker runs here: an export is finished the
way the worker finishes it (tests/api/test_export_dashboard.finish_export); the real merge
and conversion are tests/e2e/test_exports.py's."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

from app.cli import app as cli
from tests.api.conftest import TeamClient
from tests.api.test_checkpoints import create_job
from tests.api.test_export_dashboard import exports_of, finish_export, finished_job
from tests.api.test_train_on_fine_tuned import add_checkpoint, finish
from tests.conftest import serve_in_thread

# A merged folder in miniature: a shard of incompressible bytes over the stores' 1 MiB
# chunk, so the download streams in more than one piece.
NOISE = random.Random(14).randbytes(1_300_000)
MERGED = {
    "config.json": b'{"model_type": "llama", "torch_dtype": "float16"}',
    "model-00001-of-00002.safetensors": NOISE,
    "model-00002-of-00002.safetensors": NOISE[:5000][::-1],
    "model.safetensors.index.json": b'{"weight_map": {}}',
    "tokenizer.json": b'{"model": {"type": "BPE"}}',
}
FAST = ["--poll-interval", "0.05"]


@pytest.fixture(scope="module")
def live_api(api_env: dict[str, str]) -> Iterator[str]:
    with serve_in_thread(api_env) as url:
        yield url


def lathe(url: str, team: TeamClient, *args: str):
    return CliRunner().invoke(cli, [*args, "--api-url", url], env={"LATHE_API_KEY": team.key})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def meanwhile(work: Callable[[], None]) -> Iterator[None]:
    """Run `work` in a thread while the block (a CLI command that waits) runs; its
    failure is the test's."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    thread.join(60)
    assert not thread.is_alive(), "the background step did not end"
    if failure:
        raise failure[0]


def new_export_of(sessions, job_id: str, deadline_s: float = 30) -> str:
    """The id of the job's export once the CLI has created it (polled, with a deadline)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        rows = exports_of(sessions, job_id)
        if rows:
            return rows[-1].id
        time.sleep(0.05)
    raise AssertionError(f"no export of {job_id} after {deadline_s} s")


def test_export_prints_the_id_and_sends_only_the_options_given(live_api, team, sessions) -> None:
    job_id = finished_job(team, sessions)

    made = lathe(live_api, team, "jobs", "export", job_id, "--format", "merged")
    fp16 = lathe(
        live_api, team, "jobs", "export", job_id, "-f", "merged", "--dtype", "float16",
        "--base-weights", "original", "--priority", "high", "--json",
    )  # fmt: skip

    assert made.exit_code == 0, made.output
    export_id = made.stdout.strip()
    assert export_id.startswith("ftexp-")
    assert f"created {export_id} (queued): merged, bfloat16, NF4 base" in made.output
    assert fp16.exit_code == 0, fp16.output
    rows = {row.id: row for row in exports_of(sessions, job_id)}
    assert rows[export_id].export["dtype"] == "bfloat16"  # the server's default
    assert rows[export_id].priority == "normal"
    second = next(i for i in rows if i != export_id)
    assert (rows[second].export["dtype"], rows[second].export["base_weights"]) == (
        "float16",
        "original",
    )
    assert rows[second].priority == "high"
    assert f'"id": "{second}"' in fp16.stdout


def test_exports_lists_a_jobs_exports_with_options_status_and_files(
    api, live_api, team, sessions
) -> None:
    job_id = create_job(team)
    name = finish(sessions, team, job_id)
    ckpt_id, _, _ = add_checkpoint(sessions, job_id, name, 40)
    first = lathe(live_api, team, "jobs", "export", job_id, "-f", "merged").stdout.strip()
    second = lathe(
        live_api, team, "jobs", "export", job_id, "-f", "merged", "--checkpoint", ckpt_id
    ).stdout.strip()
    finish_export(sessions, api.app.state.store, team, first, {"config.json": b"{}" * 600})

    listed = lathe(live_api, team, "jobs", "exports", job_id)
    as_json = lathe(live_api, team, "jobs", "exports", job_id, "--json")

    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    row = {i: next(line for line in lines if i in line) for i in (first, second)}
    assert "merged, bfloat16, NF4 base" in row[first] and "succeeded" in row[first]
    assert "1 file, 1.2 KB" in row[first]
    assert "step 40" in row[second] and "queued" in row[second]
    assert lines.index(row[second]) < lines.index(row[first])  # newest first
    assert as_json.exit_code == 0
    assert '"object": "list"' in as_json.stdout and first in as_json.stdout


def test_output_waits_then_downloads_every_file_with_its_sha256(
    api, live_api, team, sessions, tmp_path
) -> None:
    job_id = finished_job(team, sessions)
    out = tmp_path / "merged"

    def worker() -> None:
        export_id = new_export_of(sessions, job_id)
        finish_export(sessions, api.app.state.store, team, export_id, MERGED)

    with meanwhile(worker):
        result = lathe(
            live_api, team, "jobs", "export", job_id, "--format", "merged", "-o", str(out), *FAST
        )

    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert "export succeeded" in result.output and "Export finished" in result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(MERGED)  # no .part left
    for name, data in MERGED.items():
        assert sha((out / name).read_bytes()) == sha(data), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_export_download_keeps_checked_files_and_continues_a_part(
    api, live_api, team, sessions, tmp_path
) -> None:
    """An interrupted --output: one shard whole, the other half-way in its .part. The
    command run again keeps the first (its SHA-256 checks out), appends to the part, and
    refuses a file that is not the export's unless --force."""
    job_id = finished_job(team, sessions)
    export_id = lathe(live_api, team, "jobs", "export", job_id, "-f", "merged").stdout.strip()
    ids = finish_export(sessions, api.app.state.store, team, export_id, MERGED)
    out = tmp_path / "folder"
    out.mkdir()
    shard = "model-00001-of-00002.safetensors"
    (out / "config.json").write_bytes(MERGED["config.json"])
    (out / f"{shard}.part").write_bytes(NOISE[:700_000])
    (out / f"{shard}.part.etag").write_text(f'"{sha(NOISE)}"\n')
    (out / "tokenizer.json").write_bytes(b'{"model": {"type": "WordPiece"}}')  # not the file

    refused = lathe(live_api, team, "jobs", "export-download", job_id, export_id, "-o", str(out))

    assert refused.exit_code == 6, refused.output
    assert "tokenizer.json exists with other content" in refused.output
    assert not (out / "model.safetensors.index.json").exists()  # nothing fetched

    forced = lathe(
        live_api, team, "jobs", "export-download", job_id, export_id, "-o", str(out), "--force"
    )

    assert forced.exit_code == 0, forced.output
    assert "kept" in forced.output and "config.json" in forced.output
    assert "downloaded and checked 4 of 5 files" in forced.output
    assert sorted(p.name for p in out.iterdir()) == sorted(MERGED)
    for name, data in MERGED.items():
        assert sha((out / name).read_bytes()) == sha(data), name
    assert len(ids) == len(MERGED)


def test_a_file_name_that_leaves_the_directory_is_refused(
    api, live_api, team, sessions, tmp_path
) -> None:
    job_id = finished_job(team, sessions)
    export_id = lathe(live_api, team, "jobs", "export", job_id, "-f", "merged").stdout.strip()
    finish_export(
        sessions, api.app.state.store, team, export_id, {"config.json": b"{}", "../evil": b"x"}
    )
    out = tmp_path / "inside"

    result = lathe(live_api, team, "jobs", "export-download", job_id, export_id, "-o", str(out))

    assert result.exit_code == 6, result.output
    assert "not a plain path" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_wait_exits_2_when_the_export_is_cancelled_and_cancel_says_so(
    live_api, team, sessions
) -> None:
    job_id = finished_job(team, sessions)

    def cancel_it() -> None:
        export_id = new_export_of(sessions, job_id)
        cancelled = lathe(live_api, team, "jobs", "export-cancel", job_id, export_id)
        assert cancelled.exit_code == 0, cancelled.output
        assert f"{export_id}: cancelled" in cancelled.stdout

    with meanwhile(cancel_it):
        result = lathe(live_api, team, "jobs", "export", job_id, "-f", "merged", "--wait", *FAST)

    assert result.exit_code == 2, result.output
    assert "export cancelled" in result.output and "Export cancelled" in result.output
    [export] = exports_of(sessions, job_id)
    again = lathe(live_api, team, "jobs", "export-cancel", job_id, export.id)
    assert again.exit_code == 4
    assert "error 409 export_not_cancellable" in again.output


def test_the_apis_refusals_and_usage_errors(live_api, team, sessions, tmp_path) -> None:
    unfinished = create_job(team)
    refused = lathe(live_api, team, "jobs", "export", unfinished, "-f", "merged")
    assert refused.exit_code == 4
    assert "error 409 job_not_succeeded" in refused.output

    job_id = finished_job(team, sessions)
    for args in (["-f", "gguf", "--dtype", "float16"], ["-f", "merged", "--quantization", "f16"]):
        usage = lathe(live_api, team, "jobs", "export", job_id, *args)
        assert usage.exit_code == 2, usage.output
    bad_value = lathe(live_api, team, "jobs", "export", job_id, "-f", "onnx")
    assert bad_value.exit_code == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    in_the_way = lathe(live_api, team, "jobs", "export", job_id, "-f", "merged", "-o", str(busy))
    assert in_the_way.exit_code == 6 and "not an empty directory" in in_the_way.output
    assert exports_of(sessions, job_id) == []  # nothing was asked of the pool

    queued = lathe(live_api, team, "jobs", "export", job_id, "-f", "merged").stdout.strip()
    early = lathe(live_api, team, "jobs", "export-download", job_id, queued)
    assert early.exit_code == 6 and "only a succeeded export has files" in early.output
    missing = lathe(live_api, team, "jobs", "exports", "ftjob-nope")
    assert missing.exit_code == 4 and "error 404 job_not_found" in missing.output


def test_another_team_cannot_see_or_download_an_export(
    api, live_api, team, other_team, sessions, tmp_path
) -> None:
    job_id = finished_job(team, sessions)
    export_id = lathe(live_api, team, "jobs", "export", job_id, "-f", "merged").stdout.strip()
    finish_export(sessions, api.app.state.store, team, export_id, {"config.json": b"{}"})

    for args in (
        ["exports", job_id],
        ["export-download", job_id, export_id, "-o", str(tmp_path / "x")],
        ["export-cancel", job_id, export_id],
    ):
        result = lathe(live_api, other_team, "jobs", *args)
        assert result.exit_code == 4, (args, result.output)
        assert "404" in result.output
    assert list(tmp_path.iterdir()) == []
