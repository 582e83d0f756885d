"""Webhooks: the body that registers one, and the webhook and its deliveries as the API
returns them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from app import models
from app.schemas.common import ApiObject, Strict, pattern_of_string
from app.services import webhooks

# A webhook's url, as app.services.webhooks accepts it (else 400 invalid_url): http(s), a
# host (an IPv4 address, an IPv6 address in brackets, or a name of letters, digits, "-"
# and "_" labels, not four numbers), an optional port, printable characters after it; no
# user:password@. Which hosts may be called (denied_url) is the deployment's, not a form.
_LABEL = "[A-Za-z0-9_-]{1,63}"
_NAME_LABEL = "[A-Za-z0-9_-]{0,31}[A-Za-z_-][A-Za-z0-9_-]{0,31}"  # not only digits
_NUMBERS = "[0-9]{1,63}(?:\\.[0-9]{1,63}){0,2}"  # "0", "127.1": names to a resolver
_NAME = f"(?:(?:{_LABEL}\\.)*{_NAME_LABEL}(?:\\.{_LABEL})*|{_NUMBERS})\\.?"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = f"{_OCTET}(?:\\.{_OCTET}){{3}}"
_H16 = "[0-9A-Fa-f]{1,4}"
_LS32 = f"(?:{_H16}:{_H16}|{_IPV4})"


def _ipv6() -> str:
    """RFC 3986's IPv6address (section 3.2.2), as a regular expression."""

    def groups(n: int) -> str:
        return f"(?:{_H16}:){{{n}}}" if n else ""

    def head(n: int) -> str:  # [ *n( h16 ":" ) h16 ]
        return f"(?:(?:{_H16}:){{0,{n}}}{_H16})?" if n else f"(?:{_H16})?"

    forms = [f"{groups(6)}{_LS32}", f"::{groups(5)}{_LS32}"]
    forms += [f"{head(n)}::{groups(4 - n)}{_LS32}" for n in range(4)]
    forms += [f"{head(4)}::{_LS32}", f"{head(5)}::{_H16}", f"{head(6)}::"]
    return "|".join(f"(?:{form})" for form in forms)


_PORT = "(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
WEBHOOK_URL_PATTERN = (
    f"^https?://(?:{_IPV4}|\\[(?:{_ipv6()})\\]|{_NAME})(?::{_PORT})?(?:[/?#][^\\x00-\\x20\\x7f]*)?$"
)
WebhookUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2048,
        description="An http(s) URL with a host, no user:password@",
        json_schema_extra=pattern_of_string(WEBHOOK_URL_PATTERN),
    ),
]


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


class Webhook(ApiObject):
    id: str
    object: Literal["webhook"] = "webhook"
    url: str
    event_types: list[str]
    created_at: int


class WebhookCreated(Webhook):
    # Only in the answer to its creation: the receiver keeps it to verify signatures.
    secret: str


def webhook_object(webhook: models.Webhook) -> Webhook:
    return Webhook.model_validate(webhook)


def created_webhook_object(webhook: models.Webhook) -> WebhookCreated:
    return WebhookCreated.model_validate(webhook)


class WebhookDelivery(ApiObject):
    id: str
    object: Literal["webhook.delivery"] = "webhook.delivery"
    event_type: str
    status: str  # pending | delivered | failed
    attempts: int
    last_status_code: int | None  # coarse: 200, 400, 500 (the class of the status)
    last_error: str | None
    created_at: int
    delivered_at: int | None
    payload: dict[str, Any]


def delivery_object(delivery: models.WebhookDelivery) -> WebhookDelivery:
    # Coarse, also for rows written before they were stored so (app.services.webhooks).
    code, error = delivery.last_status_code, delivery.last_error
    return WebhookDelivery.model_validate(delivery).model_copy(
        update={
            "last_status_code": None if code is None else webhooks.status_class(code),
            "last_error": webhooks.coarse_error(error),
        }
    )
