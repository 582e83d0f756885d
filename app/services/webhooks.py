"""Webhooks: a team's endpoints, the outbox of events for them, and signed delivery.

Signatures follow Standard Webhooks, as OpenAI's own webhooks do, so the openai SDK's
`client.webhooks.unwrap(body, headers, secret=...)` verifies Lathe's deliveries:
`webhook-id` (the event id), `webhook-timestamp` (Unix seconds) and `webhook-signature`
(`v1,` + base64 HMAC-SHA256 over `{id}.{timestamp}.{body}`, keyed with the base64-decoded
part of the `whsec_...` secret).

An event is written in the same transaction that finishes the job (an outbox), so a job
never finishes without its deliveries, nor are deliveries sent for a change rolled back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.domain.ids import new_id
from app.domain.jobs import JobKind, JobStatus
from app.errors import BadRequest, NotFound
from app.models import Job, Team, Webhook, WebhookDelivery, now
from app.services.egress import (
    DeniedAddress,
    EgressPolicy,
    Resolver,
    system_resolver,
    webhook_client,
)
from app.services.locks import lock_team

EVENT_TYPES = {
    JobStatus.SUCCEEDED: "fine_tuning.job.succeeded",
    JobStatus.FAILED: "fine_tuning.job.failed",
    JobStatus.CANCELLED: "fine_tuning.job.cancelled",
}
MAX_WEBHOOKS_PER_TEAM = 20

# What a failed attempt records (last_error), and nothing finer: the exact reason (refused,
# unreachable, reset, TLS, which status) would let a team map the network around Lathe.
DENIED = "not sent: the host resolves into a denied network (LATHE_WEBHOOK_DENIED_NETWORKS)"
CONNECTION_FAILED = "connection failed"
TIMED_OUT = "timed out"


def status_class(code: int) -> int:
    """503 -> 500: the status code a delivery records and shows."""
    return code // 100 * 100


def http_error(code: int) -> str:
    return f"HTTP {code // 100}xx"


def coarse_error(error: str | None) -> str | None:
    """A stored last_error in the coarse form, whatever wrote it (rows from before this
    form held exception text)."""
    if error is None or error in (DENIED, CONNECTION_FAILED, TIMED_OUT):
        return error
    if "denied network" in error:
        return DENIED
    if error.startswith("HTTP ") and error[5:6].isdigit():
        return f"HTTP {error[5]}xx"
    if "Timeout" in error or "timed out" in error:
        return TIMED_OUT
    return CONNECTION_FAILED


def egress_policy(settings: Settings, resolver: Resolver = system_resolver) -> EgressPolicy:
    return EgressPolicy.from_entries(settings.webhook_denied_networks, resolver)


def sender_client(
    settings: Settings, resolver: Resolver = system_resolver, verify: bool | str = True
) -> httpx.Client:
    """The client deliveries go out with: it connects only to addresses it has checked."""
    return webhook_client(
        egress_policy(settings, resolver), settings.webhook_timeout_seconds, verify
    )


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for `body`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{event_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def create_webhook(
    session: Session, team: Team, url: str, event_types: list[str], policy: EgressPolicy
) -> Webhook:
    try:
        parsed = httpx.URL(url)  # what the sender will use, so what it accepts
        parsed.host.encode("idna")  # what resolving it will need ("a..b" fails here)
        parts = urlsplit(url)
    except Exception:
        parsed = parts = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise BadRequest(
            f"url {url!r} is not an http(s) URL with a host", code="invalid_url", param="url"
        )
    if parts.username or parts.password:
        raise BadRequest(
            "url must not carry credentials (user:password@); verify deliveries by their "
            "signature instead",
            code="invalid_url",
            param="url",
        )
    unknown = sorted(set(event_types) - set(EVENT_TYPES.values()))
    if unknown:
        raise BadRequest(
            f"unknown event types {unknown}; known: {sorted(EVENT_TYPES.values())}",
            code="invalid_value",
            param="event_types",
        )
    refused = denied_host(parsed, policy)
    if refused:
        raise BadRequest(refused, code="denied_url", param="url")
    lock_team(session, team)  # one creation of this team at a time counts, then inserts
    count = session.scalar(select(func.count()).where(Webhook.team_pk == team.pk))
    if count >= MAX_WEBHOOKS_PER_TEAM:
        raise BadRequest(
            f"a team has at most {MAX_WEBHOOKS_PER_TEAM} webhooks; delete one first",
            code="too_many_webhooks",
        )
    webhook = Webhook(
        id=new_id("wh"),
        team_pk=team.pk,
        url=url,
        secret=new_secret(),
        event_types=sorted(set(event_types or EVENT_TYPES.values())),
    )
    session.add(webhook)
    session.commit()
    return webhook


def denied_host(url: httpx.URL, policy: EgressPolicy) -> str | None:
    """Why a new webhook's host may not be called, or None. A name that does not resolve
    now is accepted: each delivery checks again, and connects only where it checked."""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        policy.vet(url.host, port)
    except DeniedAddress as denied:
        return (
            f"url host {denied.host!r} resolves to {denied.address}, {denied.reason}; "
            "webhooks may not call it (LATHE_WEBHOOK_DENIED_NETWORKS)"
        )
    except (OSError, UnicodeError):
        return None
    return None


def get_webhook(session: Session, team: Team, webhook_id: str) -> Webhook:
    webhook = session.scalar(
        select(Webhook).where(Webhook.id == webhook_id, Webhook.team_pk == team.pk)
    )
    if webhook is None:
        raise NotFound(f"no webhook {webhook_id!r}", code="webhook_not_found", param="webhook_id")
    return webhook


def list_webhooks(session: Session, team: Team) -> list[Webhook]:
    return list(
        session.scalars(select(Webhook).where(Webhook.team_pk == team.pk).order_by(Webhook.pk))
    )


def delete_webhook(session: Session, team: Team, webhook_id: str) -> None:
    session.delete(get_webhook(session, team, webhook_id))  # pending deliveries go with it
    session.commit()


def list_deliveries(session: Session, team: Team, webhook_id: str, limit: int) -> list:
    webhook = get_webhook(session, team, webhook_id)
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.webhook_pk == webhook.pk)
            .order_by(WebhookDelivery.pk.desc())
            .limit(limit)
        )
    )


def enqueue_job_outcome(session: Session, job: Job, status: JobStatus) -> None:
    """Outbox rows for every webhook of the job's team that wants this outcome. No commit:
    called inside the transition that finished the job. Exports send none: their
    outcome is on the export and its events (docs/exports.md)."""
    event_type = EVENT_TYPES.get(status)
    if event_type is None or job.kind == JobKind.EXPORT:
        return
    hooks = session.scalars(select(Webhook).where(Webhook.team_pk == job.team_pk)).all()
    for webhook in hooks:
        if event_type not in webhook.event_types:
            continue
        event_id = new_id("evt")
        session.add(
            WebhookDelivery(
                id=event_id,
                webhook_pk=webhook.pk,
                event_type=event_type,
                payload={
                    "id": event_id,
                    "object": "event",
                    "created_at": now(),
                    "type": event_type,
                    "data": {
                        "id": job.id,
                        "status": status.value,
                        "fine_tuned_model": job.fine_tuned_model,
                        "error": job.error,
                    },
                },
                status="pending",
                attempts=0,
                next_attempt_at=time.time(),
            )
        )


@dataclass(frozen=True)
class Due:
    delivery_id: str
    url: str
    secret: str
    payload: dict
    attempts: int
    claimed_until: float  # the next_attempt_at this sender set when it claimed the row


def claim_next(session: Session, hold_seconds: float) -> Due | None:
    """The oldest due delivery, claimed by pushing its next attempt `hold_seconds` out with
    a guarded UPDATE (so two senders, say two API replicas, never both take it), or None."""
    current = time.time()
    row = session.execute(
        select(WebhookDelivery, Webhook.url, Webhook.secret)
        .join(Webhook, Webhook.pk == WebhookDelivery.webhook_pk)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= current)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(1)
    ).first()
    if row is None:
        return None
    delivery, url, secret = row
    claimed_until = current + hold_seconds
    claimed = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.pk == delivery.pk,
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at == delivery.next_attempt_at,
        )
        .values(next_attempt_at=claimed_until)
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    if claimed != 1:  # another sender took it first
        return None
    return Due(delivery.id, url, secret, delivery.payload, delivery.attempts, claimed_until)


def retry_delay(attempts: int, base_seconds: float) -> float:
    """Backoff after the n-th failed attempt: base, 3 x base, 9 x base, ... at most 6 h."""
    return min(base_seconds * 3 ** (attempts - 1), 6 * 3600.0)


def post(client: httpx.Client, due: Due) -> tuple[int | None, str | None]:
    """POST one event with `client` (a `sender_client`, which checks where it connects);
    (status class, coarse error): no error means delivered."""
    body = json.dumps(due.payload, separators=(",", ":")).encode()
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "Lathe-Webhooks/1",
        "webhook-id": due.delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(due.secret, due.delivery_id, timestamp, body),
    }
    try:
        response = client.post(due.url, content=body, headers=headers)
    except DeniedAddress:
        return None, DENIED
    except httpx.TimeoutException:
        return None, TIMED_OUT
    except Exception:  # any failure is this delivery's, never the sender's
        return None, CONNECTION_FAILED
    if 200 <= response.status_code < 300:
        return status_class(response.status_code), None
    return status_class(response.status_code), http_error(response.status_code)


def record_attempt(
    session: Session, due: Due, code: int | None, error: str | None, settings: Settings
) -> None:
    attempts = due.attempts + 1
    values: dict = {"attempts": attempts, "last_status_code": code, "last_error": error}
    if error is None:
        values.update(status="delivered", delivered_at=now())
    elif attempts >= settings.webhook_max_attempts:
        values["status"] = "failed"
    else:
        values["next_attempt_at"] = time.time() + retry_delay(
            attempts, settings.webhook_retry_base_seconds
        )
    # Only while the claim is still ours: a sender whose claim ran out (another took the
    # row since) must not overwrite that one's outcome.
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == due.delivery_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at == due.claimed_until,
        )
        .values(**values)
    )
    session.commit()


def deliver_due(
    sessions: sessionmaker[Session], client: httpx.Client, settings: Settings, limit: int = 20
) -> int:
    """Send what is due now, one claimed row at a time, with `client` from `sender_client`;
    the number of attempts made."""
    sent = 0
    while sent < limit:
        with sessions() as session:
            due = claim_next(session, hold_seconds=settings.webhook_timeout_seconds * 3)
        if due is None:
            break
        code, error = post(client, due)
        with sessions() as session:
            record_attempt(session, due, code, error, settings)
        sent += 1
    return sent
