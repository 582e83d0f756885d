"""Server-sent events: a line parser (the WHATWG event-stream format) and a job's event
stream that reconnects where it left off."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from app.client.http import APIError, LatheClient, Unreachable


@dataclass
class ServerSentEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None


def parse_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Events from the lines of an event stream (line ends already removed). Comment
    lines (':' first, the server's keepalives) are skipped; an event is dispatched at the
    blank line that ends it."""
    event, data, last_id, retry = "", [], None, None
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data or retry is not None:  # a block of only `retry:` still sets the delay
                yield ServerSentEvent(event or "message", "\n".join(data), last_id, retry)
            event, data, retry = "", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value or None
        elif name == "retry" and value.isdigit():
            retry = int(value)


@dataclass
class Reconnecting:
    """Yielded between a dropped connection and the next try."""

    reason: str
    delay: float


MAX_FAILED_CONNECTS = 8


def _json(sse: ServerSentEvent, client: LatheClient) -> Any:
    try:
        return json.loads(sse.data)
    except json.JSONDecodeError:
        raise APIError(200, f"{client.base_url} sent a malformed {sse.event} event") from None


# What the server's closing `error` event means, as the status a request would have got.
_ERROR_STATUS = {"authentication_error": 401, "permission_error": 403}


def _stream_error(body: Any) -> APIError:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return APIError(400, f"the event stream ended with an error: {body!r}")
    status = _ERROR_STATUS.get(error.get("type"), 400)
    return APIError(status, str(error.get("message")), error.get("code"), error.get("param"))


def job_event_stream(
    client: LatheClient,
    job_id: str,
    *,
    read_timeout: float = 90.0,
    reconnect_delay: float = 1.0,
) -> Iterator[tuple[str, Any]]:
    """("event", event object) for each of the job's events, oldest first, then ("end",
    job object) once the job is final or paused. An `error` event (the key revoked, the
    team disabled) raises APIError with its 401/403. A dropped connection yields ("reconnect",
    Reconnecting) and resumes after the last event received (Last-Event-ID and `after`),
    so nothing repeats; after MAX_FAILED_CONNECTS failed connects in a row it gives up."""
    path = f"/v1/fine_tuning/jobs/{job_id}/events"
    last_id: str | None = None
    seen: set[str] = set()
    failures = 0  # connections in a row that received nothing at all
    delay = reconnect_delay
    timeout = httpx.Timeout(30.0, read=read_timeout)
    while True:
        params = {"stream": "true"}
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if last_id:
            params["after"] = last_id
            headers["Last-Event-ID"] = last_id
        received = False

        def lines(resp: httpx.Response) -> Iterator[str]:
            nonlocal received
            for line in resp.iter_lines():
                received = True  # keepalive comments count: the server is there
                yield line

        try:
            with client.stream(
                "GET", path, params=params, headers=headers, timeout=timeout
            ) as resp:
                kind = resp.headers.get("content-type", "")
                if not kind.startswith("text/event-stream"):
                    raise APIError(
                        resp.status_code,
                        f"{client.base_url} did not stream the job's events (got "
                        f"{kind or 'no'} content type); it may predate "
                        "GET /v1/fine_tuning/jobs/{id}/events?stream=true",
                    )
                for sse in parse_sse(lines(resp)):
                    if sse.retry is not None:
                        delay = sse.retry / 1000
                    if not sse.data:
                        continue
                    if sse.event == "end":
                        yield "end", _json(sse, client)
                        return
                    if sse.event == "error":  # the key was revoked or the team disabled
                        raise _stream_error(_json(sse, client))
                    event = _json(sse, client)
                    event_id = event.get("id") or sse.id
                    if event_id:
                        last_id = event_id
                        if event_id in seen:
                            continue
                        seen.add(event_id)
                    yield "event", event
            reason = "the server closed the stream"
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
        except APIError as exc:
            if exc.status < 500:  # 404, 401...: retrying will not help
                raise
            reason = f"{exc.status}: {exc.message}"
        failures = 0 if received else failures + 1
        if failures >= MAX_FAILED_CONNECTS:
            raise Unreachable(f"lost the event stream from {client.base_url}: {reason}")
        yield "reconnect", Reconnecting(reason, delay)
        time.sleep(delay * max(1, failures))
