"""Big files delivered like big files (issue 14, item 6): GET /v1/files/{id}/content serves
byte ranges from storage with the file's SHA-256 as its ETag, an interrupted download resumes
to the same SHA-256, on S3 it can redirect to a presigned URL, and `lathe files download`
continues a .part file. On real Postgres and S3 (moto's server), under a real uvicorn where
a download is cut off mid-stream."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.cli import app as cli
from app.main import create_app
from app.storage import CHUNK
from tests.api.conftest import TeamClient
from tests.conftest import serve_in_thread, settings_from

# A dataset of about 2.5 MB: more than two of the stores' 1 MiB chunks, so slices cross them.
BIG = b"".join(
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"Line {i}: " + "x" * 900},
                {"role": "assistant", "content": f"{i}"},
            ]
        }
    ).encode()
    + b"\n"
    for i in range(2600)
)
SHA256 = hashlib.sha256(BIG).hexdigest()
ETAG = f'"{SHA256}"'
REDIRECT = {"LATHE_FILE_DOWNLOAD_REDIRECT_SECONDS": "300"}


@pytest.fixture(scope="module")
def big_file(api: TestClient, api_env: dict[str, str]) -> tuple[TeamClient, str]:
    """A team and its uploaded BIG file's id (uploaded once for the module)."""
    from tests.conftest import create_team_key

    owner = TeamClient(*create_team_key(api_env, "big"), api)
    resp = owner.upload(BIG, name="big.jsonl")
    assert resp.status_code == 200, resp.text
    return owner, resp.json()["id"]


@pytest.fixture(scope="module")
def live_api(api_env: dict[str, str]) -> Iterator[str]:
    with serve_in_thread(api_env) as url:
        yield url


@pytest.fixture(scope="module")
def redirecting_api(api_env: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_from({**api_env, **REDIRECT}))) as client:
        yield client


def content(owner: TeamClient, file_id: str, **headers: str) -> httpx.Response:
    return owner.get(f"/v1/files/{file_id}/content", headers=headers)


# --- ranges -------------------------------------------------------------------------------


def test_a_whole_download_says_it_takes_ranges_and_carries_the_sha256_as_etag(big_file) -> None:
    owner, file_id = big_file
    resp = content(owner, file_id)
    assert resp.status_code == 200
    assert resp.content == BIG
    assert resp.headers["accept-ranges"] == "bytes"
    assert resp.headers["etag"] == ETAG
    assert resp.headers["content-length"] == str(len(BIG))
    assert 'filename="big.jsonl"' in resp.headers["content-disposition"]
    assert "content-range" not in resp.headers


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=0-99", 0, 100),  # the first bytes
        (f"bytes={CHUNK - 10}-{CHUNK + 10}", CHUNK - 10, CHUNK + 11),  # across a chunk
        (f"bytes={CHUNK + 5}-", CHUNK + 5, len(BIG)),  # open-ended, spanning chunks
        ("bytes=-1000", len(BIG) - 1000, len(BIG)),  # the last bytes
        (f"bytes=100-{10 * len(BIG)}", 100, len(BIG)),  # a last byte past the end
    ],
)
def test_a_range_is_the_files_slice(big_file, header: str, start: int, stop: int) -> None:
    owner, file_id = big_file
    resp = content(owner, file_id, Range=header)
    assert resp.status_code == 206, resp.text
    assert resp.content == BIG[start:stop]
    assert resp.headers["content-range"] == f"bytes {start}-{stop - 1}/{len(BIG)}"
    assert resp.headers["content-length"] == str(stop - start)
    assert resp.headers["etag"] == ETAG
    assert resp.headers["accept-ranges"] == "bytes"
    assert resp.headers["content-type"] == "application/octet-stream"


def test_s3_is_asked_for_the_slice_only(big_file, api: TestClient) -> None:
    """Memory and transfer stay bounded by the range: GetObject carries the Range, the API
    does not read the object from its start and skip."""
    owner, file_id = big_file
    asked: list[dict] = []
    events = api.app.state.store.client.meta.events

    def record(params: dict, **_) -> None:
        asked.append(dict(params))

    events.register("provide-client-params.s3.GetObject", record)
    try:
        resp = content(owner, file_id, Range=f"bytes={CHUNK}-{CHUNK + 99}")
    finally:
        events.unregister("provide-client-params.s3.GetObject", record)
    assert (resp.status_code, resp.content) == (206, BIG[CHUNK : CHUNK + 100])
    assert [a.get("Range") for a in asked] == [f"bytes={CHUNK}-{CHUNK + 99}"]


def test_a_range_past_the_end_is_416_with_the_size(big_file) -> None:
    owner, file_id = big_file
    resp = content(owner, file_id, Range=f"bytes={len(BIG)}-")
    assert resp.status_code == 416
    assert resp.headers["content-range"] == f"bytes */{len(BIG)}"
    assert resp.json()["error"]["code"] == "range_not_satisfiable"


@pytest.mark.parametrize("header", ["bytes=0-9,20-29", "bytes=9-0", "bytes=x-", "lines=0-9"])
def test_several_ranges_or_a_malformed_one_get_the_whole_file(big_file, header: str) -> None:
    owner, file_id = big_file
    resp = content(owner, file_id, Range=header)
    assert resp.status_code == 200
    assert resp.content == BIG
    assert resp.headers["accept-ranges"] == "bytes"


def test_if_range_with_another_etag_gets_the_whole_file_and_with_this_one_the_slice(
    big_file,
) -> None:
    owner, file_id = big_file
    stale = content(owner, file_id, Range="bytes=100-", **{"If-Range": '"' + "0" * 64 + '"'})
    assert (stale.status_code, stale.content) == (200, BIG)
    current = content(owner, file_id, Range="bytes=100-", **{"If-Range": ETAG})
    assert (current.status_code, current.content) == (206, BIG[100:])


def test_another_teams_file_is_404_with_a_range_too(big_file, team) -> None:
    _, file_id = big_file
    for headers in ({}, {"Range": "bytes=0-9"}, {"Range": "bytes=-5", "If-Range": ETAG}):
        resp = content(team, file_id, **headers)
        assert resp.status_code == 404
        assert "content-range" not in resp.headers


def test_an_interrupted_download_resumed_with_range_has_the_files_sha256(
    big_file, live_api
) -> None:
    """Over a real socket: the first request is dropped after about a chunk; the second asks
    for the rest with If-Range on the first's ETag, and the two make the file."""
    owner, file_id = big_file
    url = f"{live_api}/v1/files/{file_id}/content"
    auth = {"Authorization": f"Bearer {owner.key}"}
    received = bytearray()
    with httpx.stream("GET", url, headers=auth) as first:
        etag = first.headers["etag"]
        for chunk in first.iter_raw(64 * 1024):
            received += chunk
            if len(received) >= CHUNK:
                break  # the connection is closed mid-body
    assert CHUNK <= len(received) < len(BIG)
    rest = httpx.get(url, headers={**auth, "Range": f"bytes={len(received)}-", "If-Range": etag})
    assert rest.status_code == 206
    assert rest.headers["content-range"] == f"bytes {len(received)}-{len(BIG) - 1}/{len(BIG)}"
    assert hashlib.sha256(bytes(received) + rest.content).hexdigest() == SHA256


def test_a_local_store_serves_ranges_too_and_ignores_the_redirect_setting(
    api_env, tmp_path
) -> None:
    from tests.conftest import create_team_key

    local = {**api_env, **REDIRECT, "LATHE_STORAGE_URL": f"file://{tmp_path}"}
    with TestClient(create_app(settings_from(local))) as client:
        owner = TeamClient(*create_team_key(api_env, "local"), client)
        file_id = owner.upload(BIG).json()["id"]
        whole = content(owner, file_id)
        middle = content(owner, file_id, Range=f"bytes={CHUNK - 3}-{CHUNK + 3}")
        tail = content(owner, file_id, Range="bytes=-7")
    assert (whole.status_code, whole.content, whole.headers["etag"]) == (200, BIG, ETAG)
    assert (middle.status_code, middle.content) == (206, BIG[CHUNK - 3 : CHUNK + 4])
    assert (tail.status_code, tail.content) == (206, BIG[-7:])


# --- presigned redirects ------------------------------------------------------------------


def test_the_redirect_is_off_by_default(big_file) -> None:
    owner, file_id = big_file
    resp = owner.get(f"/v1/files/{file_id}/content", follow_redirects=False)
    assert resp.status_code == 200
    assert "location" not in resp.headers


def test_with_the_setting_s3_files_redirect_to_a_presigned_url_that_serves_them(
    big_file, redirecting_api, api_env
) -> None:
    owner, file_id = big_file
    auth = {"Authorization": f"Bearer {owner.key}"}
    resp = redirecting_api.get(f"/v1/files/{file_id}/content", headers=auth, follow_redirects=False)
    assert resp.status_code == 307
    assert resp.headers["etag"] == ETAG
    assert resp.headers["cache-control"] == "no-store"
    location = resp.headers["location"]
    assert location.startswith(api_env["LATHE_S3_ENDPOINT_URL"])
    assert "X-Amz-Expires=300" in location

    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in location
    # The URL is its own credential: fetched with no key, whole or with a Range.
    stored = httpx.get(location)
    tail = httpx.get(location, headers={"Range": f"bytes={len(BIG) - 10}-"})
    assert stored.status_code == 200
    assert hashlib.sha256(stored.content).hexdigest() == SHA256
    assert 'filename="big.jsonl"' in stored.headers["content-disposition"]
    assert stored.headers["content-type"] == "application/octet-stream"
    assert (tail.status_code, tail.content) == (206, BIG[-10:])


def test_httpx_following_the_redirect_does_not_send_the_key_to_storage(big_file, api_env) -> None:
    owner, file_id = big_file
    sent: list[httpx.Request] = []
    with (
        serve_in_thread({**api_env, **REDIRECT}) as url,
        httpx.Client(event_hooks={"request": [sent.append]}, follow_redirects=True) as http,
    ):
        resp = http.get(
            f"{url}/v1/files/{file_id}/content",
            headers={"Authorization": f"Bearer {owner.key}", "Range": "bytes=0-99"},
        )
    assert (resp.status_code, resp.content) == (206, BIG[:100])
    api_request, storage_request = sent
    assert api_request.headers["authorization"] == f"Bearer {owner.key}"
    assert storage_request.url.host != api_request.url.host or (
        storage_request.url.port != api_request.url.port
    )
    assert "authorization" not in storage_request.headers


def test_no_presigned_url_is_issued_for_another_teams_file(big_file, redirecting_api, team) -> None:
    _, file_id = big_file
    resp = redirecting_api.get(
        f"/v1/files/{file_id}/content",
        headers={"Authorization": f"Bearer {team.key}"},
        follow_redirects=False,
    )
    assert resp.status_code == 404
    assert "location" not in resp.headers


# --- the CLI ------------------------------------------------------------------------------


def download(url: str, owner: TeamClient, file_id: str, target: Path):
    return CliRunner().invoke(
        cli,
        ["files", "download", file_id, "-o", str(target), "--api-url", url],
        env={"LATHE_API_KEY": owner.key},
    )


def leave_part(target: Path, data: bytes, etag: str) -> None:
    """What an interrupted `lathe files download` leaves: the bytes so far and their ETag."""
    target.with_name(target.name + ".part").write_bytes(data)
    target.with_name(target.name + ".part.etag").write_text(etag + "\n")


def test_cli_download_writes_the_file_and_prints_its_path(big_file, live_api, tmp_path) -> None:
    owner, file_id = big_file
    target = tmp_path / "out.jsonl"
    result = download(live_api, owner, file_id, target)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(target)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    again = download(live_api, owner, file_id, target)
    assert again.exit_code == 6 and "exists" in again.output


def test_cli_download_continues_a_part_file_to_the_right_sha256(
    big_file, live_api, tmp_path
) -> None:
    owner, file_id = big_file
    target = tmp_path / "big.jsonl"
    leave_part(target, BIG[: CHUNK + 123], ETAG)
    result = download(live_api, owner, file_id, target)
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output
    assert hashlib.sha256(target.read_bytes()).hexdigest() == SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


def test_cli_download_appends_to_the_part_and_refuses_a_result_that_is_not_the_file(
    big_file, live_api, tmp_path
) -> None:
    """A part whose bytes are wrong (but whose ETag is right) is continued, so the end
    result is checked and refused, and the part removed: the append really happened."""
    owner, file_id = big_file
    target = tmp_path / "big.jsonl"
    leave_part(target, b"#" * 1000, ETAG)
    result = download(live_api, owner, file_id, target)
    assert result.exit_code == 6
    assert "SHA-256" in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_download_starts_over_when_the_part_is_of_another_file(
    big_file, live_api, tmp_path
) -> None:
    owner, file_id = big_file
    target = tmp_path / "big.jsonl"
    leave_part(target, b"#" * 1000, '"' + "0" * 64 + '"')
    result = download(live_api, owner, file_id, target)
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(target.read_bytes()).hexdigest() == SHA256


def test_cli_download_follows_the_redirect_resumes_there_and_keeps_the_key_home(
    big_file, api_env, tmp_path, monkeypatch
) -> None:
    owner, file_id = big_file
    sent: list[httpx.Request] = []
    send = httpx.Client.send

    def recording_send(self, request, **kwargs):
        sent.append(request)
        return send(self, request, **kwargs)

    monkeypatch.setattr(httpx.Client, "send", recording_send)
    target = tmp_path / "big.jsonl"
    leave_part(target, BIG[:5000], ETAG)
    with serve_in_thread({**api_env, **REDIRECT}) as url:
        result = download(url, owner, file_id, target)
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(target.read_bytes()).hexdigest() == SHA256
    storage = [r for r in sent if "X-Amz-Signature" in str(r.url)]
    assert len(storage) == 1
    assert storage[0].headers["range"] == "bytes=5000-"
    assert "authorization" not in storage[0].headers


def finished_job_with_adapter(owner: TeamClient, sessions, api_env, archive: bytes) -> str:
    """A job marked succeeded as a worker would, its adapter.tar.gz in the object store."""
    from sqlalchemy import select, update

    from app.models import File, Job, Team
    from app.storage import file_key, open_store
    from tests.api.datasets import CHAT

    training = owner.upload(CHAT).json()["id"]
    job = owner.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-random-llama", "training_file": training}
    ).json()
    adapter_id = f"file-{uuid.uuid4().hex[:24]}"
    key = file_key(owner.id, adapter_id)
    open_store(api_env["LATHE_STORAGE_URL"], api_env["LATHE_S3_ENDPOINT_URL"]).put(
        key, io.BytesIO(archive)
    )
    with sessions() as session:
        session.add(
            File(
                id=adapter_id,
                team_pk=session.scalar(select(Team.pk).where(Team.id == owner.id)),
                filename="adapter.tar.gz",
                purpose="fine-tune-results",
                bytes=len(archive),
                sha256=hashlib.sha256(archive).hexdigest(),
                storage_key=key,
            )
        )
        session.execute(
            update(Job)
            .where(Job.id == job["id"])
            .values(status="succeeded", fine_tuned_model="ft:x", result_files=[adapter_id])
        )
        session.commit()
    return job["id"]


def test_cli_jobs_download_continues_the_adapters_part_and_unpacks_it(
    team, sessions, api_env, live_api, tmp_path
) -> None:
    config = json.dumps({"peft_type": "LORA", "r": 8}).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("adapter_config.json")
        info.size = len(config)
        tar.addfile(info, io.BytesIO(config))
        noise = random.Random(14).randbytes(200_000)  # incompressible: a part worth resuming
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.size = len(noise)
        tar.addfile(info, io.BytesIO(noise))
    archive = buffer.getvalue()
    job_id = finished_job_with_adapter(team, sessions, api_env, archive)
    out = tmp_path / "adapter"
    leave_part(tmp_path / ".adapter.adapter.tar.gz", archive[:70_000], f'"{sha(archive)}"')

    result = CliRunner().invoke(
        cli,
        ["jobs", "download", job_id, "-o", str(out), "--api-url", live_api],
        env={"LATHE_API_KEY": team.key},
    )

    assert result.exit_code == 0, result.output
    assert (out / "adapter_config.json").read_bytes() == config
    assert (out / "adapter_model.safetensors").read_bytes() == noise
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no archive, no part


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _CutOff(httpx.HTTPTransport):
    """The network failing mid-download: the content body breaks off after `after` bytes."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = super().handle_request(request)
        if not request.url.path.endswith("/content"):
            return resp
        after, upstream = self.after, resp.stream

        class Broken(httpx.SyncByteStream):
            def __iter__(self):
                sent = 0
                for chunk in upstream:
                    yield chunk[: after - sent]
                    sent += len(chunk)
                    if sent >= after:
                        raise httpx.ReadError("connection reset by peer")

            def close(self) -> None:
                upstream.close()

        return httpx.Response(resp.status_code, headers=resp.headers, stream=Broken())


def test_a_cli_download_cut_off_keeps_its_part_and_the_next_run_finishes_it(
    big_file, live_api, tmp_path
) -> None:
    from rich.progress import Progress

    from app.client.config import Target
    from app.client.downloads import download_file
    from app.client.http import LatheClient, Unreachable

    owner, file_id = big_file
    target = tmp_path / "big.jsonl"
    with LatheClient(Target(live_api, owner.key), transport=_CutOff(CHUNK + 1)) as client:
        record = client.get(f"/v1/files/{file_id}")
        with pytest.raises(Unreachable, match="run the command again"):
            download_file(client, record, target, Progress(disable=True))
    part = target.with_name("big.jsonl.part")
    assert part.read_bytes() == BIG[: CHUNK + 1]
    assert target.with_name("big.jsonl.part.etag").read_text().strip() == ETAG

    result = download(live_api, owner, file_id, target)
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output
    assert sha(target.read_bytes()) == SHA256
