"""/v1/webhooks: a team's endpoints for job outcomes, and what was delivered to them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import Field

from app.api.deps import SessionDep, SettingsDep, TeamDep
from app.api.error_handlers import COMMON_ERRORS, error_responses
from app.models import Webhook, WebhookDelivery
from app.schemas import Strict, WebhookUrl, list_envelope
from app.services import webhooks

router = APIRouter(
    prefix="/v1/webhooks", tags=["webhooks"], responses=error_responses(*COMMON_ERRORS)
)


class WebhookCreate(Strict):
    url: WebhookUrl
    # Default: every outcome (succeeded, failed, cancelled). The names are in the document;
    # the service refuses others (400 invalid_value, param event_types).
    event_types: Annotated[
        list[str],
        Field(
            max_length=8,
            json_schema_extra={
                "items": {"type": "string", "enum": list(webhooks.EVENT_TYPES.values())}
            },
        ),
    ] = []


def webhook_object(webhook: Webhook, *, with_secret: bool = False) -> dict:
    body = {
        "id": webhook.id,
        "object": "webhook",
        "url": webhook.url,
        "event_types": webhook.event_types,
        "created_at": webhook.created_at,
    }
    if with_secret:  # only when created: the receiver keeps it to verify signatures
        body["secret"] = webhook.secret
    return body


def delivery_object(delivery: WebhookDelivery) -> dict:
    return {
        "id": delivery.id,
        "object": "webhook.delivery",
        "event_type": delivery.event_type,
        "status": delivery.status,
        "attempts": delivery.attempts,
        # Coarse, also for rows written before they were stored so (app.services.webhooks).
        "last_status_code": (
            None
            if delivery.last_status_code is None
            else webhooks.status_class(delivery.last_status_code)
        ),
        "last_error": webhooks.coarse_error(delivery.last_error),
        "created_at": delivery.created_at,
        "delivered_at": delivery.delivered_at,
        "payload": delivery.payload,
    }


@router.post("")
def create_webhook(
    body: WebhookCreate, team: TeamDep, session: SessionDep, settings: SettingsDep
) -> dict:
    policy = webhooks.egress_policy(settings)
    webhook = webhooks.create_webhook(session, team, body.url, body.event_types, policy)
    return webhook_object(webhook, with_secret=True)


@router.get("")
def list_webhooks(team: TeamDep, session: SessionDep) -> dict:
    rows = webhooks.list_webhooks(session, team)
    return list_envelope([webhook_object(w) for w in rows], False)


@router.delete("/{webhook_id}")
def delete_webhook(webhook_id: str, team: TeamDep, session: SessionDep) -> dict:
    webhooks.delete_webhook(session, team, webhook_id)
    return {"id": webhook_id, "object": "webhook", "deleted": True}


@router.get("/{webhook_id}/deliveries")
def list_deliveries(
    webhook_id: str,
    team: TeamDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict:
    rows = webhooks.list_deliveries(session, team, webhook_id, limit)
    return list_envelope([delivery_object(d) for d in rows], False)
