"""/v1/webhooks: a team's endpoints for job outcomes, and what was delivered to them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import SessionDep, SettingsDep, TeamDep
from app.api.error_handlers import COMMON_ERRORS, error_responses
from app.schemas.common import Deleted, ListPage, list_page
from app.schemas.webhooks import (
    Webhook,
    WebhookCreate,
    WebhookCreated,
    WebhookDelivery,
    created_webhook_object,
    delivery_object,
    webhook_object,
)
from app.services import webhooks

router = APIRouter(
    prefix="/v1/webhooks", tags=["webhooks"], responses=error_responses(*COMMON_ERRORS)
)


@router.post("", response_model=WebhookCreated)
def create_webhook(
    body: WebhookCreate, team: TeamDep, session: SessionDep, settings: SettingsDep
) -> WebhookCreated:
    policy = webhooks.egress_policy(settings)
    webhook = webhooks.create_webhook(session, team, body.url, body.event_types, policy)
    return created_webhook_object(webhook)


@router.get("", response_model=ListPage[Webhook])
def list_webhooks(team: TeamDep, session: SessionDep) -> ListPage[Webhook]:
    rows = webhooks.list_webhooks(session, team)
    return list_page([webhook_object(w) for w in rows], False)


@router.delete("/{webhook_id}", response_model=Deleted)
def delete_webhook(webhook_id: str, team: TeamDep, session: SessionDep) -> Deleted:
    webhooks.delete_webhook(session, team, webhook_id)
    return Deleted(id=webhook_id, object="webhook", deleted=True)


@router.get("/{webhook_id}/deliveries", response_model=ListPage[WebhookDelivery])
def list_deliveries(
    webhook_id: str,
    team: TeamDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ListPage[WebhookDelivery]:
    rows = webhooks.list_deliveries(session, team, webhook_id, limit)
    return list_page([delivery_object(d) for d in rows], False)
