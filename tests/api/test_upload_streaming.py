"""POST /v1/files reads no body before the key and the size are checked, and streams what it
does read: a client that sends only the headers gets its 401 or 413; a body without a
length is cut off at the limit; the file reaches object storage while it still arrives.

Over a real socket (uvicorn) where the point is what the client sees, and as ASGI calls
with a body source that counts what the app took from it where the point is how much of
the body was read.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import update
from starlette.types import ASGIApp, Message

from app.api.files import FRAMING_BYTES
from app.main import create_app
from app.models import Team
from tests.api.datasets import CHAT
from tests.api.test_files import object_count
from tests.conftest import create_team_key, serve_in_thread, settings_from

LIMIT = 1024 * 1024  # LATHE_MAX_FILE_BYTES in these tests
BOUNDARY = "lathe-test-boundary"
CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def limited_env(api_env: dict[str, str]) -> dict[str, str]:
    return {**api_env, "LATHE_MAX_FILE_BYTES": str(LIMIT)}


@pytest.fixture(scope="module")
def served(limited_env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """(host, port) of the API under uvicorn, in a thread."""
    with serve_in_thread(limited_env) as url:
        host, port = urlsplit(url).hostname, urlsplit(url).port
        yield host, port


@pytest.fixture(scope="module")
def client(limited_env: dict[str, str]) -> Iterator[TestClient]:
    """The app in a TestClient: its portal runs the ASGI calls below in the app's loop."""
    with TestClient(create_app(settings_from(limited_env))) as test_client:
        yield test_client


def headers_only(address: tuple[str, int], headers: dict[str, str]) -> tuple[int, dict]:
    """Send a POST /v1/files's headers, none of its body, and read the response (within
    10 s: a server that waits for the body never answers)."""
    lines = [
        "POST /v1/files HTTP/1.1",
        f"Host: {address[0]}",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = b""
        while b"\r\n\r\n" not in received or not _complete(received):
            data = sock.recv(65536)
            if not data:
                break
            received += data
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _complete(received: bytes) -> bool:
    head, _, body = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


HUGE = str(300 * 1024 * 1024)


def test_an_upload_without_a_valid_key_is_refused_before_its_body_is_sent(
    served, limited_env
) -> None:
    status, body = headers_only(served, {"Content-Length": HUGE})
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    status, body = headers_only(
        served, {"Content-Length": HUGE, "Authorization": "Bearer lathe-not-a-key"}
    )
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_a_content_length_over_the_limit_is_refused_before_the_body_is_sent(
    served, limited_env
) -> None:
    _, key = create_team_key(limited_env)
    # Expect: 100-continue: the answer comes instead of the go-ahead.
    status, body = headers_only(
        served,
        {
            "Content-Length": str(LIMIT + FRAMING_BYTES + 1),
            "Authorization": f"Bearer {key}",
            "Expect": "100-continue",
        },
    )
    assert status == 413
    assert body["error"]["code"] == "file_too_large"
    assert str(LIMIT) in body["error"]["message"]


def test_a_content_length_over_the_teams_quota_is_refused_before_the_body_is_sent(
    served, limited_env, sessions
) -> None:
    team_id, key = create_team_key(limited_env)
    with sessions() as session:
        session.execute(update(Team).where(Team.id == team_id).values(max_file_bytes=1000))
        session.commit()
    status, body = headers_only(
        served, {"Content-Length": str(LIMIT), "Authorization": f"Bearer {key}"}
    )
    assert status == 403
    assert (body["error"]["code"], body["error"]["param"]) == ("quota_exceeded", "max_file_bytes")


# --- As ASGI calls, counting what the app reads ------------------------------------------


class Body:
    """An ASGI `receive` that makes the request body as the app asks for it, `CHUNK` bytes
    a message, and counts the bytes it handed over."""

    def __init__(self, data: Iterator[bytes]) -> None:
        self.data = data
        self.given = 0
        self.finished = False

    async def receive(self) -> Message:
        if self.given > 4 * LIMIT:  # an app that reads on regardless: hang up, never hang
            return {"type": "http.disconnect"}
        chunk = next(self.data, None)
        if chunk is None:
            self.finished = True
            return {"type": "http.request", "body": b"", "more_body": False}
        self.given += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}


def multipart(content: Iterator[bytes], name: str = "train.jsonl") -> Iterator[bytes]:
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    yield from content
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def chunks_of(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]


def endless() -> Iterator[bytes]:
    line = CHAT.split(b"\n")[0] + b"\n"
    block = line * (CHUNK // len(line))
    while True:
        yield block


def call(client: TestClient, body: Body, headers: dict[str, str]) -> tuple[int, dict]:
    """POST /v1/files with `body` as the request body, in the app's event loop."""
    app: ASGIApp = client.app
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/files",
        "raw_path": b"/v1/files",
        "query_string": b"",
        "root_path": "",
        "client": ("192.0.2.10", 50000),
        "server": ("testserver", 80),
        "headers": [
            (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
            *((k.lower().encode(), v.encode()) for k, v in headers.items()),
        ],
    }
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def run() -> None:
        await app(scope, body.receive, send)

    client.portal.call(run)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(payload)


def test_no_body_is_read_for_a_request_without_a_valid_key(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer lathe-not-a-key"}):
        body = Body(multipart(endless()))
        status, _ = call(client, body, {"content-length": HUGE, **headers})
        assert status == 401
        assert body.given == 0


def test_a_body_without_a_length_is_cut_off_at_the_limit(
    client: TestClient, limited_env, api_env
) -> None:
    _, key = create_team_key(limited_env)
    objects = object_count(api_env)
    body = Body(multipart(endless()))
    status, error = call(client, body, {"Authorization": f"Bearer {key}"})
    assert status == 413, error
    assert error["error"]["code"] == "file_too_large"
    assert LIMIT < body.given <= LIMIT + FRAMING_BYTES + CHUNK
    assert not body.finished
    assert object_count(api_env) == objects


def test_an_upload_reaches_object_storage_while_its_body_still_arrives(
    client: TestClient, limited_env, monkeypatch
) -> None:
    _, key = create_team_key(limited_env)
    data = CHAT * (LIMIT // len(CHAT))  # just under the limit, 16 chunks and more
    body = Body(multipart(chunks_of(data)))
    store = client.app.state.store
    given_at_first_read: list[int] = []
    put = store.put

    def spying_put(object_key: str, stream) -> None:
        class Spy:
            def read(self, size: int = -1) -> bytes:
                if not given_at_first_read:
                    given_at_first_read.append(body.given)
                return stream.read(size)

        put(object_key, Spy())

    monkeypatch.setattr(store, "put", spying_put)
    status, created = call(client, body, {"Authorization": f"Bearer {key}"})
    assert status == 200, created
    assert created["bytes"] == len(data)
    # Storage started reading when about one chunk of the body had come, not the whole.
    assert given_at_first_read[0] <= 2 * CHUNK < len(data)


def test_the_openai_sdk_uploads_through_the_stream(served, limited_env) -> None:
    _, key = create_team_key(limited_env)
    host, port = served
    sdk = OpenAI(base_url=f"http://{host}:{port}/v1", api_key=key, max_retries=0)
    created = sdk.files.create(file=("chat.jsonl", CHAT), purpose="fine-tune")
    assert (created.status, created.bytes, created.filename) == (
        "processed",
        len(CHAT),
        "chat.jsonl",
    )
    assert sdk.files.content(created.id).content == CHAT
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.files.create(file=("chat.jsonl", CHAT + b"{}\n"), purpose="fine-tune")
    assert "line 13" in refused.value.message
    with pytest.raises(openai.APIStatusError) as too_large:
        sdk.files.create(file=("big.jsonl", CHAT * (2 * LIMIT // len(CHAT))), purpose="fine-tune")
    assert too_large.value.status_code == 413


def test_the_openapi_document_states_the_upload_body_and_its_rules(client: TestClient) -> None:
    """Generated clients and schemathesis see the multipart body (the handler reads it
    itself) and its rules: both parts required, `purpose` one of the accepted values."""
    body = client.app.openapi()["paths"]["/v1/files"]["post"]["requestBody"]
    schema = body["content"]["multipart/form-data"]["schema"]
    assert body["required"] is True
    assert sorted(schema["required"]) == ["file", "purpose"]
    assert schema["properties"]["purpose"]["enum"] == ["fine-tune"]
    assert schema["properties"]["file"]["contentMediaType"] == "application/octet-stream"
